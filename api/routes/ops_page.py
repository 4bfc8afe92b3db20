"""The operators' page: ``GET /ops`` and its script and stylesheet.

Static files from ``api/static/``, no template and no data: the page holds nothing secret and
loads without a key. The operator pastes an API key into it (kept in the tab's
``sessionStorage`` only) and the script calls the operations API with it, like any client.

Every response carries a strict Content-Security-Policy: scripts, styles and requests from this
origin only, no inline code, no framing, no form posts, no referrer.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Small files that change with a deploy: revalidate rather than serve a stale script.
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def _static(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/ops")
async def ops_page() -> Response:
    """The page: a key form and the operations table, filled in by ``/ops/app.js``."""
    return _static("ops.html", "text/html; charset=utf-8")


@router.get("/ops/app.js")
async def ops_script() -> Response:
    return _static("ops.js", "text/javascript; charset=utf-8")


@router.get("/ops/app.css")
async def ops_stylesheet() -> Response:
    return _static("ops.css", "text/css; charset=utf-8")
