"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.errors import for_status, request_id_of, responses
from models.db import get_database
from models.reads import READ_ONLY_OPTION
from workers.app import app as celery_app

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _check_database() -> str | None:
    try:
        # A read: on SQLite it must not wait for another process's write lock.
        with (
            get_database()
            .engine.connect()
            .execution_options(**{READ_ONLY_OPTION: True}) as connection
        ):
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return type(exc).__name__
    return None


def _check_broker() -> str | None:
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return type(exc).__name__
    return None


@router.get("/readyz", responses=responses(503))
async def readyz(request: Request) -> JSONResponse:
    """Ready to serve: the database and the broker answer."""
    checks = {
        "database": await run_in_threadpool(_check_database),
        "broker": await run_in_threadpool(_check_broker),
    }
    problems = {name: problem for name, problem in checks.items() if problem is not None}
    if problems:
        return for_status(503, request_id_of(request), details=problems)
    return JSONResponse({"status": "ok", "checks": dict.fromkeys(checks, "ok")})
