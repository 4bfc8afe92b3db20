"""Domain errors: a stable code and HTTP status each, rendered by one handler in ``api``."""

from __future__ import annotations

from collections.abc import Mapping


class DomainError(Exception):
    status: int = 400
    code: str = "BAD_REQUEST"
    message: str = "bad request"
    retry_after: int | None = None  # seconds, sent as Retry-After when set

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Mapping[str, str] | None = None,
        retry_after: int | None = None,
    ):
        self.message = message or type(self).message
        self.details = dict(details) if details else None
        if retry_after is not None:
            self.retry_after = max(1, retry_after)
        super().__init__(self.message)


class Unauthorized(DomainError):
    status, code, message = 401, "UNAUTHORIZED", "authentication failed"


class Forbidden(DomainError):
    status, code, message = 403, "FORBIDDEN", "missing required scope"


class NotFound(DomainError):
    status, code, message = 404, "NOT_FOUND", "not found"


class LimitExceeded(DomainError):
    status, code, message = 409, "LIMIT_EXCEEDED", "limit exceeded"


class Conflict(DomainError):
    status, code, message = 409, "CONFLICT", "conflict"


class ValidationFailed(DomainError):
    status, code, message = 422, "VALIDATION_FAILED", "validation failed"

    def __init__(self, details: Mapping[str, str]):
        super().__init__(details=details)


def raise_if_any(problems: Mapping[str, str | None]) -> None:
    """422 naming each field whose check found a problem (None: the field is fine)."""
    details = {field: problem for field, problem in problems.items() if problem}
    if details:
        raise ValidationFailed(details)


class RateLimited(DomainError):
    status, code, message = 429, "RATE_LIMITED", "rate limit exceeded"

    def __init__(self, retry_after: int):
        super().__init__(retry_after=retry_after)


class ProviderUnavailable(DomainError):
    """A remote provider's API could not answer (docs/api.md, "Remote providers")."""

    status, code, message = 502, "PROVIDER_UNAVAILABLE", "the provider did not answer"
