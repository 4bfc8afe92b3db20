"""The FastAPI application."""

from __future__ import annotations

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
from rotator import __version__
from rotator.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="Rotator",
        version=__version__,
        description="AgentMessage-compatible Webhooks API with safe secret rotation.",
    )
    errors.install(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # Before the endpoints router: /v1/webhooks/deliveries must not match /v1/webhooks/{id}.
    app.include_router(deliveries.router)
    app.include_router(endpoints.router)
    app.include_router(org_secret.router)
    app.include_router(events.router)
    app.include_router(operations.router)
    app.include_router(ops_page.router)
    app.include_router(policies.router)
    return app
