"""``GET /metrics``: Prometheus text exposition (rotator/metrics.py says what and from where).

With ``ROTATOR_METRICS_TOKEN`` set, a scrape must carry ``Authorization: Bearer <token>``
(docs/operating.md, "Metrics"); anything else is a 401 in the error envelope.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.errors import envelope, request_id_of
from api.scrape import exposition
from models.db import get_database
from rotator.metrics import CONTENT_TYPE

router = APIRouter(tags=["metrics"])


def _authorized(header: str | None, token: str) -> bool:
    scheme, _, presented = (header or "").partition(" ")
    # Compared in constant time, and always compared, so timing says nothing about the token.
    same = hmac.compare_digest(presented.strip().encode(), token.encode())
    return scheme.lower() == "bearer" and same


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Counts and ages read from the database now, histograms from every worker process."""
    db = get_database()
    token = db.settings.metrics_token
    if token and not _authorized(request.headers.get("authorization"), token):
        return envelope(
            401,
            "UNAUTHORIZED",
            "a valid metrics token is required",
            request_id_of(request),
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    body = await run_in_threadpool(exposition, db)
    return Response(content=body, media_type=CONTENT_TYPE)
