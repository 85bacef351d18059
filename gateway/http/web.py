"""The browser side: the JavaScript client at `/static/agora.js` and the demo app at `/`.

Files are package data of `gateway` (gateway/static/), found through the package rather
than the working directory, so an installed wheel serves them too. `agora.js` is the
stable path clients import; the demo app's files may change freely.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The demo page is small and changes with deploys: revalidate it every time (ETag makes
# that a 304); the client module is imported by pages that expect a stable path.
_NO_CACHE = {"Cache-Control": "no-cache"}


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers=_NO_CACHE)


def routes() -> list[BaseRoute]:
    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=True), name="static"),
    ]
