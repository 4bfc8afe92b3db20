"""The one place Rotator sends an HTTP delivery.

Every webhook delivery (test deliveries included) goes through :class:`Sender`, so the rules
that keep a delivery safe live here and nowhere else:

* Redirects are never followed: a 3xx is a failed delivery (docs/receivers.md), and following one
  would let a receiver bounce our signed request to an address we never checked.
* Outside ``allow_insecure`` (``ROTATOR_ALLOW_INSECURE_URLS``), only ``https://`` URLs are sent,
  and only to globally routable addresses or to the networks listed in ``allowed_networks``
  (``ROTATOR_ALLOWED_PRIVATE_NETWORKS``). The check runs on the address the socket actually
  connects to (see :class:`GuardedBackend`), not on the hostname string, so a DNS name that
  resolves to ``127.0.0.1``, or one that changes its answer between a check and the connect
  (DNS rebinding), cannot reach the metadata service or the worker's own network.
* Every request has a total deadline, ``timeout_s`` from the start of ``post`` to the last byte
  kept (docs/operating.md, Isolation): a receiver that drips its headers one byte at a time,
  never finishes them, or streams an endless body cannot hold a posting thread longer than
  that. httpx only bounds each single read, write or connect, so :class:`GuardedBackend`
  hands httpcore streams that shorten every socket operation to the time left.
* The response body is only read far enough to keep a short excerpt for operators: a receiver
  cannot make a worker download a gigabyte.
* ``post`` never raises: every failure becomes a :class:`SendResult` whose ``error`` is a short
  fixed phrase. Exception messages are never copied into it, because they can echo URLs,
  hostnames or request headers, and request headers carry signatures.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

if TYPE_CHECKING:
    from rotator.settings import Settings

__all__ = [
    "EXCERPT_BYTES",
    "USER_AGENT",
    "BlockedDestination",
    "GuardedBackend",
    "ResolutionFailed",
    "SendResult",
    "Sender",
    "blocked_reason",
    "describe_failure",
    "guarded_client",
    "parse_retry_after",
    "printable_text",
    "resolve_host",
    "total_deadline",
]

EXCERPT_BYTES = 2048
"""How much of a response body is kept: enough for an operator to read an error page."""

USER_AGENT = "Rotator-Webhooks/1.0"
"""Fixed, so receivers can allow-list us and logs say who called; callers cannot override it."""

_RETRY_AFTER_STATUSES = frozenset({429, 503})
_DELTA_SECONDS = re.compile(r"[0-9]{1,10}")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ranges Python's ``ipaddress`` flags (or, on 3.11, fails to flag) in ways worth naming or
# checking explicitly.
_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598, carrier-grade NAT
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # RFC 1122 "this network"
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052, embeds an IPv4 address


@dataclass(frozen=True)
class SendResult:
    """What one delivery attempt produced; plain data, safe to store and show to operators."""

    status: int | None
    """HTTP status, or None when no response arrived."""
    elapsed_ms: int
    """Wall time of the whole attempt (connect, send, status, excerpt); about ``timeout_s`` at
    most, since the deadline covers all of it."""
    body_excerpt: str
    """The first EXCERPT_BYTES bytes of the response body, decoded as UTF-8 with replacement."""
    error: str | None
    """Short fixed phrase ("timeout", "blocked destination: loopback address", ...), or None.

    None whenever a non-redirect response arrived and its body could be read: the status
    says the rest. A 3xx carries "redirect not followed". When the status arrived but reading
    the body failed, ``status`` is kept and ``error`` ends with "while reading body".
    """
    retry_after_s: float | None
    """Parsed Retry-After on 429/503 (delta-seconds or HTTP-date), else None."""

    @property
    def ok(self) -> bool:
        """2xx only. The status is the receiver's verdict; 3xx is a failure (not followed)."""
        return self.status is not None and 200 <= self.status < 300


class ResolutionFailed(httpcore.ConnectError):
    """The destination's hostname did not resolve; a ConnectError like any other to httpx."""


class BlockedDestination(httpcore.ConnectError):
    """Raised by :class:`GuardedBackend` instead of connecting to a disallowed address.

    A subclass of ``httpcore.ConnectError`` so httpcore and httpx treat it like any other
    failed connect (no half-open connection is pooled); :class:`Sender` finds it again in the
    exception chain to report the reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"blocked destination: {reason}")
        self.reason = reason


def blocked_reason(address: str | IPAddress) -> str | None:
    """Why a delivery must not connect to ``address``, or None when it may.

    Only globally routable unicast addresses are allowed. IPv6 forms that embed an IPv4
    address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) are
    judged by the IPv4 address they lead to, since that is where the packets end up.
    """
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return "unparseable address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return blocked_reason(address.ipv4_mapped)
        embedded = address.sixtofour
        if embedded is None and address in _NAT64_WELL_KNOWN:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = blocked_reason(embedded)
            if reason is not None:
                return reason
    if address.is_unspecified:
        return "unspecified address"
    if address.is_loopback:
        return "loopback address"
    if address.is_link_local:
        return "link-local address"
    if address.is_multicast:
        return "multicast address"
    if isinstance(address, ipaddress.IPv4Address):
        if address in _SHARED_ADDRESS_SPACE:
            return "shared address space"
        if address in _THIS_NETWORK:
            return "reserved address"
    elif address.is_site_local:
        return "site-local address"
    if address.is_reserved:
        return "reserved address"
    if address.is_private:
        return "private address"
    if not address.is_global:
        return "non-global address"
    return None


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _as_network(network: IPNetwork | str) -> IPNetwork:
    """``network`` parsed; an IPv4-mapped IPv6 network becomes the IPv4 network it maps,
    since mapped addresses are judged by their IPv4 address."""
    parsed = ipaddress.ip_network(network)
    if isinstance(parsed, ipaddress.IPv6Network) and parsed.subnet_of(_IPV4_MAPPED):
        return ipaddress.IPv4Network(
            (int(parsed.network_address) & 0xFFFFFFFF, parsed.prefixlen - 96)
        )
    return parsed


def _in_networks(address: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``address`` lies in one of ``networks``; an IPv4-mapped IPv6 address
    (``::ffff:a.b.c.d``) is judged by its IPv4 address, as :func:`blocked_reason` does."""
    if not networks:
        return False
    try:
        parsed: IPAddress = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return any(parsed in network for network in networks)  # False across IP versions


def resolve_host(host: str, port: int) -> list[str]:
    """Every TCP address ``host`` resolves to, in resolver order, without duplicates.

    An IP literal resolves to itself, so literals and names take the same path.
    """
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    ):
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


_deadline: ContextVar[float | None] = ContextVar("rotator_request_deadline", default=None)
"""``time.monotonic()`` by which the current thread's request must be over; set by
:meth:`Sender.post` for the duration of one request, None outside one."""


def _bounded(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    """``timeout`` shortened to the time left before the current request's deadline; raises
    ``expired`` once it has passed. Unchanged outside a request with a deadline."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise expired("request deadline passed")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection's stream whose every operation ends by the current request's deadline.

    httpcore calls ``read``/``write``/``start_tls`` with the per-operation timeouts httpx was
    given; each call here gets at most the time left, so however the receiver paces its
    bytes, the request ends on time. A request that runs out raises httpcore's own timeout
    exceptions, so httpcore closes the connection instead of pooling it half-read.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        sock = self._inner.get_extra_info("socket")
        if _deadline.get() is None or not isinstance(sock, socket.socket):
            self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))
            return
        # httpcore's own write loop re-arms the full timeout before every send(), so a
        # receiver that takes a few bytes at a time could stretch it without end; this loop
        # gives each send() only the time left.
        view = memoryview(buffer)
        while view:
            sock.settimeout(_bounded(timeout, httpcore.WriteTimeout))
            try:
                sent = sock.send(view)
            except TimeoutError as exc:
                raise httpcore.WriteTimeout("write timed out") from exc
            except OSError as exc:
                raise httpcore.WriteError("write failed") from exc
            view = view[sent:]

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        try:
            bounded = _bounded(timeout, httpcore.ConnectTimeout)
        except httpcore.ConnectTimeout:
            self._inner.close()
            raise
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _resolve_within(
    resolve: Callable[[str, int], Sequence[str]], host: str, port: int, timeout: float | None
) -> list[str]:
    """``resolve(host, port)``, given up after ``timeout`` seconds.

    ``getaddrinfo`` takes no timeout, and a receiver's own name servers decide how slowly it
    answers (tens of seconds with the resolver's retries), so names are resolved on a helper
    thread the request stops waiting for at its deadline; the thread ends when the resolver
    gives up. IP literals, which need no lookup, are resolved in place.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return list(resolve(host, port))
    if timeout is None:
        return list(resolve(host, port))

    outcome: list[list[str] | BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(list(resolve(host, port)))
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="delivery-dns", daemon=True).start()
    if not done.wait(timeout):
        raise httpcore.ConnectTimeout("dns resolution timed out")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


class GuardedBackend(httpcore.NetworkBackend):
    """An httpcore network backend that connects only to allowed addresses.

    httpcore calls ``connect_tcp(host, port)`` with the URL's hostname; this backend resolves
    it once, drops every address :func:`blocked_reason` refuses (unless it lies in one of
    ``allowed_networks``), and hands a *literal IP* to the wrapped backend, so the address
    checked is the address connected to. TLS is unaffected: httpcore passes the original
    hostname to ``start_tls`` as ``server_hostname``, so SNI and certificate verification
    still use the name from the URL.

    Allowed addresses are tried in resolver order within one shared connect timeout, like
    ``socket.create_connection``: a receiver whose AAAA record is unreachable from the
    worker still gets its delivery over IPv4. Resolution and connect end by the current
    request's deadline, and the streams returned keep to it (:class:`_DeadlineStream`).
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        allowed_networks: Iterable[IPNetwork | str] = (),
        inner: httpcore.NetworkBackend | None = None,
        resolve: Callable[[str, int], Sequence[str]] = resolve_host,
    ) -> None:
        self.allow_private = allow_private
        self.allowed_networks: tuple[IPNetwork, ...] = tuple(
            _as_network(network) for network in allowed_networks
        )
        self._inner = inner if inner is not None else httpcore.SyncBackend()
        self._resolve = resolve

    def refusal(self, address: str) -> str | None:
        """Why this backend will not connect to ``address``, or None when it will."""
        if self.allow_private:
            return None
        reason = blocked_reason(address)
        if reason is not None and _in_networks(address, self.allowed_networks):
            return None
        return reason

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _bounded(timeout, httpcore.ConnectTimeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            addresses = _resolve_within(self._resolve, host, port, timeout)
        except (OSError, UnicodeError) as exc:
            raise ResolutionFailed("dns resolution failed") from exc
        if not addresses:
            raise ResolutionFailed("dns resolution failed")

        allowed: list[str] = []
        first_reason: str | None = None
        for address in addresses:
            reason = self.refusal(address)
            if reason is None:
                allowed.append(address)
            elif first_reason is None:
                first_reason = reason
        if not allowed:
            raise BlockedDestination(first_reason or "no allowed address")

        last_error: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in allowed:
            remaining = timeout
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
            try:
                stream = self._inner.connect_tcp(
                    address,
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
            else:
                return _DeadlineStream(stream)
        if last_error is None:
            raise httpcore.ConnectTimeout("connect timed out")
        raise last_error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Never: a Unix socket is a local destination, and deliveries do not use one."""
        raise BlockedDestination("unix socket")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (RFC 9110 §10.2.3), or None if unusable.

    Accepts delta-seconds (``"7"``) or an HTTP-date; a date in the past means 0. ``now`` (unix
    seconds) exists for tests.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it was raised from or while handling, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def describe_failure(exc: BaseException) -> str:
    """A short fixed phrase for a failed attempt; never the exception's own message."""
    chain = list(_causes(exc))
    for cause in chain:
        if isinstance(cause, BlockedDestination):
            return f"blocked destination: {cause.reason}"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if any(isinstance(cause, ssl.SSLCertVerificationError) for cause in chain):
        return "tls error: certificate verification failed"
    if any(isinstance(cause, ssl.SSLError) for cause in chain):
        return "tls error"
    if isinstance(exc, httpx.ConnectError):
        if any(isinstance(cause, ConnectionRefusedError) for cause in chain):
            return "connection refused"
        if any(isinstance(cause, ResolutionFailed | socket.gaierror) for cause in chain):
            return "dns resolution failed"
        return "connection failed"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol error"
    if isinstance(exc, httpx.LocalProtocolError):
        return "invalid request"
    if isinstance(exc, httpx.NetworkError):
        if any(isinstance(cause, ConnectionResetError) for cause in chain):
            return "connection reset"
        return "network error"
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return "invalid url"
    if isinstance(exc, ValueError | TypeError):
        return "invalid request"
    if isinstance(exc, RuntimeError) and "closed" in str(exc):
        return "sender closed"
    return f"unexpected error: {type(exc).__name__}"


_ssl_lock = threading.Lock()
_ssl_made: list[ssl.SSLContext] = []


def _ssl_context() -> ssl.SSLContext:
    """One per process, shared by every Sender: building one loads the CA bundle (~25 ms and
    ~0.3 MB each), and an SSLContext is safe to share between threads and connections.

    Built under a lock: the dispatcher's posting threads all make their first Sender at once,
    and without it each of them built a context of its own (a cache miss each), over a CPU second
    per process (docs/performance.md, "With the dispatcher")."""
    if _ssl_made:
        return _ssl_made[0]
    with _ssl_lock:
        if not _ssl_made:
            _ssl_made.append(httpx.create_ssl_context(trust_env=False))
        return _ssl_made[0]


def _build_transport(
    *, allow_private: bool, allowed_networks: Iterable[IPNetwork | str], max_connections: int
) -> httpx.HTTPTransport:
    """An HTTP/1.1 transport whose connections all go through :class:`GuardedBackend`.

    httpx.HTTPTransport does not accept a ``network_backend``, so we build it normally and
    then replace its private ``_pool`` with an ``httpcore.ConnectionPool`` configured the way
    HTTPTransport configures its own (same ssl context factory, limits, HTTP/1.1 only, no
    retries) plus our backend. This leans on an httpx internal: the check below fails loudly
    at construction, and tests/workers/test_http.py asserts the pool is really used, should a
    future httpx rename or restructure it.
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=5.0,
    )
    transport = httpx.HTTPTransport(
        verify=_ssl_context(), trust_env=False, http1=True, http2=False, limits=limits, retries=0
    )
    if not isinstance(getattr(transport, "_pool", None), httpcore.ConnectionPool):
        raise RuntimeError(
            "httpx.HTTPTransport no longer keeps an httpcore.ConnectionPool in _pool; "
            "the SSRF guard in workers/http.py cannot be installed"
        )
    transport._pool = httpcore.ConnectionPool(
        ssl_context=_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        retries=0,
        network_backend=GuardedBackend(
            allow_private=allow_private, allowed_networks=allowed_networks
        ),
    )
    return transport


class Sender:
    """Sends deliveries over one keep-alive HTTP/1.1 client.

    ``timeout_s`` bounds each whole request, connect to last byte kept. ``allow_insecure``
    permits ``http://`` URLs and every address (local receivers in dev and tests);
    ``allowed_networks`` (CIDRs) are private networks that ``https://`` deliveries may reach
    anyway. Thread-safe to the extent httpx.Client is: concurrent ``post`` calls share the
    pool, up to ``max_connections`` connections, but contend for its lock, so
    ``workers.deliveries`` keeps one Sender per sending thread.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        allow_insecure: bool,
        allowed_networks: Iterable[IPNetwork | str] = (),
        max_connections: int = 20,
    ):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.timeout_s = timeout_s
        self.allow_insecure = allow_insecure
        self._transport = _build_transport(
            allow_private=allow_insecure,
            allowed_networks=allowed_networks,
            max_connections=max_connections,
        )
        self._client = httpx.Client(
            transport=self._transport,
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,
            # identity: we never decompress, so a small gzip body cannot expand into a big one.
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, max_connections: int) -> Sender:
        """A Sender configured the way the settings say every delivery is sent."""
        return cls(
            timeout_s=settings.delivery_timeout_seconds,
            allow_insecure=settings.allow_insecure_urls,
            allowed_networks=settings.allowed_private_networks,
            max_connections=max_connections,
        )

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        """POST ``body`` with ``headers`` to ``url``; never raises.

        The headers and body are sent as given, except User-Agent, which is always ours.
        Ends within about ``timeout_s`` whatever the receiver does; a request cut short
        reports "timeout" (or "timeout while reading body", keeping the status and what
        arrived of the body).
        """
        start = time.perf_counter()
        token = _deadline.set(time.monotonic() + self.timeout_s)
        try:
            return self._post(url, body, headers, start)
        finally:
            _deadline.reset(token)

    def _post(self, url: str, body: bytes, headers: Mapping[str, str], start: float) -> SendResult:
        status: int | None = None
        excerpt = bytearray()
        error: str | None = None
        retry_after: float | None = None

        parsed = self._parse_url(url)
        if isinstance(parsed, str):
            error = parsed
        else:
            try:
                # The URL that was checked, parsed once (parsing it cost ~4 % of a worker's CPU).
                request = self._client.build_request("POST", parsed, content=body, headers=headers)
                request.headers["User-Agent"] = USER_AGENT
                response = self._client.send(request, stream=True)
            except Exception as exc:
                error = describe_failure(exc)
            else:
                try:
                    status = response.status_code
                    if status in _RETRY_AFTER_STATUSES:
                        retry_after = parse_retry_after(response.headers.get("retry-after"))
                    if 300 <= status < 400:
                        error = "redirect not followed"
                    try:
                        # Raw chunks: no decompression; stop once the excerpt is full. Closing
                        # an unfinished response drops the connection instead of draining it.
                        for chunk in response.iter_raw():
                            excerpt += chunk
                            if len(excerpt) >= EXCERPT_BYTES:
                                break
                    except Exception as exc:
                        error = f"{describe_failure(exc)} while reading body"
                finally:
                    try:
                        response.close()
                    except Exception:  # noqa: S110 - the result is already decided
                        pass

        return SendResult(
            status=status,
            elapsed_ms=int((time.perf_counter() - start) * 1000),
            body_excerpt=printable_text(bytes(excerpt[:EXCERPT_BYTES])),
            error=error,
            retry_after_s=retry_after,
        )

    def _parse_url(self, url: str) -> httpx.URL | str:
        """``url`` parsed, or why it is refused before any connection is attempted."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            return "invalid url"
        if parsed.scheme not in ("http", "https"):
            return "invalid url: unsupported scheme"
        if not parsed.host:
            return "invalid url"
        if parsed.scheme != "https" and not self.allow_insecure:
            return "blocked destination: https required"
        return parsed

    def close(self) -> None:
        """Close pooled connections; the Sender cannot send afterwards."""
        self._client.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# --- other outbound calls ------------------------------------------------------------------------


def printable_text(raw: bytes) -> str:
    """Bytes a receiver or provider sent, as text any database stores: invalid UTF-8 and NUL
    characters (PostgreSQL's text refuses them) become U+FFFD."""
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


@contextmanager
def total_deadline(seconds: float) -> Iterator[None]:
    """Every connect, read and write of a guarded client in the block ends ``seconds`` from now,
    however the other side drips its bytes: the total deadline of one call."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def guarded_client(settings: Settings, *, timeout_s: float) -> httpx.Client:
    """An HTTP client for calls other than deliveries (a remote provider's API) that obeys the
    same destination rules: the settings' insecure-URL switch and allowed private networks,
    checked on the connected address; no redirects; no proxy from the environment. Bound each
    call with :func:`total_deadline`."""
    transport = _build_transport(
        allow_private=settings.allow_insecure_urls,
        allowed_networks=settings.allowed_private_networks,
        max_connections=2,
    )
    return httpx.Client(
        transport=transport,
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    )
