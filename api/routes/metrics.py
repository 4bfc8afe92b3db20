"""``GET /metrics``: Prometheus text exposition (rotator/metrics.py says what and from where)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from models.db import get_database
from rotator.metrics import CONTENT_TYPE, exposition

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Counts and ages read from the database now, histograms from every worker process."""
    body = await run_in_threadpool(exposition, get_database())
    return Response(content=body, media_type=CONTENT_TYPE)
