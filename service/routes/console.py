"""GET /console: the admin console, a static page served by the service itself (no front-end build).

The page signs in with an admin API key at POST /auth/token, keeps only the access token in memory and then
calls the public admin API (/admin/*) like any other client: it has no endpoint of its own. Only the files
listed in ASSETS are served. Every answer carries a strict Content-Security-Policy (scripts, styles and
connections from this origin only, nothing inline, no framing), on top of the security headers that
SecurityHeadersMiddleware adds to every response (X-Frame-Options: DENY, nosniff, no-store).
SDB_CONSOLE=false leaves the routes out entirely (404).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

# URL path under /console/ -> (file under CONSOLE_DIR, media type). Nothing else is served.
ASSETS: dict[str, tuple[str, str]] = {
    "console.js": ("console.js", "text/javascript; charset=utf-8"),
    "console.css": ("console.css", "text/css; charset=utf-8"),
    "vendor/uplot/uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "vendor/uplot/uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    "vendor/uplot/LICENSE": ("vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
}

router = APIRouter(tags=["console"], include_in_schema=False)


def _file(relative: str, media_type: str) -> FileResponse:
    return FileResponse(CONSOLE_DIR / relative, media_type=media_type, headers=HEADERS)


@router.get("/console")
def console_page() -> FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/console/{asset:path}", response_model=None)
def console_asset(asset: str) -> FileResponse | RedirectResponse:
    if asset == "":  # /console/: the page's relative asset URLs are meant for /console
        return RedirectResponse("/console", status_code=308)
    found = ASSETS.get(asset)
    if found is None:
        raise HTTPException(status_code=404, detail="Not Found")
    return _file(*found)
