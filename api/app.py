"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.middleware import RequestContextMiddleware
from api.routes import (
    deliveries,
    endpoints,
    events,
    health,
    metrics,
    operations,
    ops_page,
    org_secret,
    policies,
)
from models.db import get_database
from rotator import __version__
from rotator.settings import get_settings


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    await get_database().reads.close()  # its connections belong to the loop that is ending


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="Rotator",
        version=__version__,
        description="AgentMessage-compatible Webhooks API with safe secret rotation.",
        lifespan=_lifespan,
    )
    errors.install(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    # Routes are matched in order, so the busiest come first. The deliveries router precedes the
    # endpoints router: /v1/webhooks/deliveries must not match /v1/webhooks/{id}.
    app.include_router(deliveries.router)
    app.include_router(endpoints.router)
    app.include_router(events.router)
    app.include_router(operations.router)
    app.include_router(org_secret.router)
    app.include_router(policies.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(ops_page.router)
    return app
