"""The baseline for ``bench/api_bench.py``: a bare FastAPI app with a constant JSON route (and
the same behind one database round trip).

Served exactly like ``rotator api`` (uvicorn, one worker, same log level, access log on) so the
difference between the two is the cost of Rotator's request path, not of the server.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from psycopg_pool import AsyncConnectionPool

BODY = {"success": True, "data": {"status": "ok"}}

app = FastAPI(title="bare")


@app.get("/bare")
async def bare() -> JSONResponse:
    # A JSONResponse, as Rotator's routes return: both skip response-model serialisation.
    return JSONResponse(BODY)


_pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool] = {}


@app.get("/bare-db")
async def bare_db() -> JSONResponse:
    """The same constant after one PostgreSQL round trip of its own (``SELECT 1``, prepared, on
    psycopg's asyncio pool): what a GET costs that reads the database once per request, without
    sharing round trips as Rotator's reads do. The database is ``BENCH_DATABASE_URL``."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = AsyncConnectionPool(
            os.environ["BENCH_DATABASE_URL"], max_size=20, kwargs={"autocommit": True}, open=False
        )
        await pool.open()
    async with pool.connection() as connection:
        cursor = await connection.execute("SELECT 1", prepare=True, binary=True)
        await cursor.fetchall()
    return JSONResponse(BODY)
