"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.errors import responses
from models.db import get_database
from workers.app import app as celery_app

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _check_database() -> str | None:
    try:
        with get_database().engine.connect() as connection:
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
async def readyz() -> JSONResponse:
    """Ready to serve: the database and the broker answer."""
    checks = {
        "database": await run_in_threadpool(_check_database),
        "broker": await run_in_threadpool(_check_broker),
    }
    ready = all(problem is None for problem in checks.values())
    body = {
        "status": "ok" if ready else "unavailable",
        "checks": {name: problem or "ok" for name, problem in checks.items()},
    }
    return JSONResponse(body, status_code=200 if ready else 503)
