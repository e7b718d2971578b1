"""The interactive API pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served from local files.

FastAPI's default pages load their JavaScript and CSS from a CDN, so on a machine without internet
access ``/docs`` renders blank. The assets here come from the ``fastapi-offline`` package (a PyPI
wheel that ships ``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js`` and a
favicon; nothing is vendored into this repository) and are mounted under ``/docs-assets``. Build
the app with ``docs_url=None, redoc_url=None`` and call :func:`mount_api_docs`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path:
    """The folder of the installed ``fastapi-offline`` package that holds the Swagger UI and ReDoc files."""
    folder = Path(str(files("fastapi_offline") / "static"))
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline at {folder} lacks {missing}: reinstall it "
                           "(pip install fastapi-offline)")
    return folder


def mount_api_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add ``docs_url`` (Swagger UI), its OAuth2 redirect page and ``redoc_url`` (ReDoc), all with local
    assets."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    title = app.title
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = f"{docs_url}/oauth2-redirect"

    @app.get(docs_url, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{title} - Swagger UI",
                                   oauth2_redirect_url=oauth2_redirect_url,
                                   swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS_URL}/favicon.png")

    @app.get(oauth2_redirect_url, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{title} - ReDoc",
                              redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False)
