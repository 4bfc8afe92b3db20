"""The baseline for ``bench/api_bench.py``: a bare FastAPI app with one constant JSON route.

Served exactly like ``rotator api`` (uvicorn, one worker, same log level, access log on) so the
difference between the two is the cost of Rotator's request path, not of the server.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

BODY = {"success": True, "data": {"status": "ok"}}

app = FastAPI(title="bare")


@app.get("/bare")
async def bare() -> JSONResponse:
    # A JSONResponse, as Rotator's routes return: both skip response-model serialisation.
    return JSONResponse(BODY)
