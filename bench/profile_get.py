"""Where a ``GET /v1/webhooks/{id}`` spends its CPU: an in-process, sequential cProfile run.

Usage (from the repository root; PostgreSQL as for bench/api_bench.py)::

    .venv/bin/python bench/profile_get.py --requests 2000

Drives the ASGI apps directly (no uvicorn, no sockets, one request at a time) and reports, per
request: wall time, process CPU time (all threads) and database work (statements, pool
checkouts, transactions) for

* ``bare``        bench/bare_app.py GET /bare
* ``healthz``     Rotator GET /healthz (middleware + routing, no database)
* ``get``         Rotator GET /v1/webhooks/{id} as shipped (all on the event loop)

then profiles ``get`` with cProfile and sums own time by package. Numbers are per request,
sequential: they show cost, not concurrency effects (see bench/api_bench.py for throughput
under load). cProfile measures wall time, so the profile includes the waits on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.api_bench import (  # noqa: E402
    DEFAULT_BROKER_URL,
    DEFAULT_DATABASE_URL,
    prepare_rotator,
)
from bench.common import find_bin  # noqa: E402

ASGIApp = Callable[..., Awaitable[None]]


async def call(
    app: ASGIApp, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        + [(b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    delivered = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


@dataclass
class Case:
    name: str
    app: ASGIApp
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Measured:
    name: str
    wall_ms: float
    cpu_ms: float
    user_ms: float
    sys_ms: float
    db: dict[str, float]


class DbCounters:
    """Statements, pool checkouts and transactions, counted with SQLAlchemy's public events."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.counts: Counter[str] = Counter()

        def on_execute(*_: Any) -> None:
            self.counts["statements"] += 1

        def on_checkout(*_: Any) -> None:
            self.counts["checkouts"] += 1

        def on_connect(*_: Any) -> None:
            self.counts["new_connections"] += 1

        def on_begin(*_: Any) -> None:
            self.counts["transactions"] += 1

        event.listen(engine, "before_cursor_execute", on_execute)
        event.listen(engine, "begin", on_begin)
        event.listen(engine.pool, "checkout", on_checkout)
        event.listen(engine.pool, "connect", on_connect)

    def per_request(self, requests: int) -> dict[str, float]:
        counts = dict(self.counts)
        # psycopg sends BEGIN and COMMIT as commands of their own: one round trip each.
        counts["round_trips"] = counts.get("statements", 0) + 2 * counts.get("transactions", 0)
        return {name: value / requests for name, value in sorted(counts.items())}


async def measure(case: Case, requests: int, warmup: int, counters: DbCounters) -> Measured:
    for _ in range(warmup):
        status, body = await call(case.app, case.method, case.path, case.headers)
        if not 200 <= status < 300:
            raise SystemExit(f"{case.name}: {case.method} {case.path} -> {status} {body[:200]!r}")
    counters.counts.clear()
    wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(requests):
        await call(case.app, case.method, case.path, case.headers)
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    per = 1000 / requests
    return Measured(
        name=case.name,
        wall_ms=wall * per,
        cpu_ms=(user + system) * per,
        user_ms=user * per,
        sys_ms=system * per,
        db=counters.per_request(requests),
    )


PACKAGES = (
    ("psycopg", "/psycopg/"),
    ("sqlalchemy", "/sqlalchemy/"),
    ("fastapi", "/fastapi/"),
    ("starlette", "/starlette/"),
    ("pydantic", "/pydantic"),
    ("anyio", "/anyio/"),
    ("ulid", "/ulid/"),
    ("rotator api/", "/api/"),
    ("rotator models/", "/models/"),
    ("asyncio", "/asyncio/"),
)


def by_package(stats: pstats.Stats) -> list[tuple[str, float]]:
    totals: dict[str, float] = {}
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        label = "other (stdlib, builtins)"
        for name, marker in PACKAGES:
            if marker in filename:
                label = name
                break
        totals[label] = totals.get(label, 0.0) + tottime
    return sorted(totals.items(), key=lambda item: -item[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per case")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--top", type=int, default=25, help="functions listed from the profile")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--save", type=Path, help="also write the cProfile data to this file")
    args = parser.parse_args(argv)

    setup = prepare_rotator(find_bin("rotator"), args.database_url, args.broker_url)
    os.environ.update(setup.env)  # before the project is imported: settings are read once

    from api.app import create_app
    from bench.bare_app import app as bare_app
    from models.db import get_database

    rotator_app = create_app()
    counters = DbCounters(get_database().engine)
    auth = {"Authorization": f"Bearer {setup.api_key}"}

    async def run() -> tuple[list[Measured], cProfile.Profile]:
        body = json.dumps(
            {"url": "https://bench.invalid/hook", "events": ["campaign.approved"]}
        ).encode()
        status, raw = await call(
            rotator_app, "POST", "/v1/webhooks", {**auth, "content-type": "application/json"}, body
        )
        if status != 201:
            raise SystemExit(f"POST /v1/webhooks -> {status} {raw[:300]!r}")
        path = f"/v1/webhooks/{json.loads(raw)['id']}"
        cases = [
            Case("bare", bare_app, "GET", "/bare", {}),
            Case("healthz", rotator_app, "GET", "/healthz", {}),
            Case("get", rotator_app, "GET", path, auth),
        ]
        results = [await measure(case, args.requests, args.warmup, counters) for case in cases]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.requests):
            await call(rotator_app, "GET", path, auth)
        profiler.disable()
        await get_database().reads.close()
        return results, profiler

    results, profiler = asyncio.run(run())

    print(f"{args.requests} sequential requests per case, in-process (no uvicorn, no sockets)\n")
    print(
        f"{'case':<11} {'wall ms':>8} {'CPU ms':>8} {'user':>7} {'sys':>7}  "
        "database work per request"
    )
    for m in results:
        db = ", ".join(f"{k} {v:.2f}" for k, v in m.db.items() if v) or "-"
        print(
            f"{m.name:<11} {m.wall_ms:>8.3f} {m.cpu_ms:>8.3f} {m.user_ms:>7.3f} {m.sys_ms:>7.3f}"
            f"  {db}"
        )
    bare = results[0].cpu_ms
    for m in results[1:]:
        print(f"CPU {m.name}/bare = {m.cpu_ms / bare:.1f}x")

    stats = pstats.Stats(profiler)
    total = sum(t for _, t in by_package(stats)) or 1.0
    print(f"\ncProfile of get, own time by package (total {total:.2f} s):")
    for label, seconds in by_package(stats):
        print(f"  {100 * seconds / total:5.1f}%  {label}")
    print(f"\ntop {args.top} functions by own time:")
    stats.sort_stats("tottime").print_stats(args.top)
    print(f"top {args.top} functions by cumulative time:")
    stats.sort_stats("cumulative").print_stats(args.top)
    if args.save:
        stats.dump_stats(args.save)
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
