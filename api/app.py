"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from api import errors
from api.middleware import RequestContextMiddleware
from api.routes import (
    deliveries,
    docs,
    endpoints,
    events,
    health,
    metrics,
    operations,
    ops_page,
    org_secret,
    policies,
    providers,
)
from models.db import get_database
from rotator import __version__
from rotator.settings import get_settings


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    await get_database().reads.close()  # its connections belong to the loop that is ending


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes, as the app's own.

    ``include_router`` would wrap the router in a matcher of its own, which costs a request
    more than the database read behind ``GET /v1/webhooks/{id}`` (see docs/performance.md). The
    routers here add nothing at inclusion (no prefix, dependencies or lifespan of their own:
    each route already carries its path and tags), so their routes are added as they are.
    """
    if router.on_startup or router.on_shutdown or router.dependencies:
        raise ValueError("a router with handlers or dependencies of its own must be included")
    app.router.routes.extend(router.routes)


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="Rotator",
        version=__version__,
        description="AgentMessage-compatible Webhooks API with safe secret rotation.",
        lifespan=_lifespan,
        # Served by api.routes.docs, with a Content-Security-Policy, when ROTATOR_DOCS allows.
        docs_url=None,
        redoc_url=None,
        openapi_url=docs.OPENAPI_URL,
    )
    errors.install(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    # Routes are matched in order, so the busiest come first: the docs (/openapi.json, /docs,
    # /redoc) go last. The deliveries router precedes the endpoints router:
    # /v1/webhooks/deliveries must not match /v1/webhooks/{id}.
    framework = list(app.router.routes)
    app.router.routes.clear()
    for router in (
        deliveries.router,
        endpoints.router,
        events.router,
        operations.router,
        org_secret.router,
        policies.router,
        providers.router,
        health.router,
        metrics.router,
        ops_page.router,
    ):
        _add_routes(app, router)
    app.router.routes.extend(framework)
    if settings.docs_enabled:
        _add_routes(app, docs.build_router())
    return app
