"""``/docs`` (Swagger UI) and ``/redoc``, served only when ``ROTATOR_DOCS`` allows it.

Both pages load their scripts from a CDN and run on the API's origin, the origin where the
operations page keeps its API key in sessionStorage (docs/operating.md, "API docs"). So they are
off in production unless asked for, and when served they carry a Content-Security-Policy: only
the pinned CDN bundles and the page's own inline script (by hash) may run, and scripts may talk
to this origin only. ``/openapi.json`` is always served: it holds no secret.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

TITLE = "Rotator"
OPENAPI_URL = "/openapi.json"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def _inline_hashes(body: bytes) -> str:
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(body)
    )


def _csp(body: bytes) -> str:
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src https://cdn.jsdelivr.net/npm/ {_inline_hashes(body)}".rstrip(),
            "style-src 'unsafe-inline' https://cdn.jsdelivr.net/npm/ https://fonts.googleapis.com",
            "font-src https://fonts.gstatic.com",
            "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly",
            "connect-src 'self'",
            "worker-src blob:",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )


def _headers(body: bytes) -> dict[str, str]:
    return {
        "Content-Security-Policy": _csp(body),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


def build_router() -> APIRouter:
    """The two pages, built once (with their policies) and served as they are."""
    router = APIRouter()
    swagger = bytes(
        get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{TITLE} - Swagger UI").body
    )
    redoc = bytes(get_redoc_html(openapi_url=OPENAPI_URL, title=f"{TITLE} - ReDoc").body)
    swagger_headers, redoc_headers = _headers(swagger), _headers(redoc)

    @router.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(swagger, headers=swagger_headers)

    @router.get("/redoc", include_in_schema=False)
    async def redoc_page() -> HTMLResponse:
        return HTMLResponse(redoc, headers=redoc_headers)

    return router
