"""The web page: a chat with the network and a live table of its peers. Plain files, no build step.

``page_router(network)`` serves ``/`` (the page), ``/static/<file>`` (its script, style and icon) and
``/network`` (the table's JSON, from ``network``, which checks the caller's key itself). The worker
and the gateway both include it. The page talks to whoever serves it: the OpenAI API on the same
origin, so a strict Content-Security-Policy (nothing but this origin, no inline script) costs it
nothing and takes a hostile string (a peer's model name) out of the picture twice: the script only
ever writes text (``textContent``), and markup could run nothing anyway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from peerinfer.api.network import NetworkView
from peerinfer.errors import NotFoundError

NetworkSource = Callable[[Request], Awaitable[NetworkView]]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # An upgraded package must not leave a browser running the old script against the new API.
    "Cache-Control": "no-cache",
}


@cache
def static_file(name: str) -> bytes:
    """The bytes of one of the page's files (``STATIC_TYPES`` names them all), read once."""
    return (resources.files(__package__) / "static" / name).read_bytes()


def page_router(network: NetworkSource) -> APIRouter:
    """The page's routes; ``network`` builds ``/network``'s answer (and raises ``AuthError`` for a bad key)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def page() -> Response:
        return Response(static_file("index.html"), media_type=STATIC_TYPES["index.html"], headers=PAGE_HEADERS)

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        media_type = STATIC_TYPES.get(name)  # a fixed list: no path from the request reaches the disk
        if media_type is None:
            raise NotFoundError(f"no such file of the web page: {name[:100]!r}")
        return Response(static_file(name), media_type=media_type, headers=PAGE_HEADERS)

    @router.get("/network")
    async def network_table(request: Request) -> JSONResponse:
        view = await network(request)
        return JSONResponse(view.model_dump(mode="json"), headers={"Cache-Control": "no-store"})

    return router
