"""``/docs`` and ``/redoc`` work offline (issue 16, item 3): the pages name only assets the server
itself serves, and those assets are there (JavaScript and CSS, not an error page).

Fast: the real app over the tiny text-hash model, in-process (TestClient).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.lifecycle import InMemoryModelSource
from tests.conftest_serving import TextHashRecommender, world  # noqa: F401  (fixture)

LOCAL = "http://127.0.0.1"
_REFS = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']"""  # <script src>, <link href>
                   r"""|url\s*:\s*["']([^"']+)["']"""  # SwaggerUIBundle({url: ...}), Redoc spec-url
                   r"""|['"](https?://[^'"]+)['"]""")  # any other absolute URL in the page


@pytest.fixture
def client(world):
    settings, _, _ = world
    source = InMemoryModelSource(TextHashRecommender(), "1")
    app = create_app(settings, model_source=source, start_background=False)
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def referenced_urls(html: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in _REFS.finditer(html)]


@pytest.mark.parametrize("page, kinds", [
    ("/docs", {"javascript", "css"}),
    ("/redoc", {"javascript"}),
])
def test_api_docs_pages_load_only_local_assets_that_the_server_serves(client, page, kinds):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = referenced_urls(r.text)
    assert urls, r.text
    remote = [u for u in urls if urlsplit(u).scheme or u.startswith("//")]
    assert not remote, f"{page} loads assets from the internet: {remote}"
    served = set()
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        ctype = asset.headers["content-type"]
        if url.endswith(".js"):
            assert "javascript" in ctype and len(asset.content) > 10_000, url
            served.add("javascript")
        elif url.endswith(".css"):
            assert ctype.startswith("text/css") and len(asset.content) > 10_000, url
            served.add("css")
    assert kinds <= served


def test_api_docs_pages_render_the_apps_own_openapi_document(client):
    assert "/openapi.json" in client.get("/docs").text and "/openapi.json" in client.get("/redoc").text
    assert client.get("/openapi.json").json()["info"]["title"] == "recloop serving"
    assert client.get("/docs/oauth2-redirect").status_code == 200
