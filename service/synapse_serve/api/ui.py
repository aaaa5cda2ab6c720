"""The browser page (``/ui``) and the API docs (``/docs``, ``/redoc``), with every asset served from the package.

Nothing is fetched from outside: the page's HTML, script and style live in ``synapse_serve/ui``,
Swagger UI's and ReDoc's bundles come from the ``fastapi-offline`` package (MIT, its licence
ships with it). ``/`` redirects to ``/ui``. The page itself holds no data: it calls the API
with the token the user typed (kept in the tab's session storage), so it shows exactly what
that token may see.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, RedirectResponse, Response

from synapse_serve.errors import NotFound

router = APIRouter(include_in_schema=False)
PAGE = Path(str(resources.files("synapse_serve") / "ui"))
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "ui.js": "text/javascript; charset=utf-8",
              "ui.css": "text/css; charset=utf-8"}
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
              "redoc.standalone.js": "text/javascript; charset=utf-8", "favicon.png": "image/png"}
# the page runs only its own script, talks only to this server, and is never framed by another site
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


# the docs pages run the bundles' own inline set-up; anything they would fetch from outside (ReDoc's footer logo,
# Swagger UI's validator badge) is refused by the browser before it is requested
DOCS_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline' blob:; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
               "frame-ancestors 'none'")


def docs_assets() -> Path:
    """Where the Swagger UI and ReDoc bundles are (the fastapi-offline package's static folder)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def _page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@router.get("/")
async def root() -> Response:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
async def page() -> Response:
    return FileResponse(PAGE / "index.html", media_type=PAGE_FILES["index.html"], headers=_page_headers())


@router.get("/ui/{asset}")
async def page_asset(asset: str) -> Response:
    if asset not in PAGE_FILES:
        raise NotFound(f"no page asset {asset[:64]!r}")
    return FileResponse(PAGE / asset, media_type=PAGE_FILES[asset], headers=_page_headers())


@router.get("/docs/assets/{asset}")
async def docs_asset(asset: str) -> Response:
    if asset not in DOCS_FILES:
        raise NotFound(f"no docs asset {asset[:64]!r}")
    return FileResponse(docs_assets() / asset, media_type=DOCS_FILES[asset],
                        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})


@router.get("/docs")
async def swagger(request: Request) -> Response:
    page = get_swagger_ui_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} — API",
                               swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs/assets/swagger-ui.css",
                               swagger_favicon_url="/docs/assets/favicon.png",
                               swagger_ui_parameters={"validatorUrl": None})
    page.headers["Content-Security-Policy"] = DOCS_POLICY
    return page


@router.get("/redoc")
async def redoc(request: Request) -> Response:
    page = get_redoc_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} — API reference",
                          redoc_js_url="/docs/assets/redoc.standalone.js",
                          redoc_favicon_url="/docs/assets/favicon.png", with_google_fonts=False)
    page.headers["Content-Security-Policy"] = DOCS_POLICY
    return page
