"""The console's static files: served with a strict CSP and anti-framing headers, nothing inline, only the
listed assets, off with SDB_CONSOLE=false, the vendored library as documented, and only the public API
used. (The page itself runs in tests/browser.)
"""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from starlette.routing import Route

from service.main import create_app
from service.routes.console import ASSETS, CONSOLE_DIR

JS = (CONSOLE_DIR / "console.js").read_text()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.script_text.append(data)


def _csp(headers: Any) -> dict[str, str]:
    return {
        d.split()[0]: " ".join(d.split()[1:])
        for d in (p.strip() for p in headers["content-security-policy"].split(";"))
        if d
    }


def test_page_has_strict_csp_and_no_inline_code(client: TestClient) -> None:
    r = client.get("/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = _csp(r.headers)
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'"
    assert not any("unsafe" in v or "http" in v or "*" in v for v in csp.values())
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    parsed = _Tags()
    parsed.feed(r.text)
    assert parsed.script_text == []  # no inline script
    for tag, attrs in parsed.tags:
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)  # no inline handler
        assert "style" not in attrs and tag != "style"
        for url_attr in ("src", "href"):
            url = attrs.get(url_attr)
            if url is not None:
                assert not re.match(r"^([a-z]+:)?//", url), url  # nothing from another origin
    scripts = [a["src"] for t, a in parsed.tags if t == "script"]
    styles = [a["href"] for t, a in parsed.tags if t == "link" and a.get("rel") == "stylesheet"]
    assert len(scripts) == 2 and len(styles) == 2
    for ref in scripts + styles:
        assert ref is not None
        asset = client.get("/" + ref)
        assert asset.status_code == 200, ref
        assert "content-security-policy" in asset.headers
        kind = "javascript" if ref.endswith(".js") else "css"
        assert kind in asset.headers["content-type"]


def test_only_listed_assets_are_served(client: TestClient) -> None:
    for name in ASSETS:
        assert client.get(f"/console/{name}").status_code == 200, name
    for bad in ("index.html", "%2e%2e/config.py", "..%2fconfig.py", "vendor/uplot/VENDORED.md", "x"):
        assert client.get(f"/console/{bad}").status_code == 404, bad


def test_console_can_be_turned_off(make_settings: Any) -> None:
    app = create_app(make_settings(console=False))
    assert not any(isinstance(r, Route) and r.path.startswith("/console") for r in app.routes)
    with TestClient(app) as c:
        assert c.get("/console").status_code == 404
        assert c.get("/console/console.js").status_code == 404
        assert c.get("/healthz").status_code == 200


def test_vendored_library_matches_its_record() -> None:
    vendor = CONSOLE_DIR / "vendor" / "uplot"
    record = (vendor / "VENDORED.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| `([0-9a-f]{64})` \|$", record, re.M)
    assert {name for name, _ in rows} == {p.name for p in vendor.iterdir() if p.name != "VENDORED.md"}
    for name, digest in rows:
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    version = re.search(r"uPlot (\d+\.\d+\.\d+)", record)
    assert version is not None
    assert f"(v{version.group(1)})" in (vendor / "uPlot.iife.min.js").read_text()[:200]
    assert "MIT License" in (vendor / "LICENSE").read_text()


def test_script_never_writes_markup_or_stores_secrets() -> None:
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert banned not in JS, banned
    for banned in ("localStorage", "sessionStorage", "document.cookie", "indexedDB"):
        assert banned not in JS, banned


def test_script_calls_only_the_public_api(app: Any) -> None:
    """Every path the console fetches is a documented route of the public API (OpenAPI schema)."""
    called = set(re.findall(r"""["`]((?:admin|auth)/[^"`?]*)""", JS))
    assert "auth/token" in called and len(called) >= 10
    documented = {re.sub(r"\{[^}]+\}", "ID", p) for p in app.openapi()["paths"]}
    for path in called:
        assert "/" + re.sub(r"\$\{[^}]+\}", "ID", path) in documented, path


def test_page_and_script_agree_on_element_ids() -> None:
    html = (CONSOLE_DIR / "index.html").read_text()
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    used = set(re.findall(r"""\$\("([^"]+)"\)""", JS))
    assert used and used <= ids, used - ids
    assert Path(CONSOLE_DIR / "console.css").is_file()


def test_a_trailing_slash_leads_to_the_console(client: TestClient) -> None:
    # /console/ used to be a JSON 404; the page's relative asset URLs need /console, so redirect there
    r = client.get("/console/", follow_redirects=False)
    assert r.status_code in (301, 307, 308) and r.headers["location"] == "/console", r.text
    assert client.get("/console/").status_code == 200
    assert client.get("/console/nothing-here").status_code == 404
