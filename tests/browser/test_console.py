"""The admin console in headless Chromium against a real server: sign-in, the full round trip (user, key
shown once, distill over HTTP, usage chart, audits, CSV export, revoke), hostile names, wrong keys.

Every test also checks that the page raised no Content-Security-Policy violation and no JavaScript error.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import DEMO_BOX, EXTRACTION_THRESHOLD, HOSTILE_MODEL, HOSTILE_USER, MODEL, Console, Tab

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]


def open_console(tab: Tab, console: Console) -> Any:
    page = tab.page
    response = page.goto(console.url + "/console")
    assert response is not None and response.status == 200
    return page


def sign_in(tab: Tab, console: Console, key: str | None = None) -> Any:
    page = open_console(tab, console)
    page.fill("#signin-key", key or console.admin_key)
    page.click("#signin-form button[type=submit]")
    if key is None:
        page.wait_for_selector("#nav:not([hidden])")
        page.wait_for_selector("#users-table tbody tr")
    return page


def view(page: Any, name: str, ready: str) -> None:
    page.click(f"nav button[data-view={name}]")
    page.wait_for_selector(f"#view-{name}:not([hidden])")
    page.wait_for_selector(ready)


def shot(page: Any, console: Console, name: str) -> None:
    page.screenshot(path=str(console.shots / f"console-{name}.png"), full_page=True)


def assert_clean(tab: Tab) -> None:
    assert tab.csp_violations() == []
    assert tab.errors == []
    assert tab.dialogs == []  # no alert(): nothing injected ran


def distill(base: str, api_key: str, n: int) -> httpx.Response:
    token = httpx.post(base + "/auth/token", json={"client_secret": api_key}, timeout=10)
    token.raise_for_status()
    x = np.random.default_rng(n).normal(size=(n, 1, 8, 8)).astype("float32")
    return httpx.post(
        base + "/distill-batch",
        json={"model": MODEL, "inputs": x.tolist()},
        headers={"Authorization": f"Bearer {token.json()['access_token']}"},
        timeout=30,
    )


def test_wrong_admin_key_gives_a_clear_message(tab: Tab, console: Console) -> None:
    page = sign_in(tab, console, "sdb_" + "x" * 40)
    error = page.wait_for_selector("#signin-error:not([hidden])")
    assert "not accepted" in error.inner_text()
    assert page.is_hidden("#nav")
    shot(page, console, "signin-error")

    # A valid key of a user who is not an administrator: refused with its own message.
    user = admin_post(console, "/admin/users", {"name": "plain-" + uuid.uuid4().hex[:6]})
    key = admin_post(console, f"/admin/users/{user['id']}/keys", {"scopes": [MODEL]})
    page.fill("#signin-key", key["api_key"])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-error:has-text('administrator')")
    assert page.is_hidden("#nav")
    assert tab.csp_violations() == [] and tab.errors == []


def admin_post(console: Console, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    """A call of the admin API outside the browser (setup), with the bootstrap admin's key."""
    r = httpx.post(console.url + "/auth/token", json={"client_secret": console.admin_key}, timeout=10)
    r.raise_for_status()
    auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = httpx.post(console.url + path, json=body, headers=auth, timeout=10)
    assert r.status_code == status, r.text
    return dict(r.json())


def test_full_round_trip(tab: Tab, console: Console) -> None:
    page = sign_in(tab, console)
    name = "alice-" + uuid.uuid4().hex[:6]

    # Users: create one.
    page.fill("#user-name", name)
    page.click("#user-form button[type=submit]")
    row = page.wait_for_selector(f'#users-table tbody tr[data-user="{name}"]')
    assert "active" in row.inner_text()
    user_id = row.query_selector("td").inner_text()
    shot(page, console, "users")

    # API keys: issue one with scopes, quota and expiry; the secret is shown once.
    view(page, "keys", "#key-form")
    page.select_option("#key-user", user_id)
    page.fill("#key-name", "laptop")
    page.select_option("#key-scopes", [MODEL])
    page.fill("#key-quota", "1000")
    page.fill("#key-expiry", "30")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#new-secret:not([hidden])")
    secret = page.inner_text("#new-secret-value").strip()
    assert secret.startswith("sdb_")
    assert "will not be shown again" in page.inner_text("#new-secret")
    page.click("#copy-secret")
    page.wait_for_selector("#copy-result:text-matches('copied|selected')")
    shot(page, console, "key-created")

    # After a reload the page holds nothing: signed out, and the secret appears nowhere.
    page.reload()
    page.wait_for_selector("#view-signin:not([hidden])")
    assert secret not in page.content()
    sign_in(tab, console)
    view(page, "keys", "#keys-table tbody tr")
    assert secret not in page.content()
    key_row = page.wait_for_selector(f"#keys-table tbody tr:has-text('{name}')")
    key_id = key_row.get_attribute("data-key")
    assert secret[:12] in key_row.inner_text() and "0 / 1,000" in key_row.inner_text()

    # Distill with that key over HTTP.
    r = distill(console.url, secret, 16)
    assert r.status_code == 200, r.text
    r = distill(console.url, secret, 8)
    assert r.status_code == 200, r.text

    # Usage: the chart is drawn and the key's bar shows its 24 samples of 1000.
    view(page, "usage", "#chart-requests canvas")
    bar = page.wait_for_selector(f'#quota-bars span[data-key="{key_id}"] + meter')
    assert bar.get_attribute("value") == "24" and bar.get_attribute("max") == "1000"
    assert "24 / 1,000 (2.4%)" in page.inner_text("#quota-bars")
    usage_row = page.wait_for_selector(f"#usage-table tbody tr:has-text('{name}')")
    cells = usage_row.query_selector_all("td")
    assert [c.inner_text() for c in cells[2:5]] == ["2", "2", "24"]
    # The charts plot the two requests and their 24 samples (the totals under them sum the plotted series).
    assert page.is_visible("#chart-requests .u-legend")
    assert "period: 2 /distill-batch and " in page.inner_text("#chart-requests .total")
    assert "period: 24 /distill-batch and " in page.inner_text("#chart-samples .total")
    shot(page, console, "usage")

    # Audits: the two calls appear, filtered by key; CSV export holds them.
    view(page, "audits", "#audit-form")
    page.fill("#audit-key", str(key_id))
    page.select_option("#audit-endpoint", "/distill-batch")
    page.click("#audit-form button[type=submit]")
    page.wait_for_selector("#audit-range:has-text('of 2')")
    rows = page.query_selector_all("#audits-table tbody tr")
    assert len(rows) == 2
    assert all("/distill-batch" in r.inner_text() and name in r.inner_text() for r in rows)
    assert sorted(int(r.query_selector_all("td")[7].inner_text()) for r in rows) == [8, 16]
    shot(page, console, "audits")
    with page.expect_download() as dl:
        page.click("#audit-export")
    data = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text(encoding="utf-8"))))
    assert [int(d["n_samples"]) for d in data] == [8, 16]
    assert {d["api_key_id"] for d in data} == {key_id}

    # Revoke with a confirmation: cancel first (nothing happens), then confirm.
    old = httpx.post(console.url + "/auth/token", json={"client_secret": secret}, timeout=10)
    old_token = {"Authorization": f"Bearer {old.json()['access_token']}"}
    view(page, "keys", "#keys-table tbody tr")
    page.click(f'#keys-table tbody tr[data-key="{key_id}"] button.danger')
    page.wait_for_selector("#confirm[open]")
    assert name in page.inner_text("#confirm-text")
    page.click("#confirm button[value=cancel]")
    assert distill(console.url, secret, 1).status_code == 200
    page.click(f'#keys-table tbody tr[data-key="{key_id}"] button.danger')
    page.click("#confirm-ok")
    page.wait_for_selector(f'#keys-table tbody tr[data-key="{key_id}"] .badge.bad')
    assert "revoked" in page.inner_text(f'#keys-table tbody tr[data-key="{key_id}"]')
    shot(page, console, "keys")

    # The key list of one user only.
    page.select_option("#keys-filter", user_id)
    page.wait_for_selector(f"#keys-table tbody tr:only-child[data-key='{key_id}']")

    # /distill-batch now refuses the key: no new token, and a token issued before the revocation is refused.
    assert httpx.post(console.url + "/auth/token", json={"client_secret": secret}).status_code == 401
    x = np.zeros((2, 1, 8, 8), dtype="float32").tolist()
    r = httpx.post(console.url + "/distill-batch", json={"model": MODEL, "inputs": x}, headers=old_token)
    assert r.status_code == 401

    # Disable the user from the Users page.
    view(page, "users", f'#users-table tbody tr[data-user="{name}"]')
    page.click(f'#users-table tbody tr[data-user="{name}"] button:has-text("Disable")')
    page.click("#confirm-ok")  # Disable asks first
    page.wait_for_selector(f'#users-table tbody tr[data-user="{name}"] .badge.bad:has-text("disabled")')

    # Nothing secret was kept by the browser.
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert_clean(tab)


def test_audit_paging(tab: Tab, console: Console) -> None:
    from service.db.models import QueryAudit
    from service.db.session import Database

    db = Database(console.database_url)  # 60 rows with a status no real call has, to filter on
    with db.write() as s:
        s.add_all(QueryAudit(endpoint="/predict", model=MODEL, n_samples=i, status=418) for i in range(60))
    db.dispose()
    page = sign_in(tab, console)
    view(page, "audits", "#audit-form")
    page.fill("#audit-status", "418")
    page.click("#audit-form button[type=submit]")
    page.wait_for_selector("#audit-range:has-text('rows 1 to 50 of 60')")
    assert len(page.query_selector_all("#audits-table tbody tr")) == 50
    assert page.is_disabled("#audit-prev") and page.is_enabled("#audit-next")
    page.click("#audit-next")
    page.wait_for_selector("#audit-range:has-text('rows 51 to 60 of 60')")
    samples = [
        int(r.query_selector_all("td")[7].inner_text())
        for r in page.query_selector_all("#audits-table tbody tr")
    ]
    assert samples == list(range(9, -1, -1))  # the oldest ten, newest first
    assert page.is_disabled("#audit-next")
    page.click("#audit-prev")
    page.wait_for_selector("#audit-range:has-text('rows 1 to 50 of 60')")
    assert_clean(tab)


def test_hostile_names_render_as_text(tab: Tab, console: Console) -> None:
    user = admin_post(console, "/admin/users", {"name": "carol-" + uuid.uuid4().hex[:6]})
    key_name = '"><img src=x onerror=alert(3)>'
    admin_post(console, f"/admin/users/{user['id']}/keys", {"scopes": [MODEL], "name": key_name})

    page = sign_in(tab, console)
    cell = page.wait_for_selector(f'#users-table tbody tr[data-user="{HOSTILE_USER}"] td.name')
    assert cell.inner_text() == HOSTILE_USER
    assert cell.evaluate("e => e.children.length") == 0  # a text node, not an element
    view(page, "keys", "#keys-table tbody tr")
    assert key_name in page.inner_text("#keys-table")
    view(page, "models", ".card")
    card = page.wait_for_selector(".card h3:has-text('onerror')")
    assert HOSTILE_MODEL in card.inner_text()
    # The only scripts and images are the page's own: nothing from the names became markup.
    assert page.evaluate("document.scripts.length") == 2
    assert page.evaluate("document.images.length") == 0
    page.wait_for_timeout(300)  # an injected onerror handler would have fired by now
    assert_clean(tab)


def test_models_and_extraction_views(tab: Tab, console: Console) -> None:
    # Anonymous /predict traffic: one client (this test's address) pulls 3 x 48 samples, above the threshold.
    x = np.zeros((48, 1, 8, 8), dtype="float32").tolist()
    for _ in range(3):
        assert httpx.post(console.url + "/predict", json={"model": MODEL, "inputs": x}).status_code == 200
    page = sign_in(tab, console)
    deadline = time.monotonic() + 10  # /predict audits are written in the background
    while True:
        view(page, "extraction", "#extraction-table tbody tr")
        if page.query_selector("#extraction-table tbody tr.flagged") or time.monotonic() > deadline:
            break
        page.wait_for_timeout(300)
    row = page.inner_text("#extraction-table tbody tr.flagged")
    assert "FLAGGED" in row and f"144 / {EXTRACTION_THRESHOLD}" in row
    assert "1 flagged" in page.inner_text("#extraction-rule")
    shot(page, console, "extraction")
    view(page, "models", f'.card[data-model="{MODEL}"]')
    card = page.inner_text(f'.card[data-model="{MODEL}"]')
    assert "loaded" in card and "version 1" in card
    # The test box's evaluation report: teacher and student figures, and the checks.
    report = json.loads((console.models / MODEL / "evaluation.json").read_text())
    box_plain = report["summary"]["teacher"]["box_plain"]
    assert f"{box_plain['mean']:.2f} ± {box_plain['std']:.2f}" in card
    assert "student small_cnn" in card and "leaked (best attack): stolen/retemper:4" in card
    assert "Evaluation over seeds 0, 1" in card
    assert card.count("pass") + card.count("fail") == len(report["checks"])
    if DEMO_BOX.is_dir():  # the demo box's manifest metrics, as the manifest records them
        metrics = json.loads((DEMO_BOX / "manifest.json").read_text())["metrics"]
        demo = page.inner_text(f'.card[data-model="{DEMO_BOX.name}"]')
        for key in ("plain_top1", "keyed_top1", "wrong_key_top1"):
            assert f"{metrics[key]:.2f} %" in demo
        shot(page, console, "models")
    assert_clean(tab)


def test_page_asks_again_when_the_token_expires(tab: Tab, console: Console) -> None:
    tab.page.clock.install()  # the page's timers run on a clock the test moves
    page = sign_in(tab, console)
    assert "session until" in page.inner_text("#session-expiry")
    page.clock.fast_forward(600_000)  # the token's lifetime (token_ttl_seconds=600)
    page.wait_for_selector("#view-signin:not([hidden])")
    assert "expired" in page.inner_text("#status")
    assert page.is_hidden("#nav") and page.inner_text("#users-table tbody") == ""
    assert_clean(tab)


def test_page_asks_again_when_the_admin_is_disabled(tab: Tab, console: Console) -> None:
    admin = admin_post(console, "/admin/users", {"name": "ops-" + uuid.uuid4().hex[:6], "role": "admin"})
    key = admin_post(console, f"/admin/users/{admin['id']}/keys", {"scopes": []})
    page = sign_in(tab, console, key["api_key"])
    page.wait_for_selector("#users-table tbody tr")
    admin_post(console, f"/admin/users/{admin['id']}/disable", {}, status=200)
    page.click("nav button[data-view=keys]")  # the next call answers 401
    page.wait_for_selector("#view-signin:not([hidden])")
    assert "sign in again" in page.inner_text("#status")
    assert page.inner_text("#keys-table tbody") == ""
    assert tab.csp_violations() == [] and tab.errors == []


def test_console_cannot_be_framed(tab: Tab, console: Console) -> None:
    page = tab.page
    page.goto(console.url + "/healthz")  # same origin: only the console's own headers can stop the frame
    page.evaluate(
        """url => new Promise(resolve => {
            const f = document.createElement('iframe');
            f.onload = resolve; f.src = url; document.body.append(f);
            setTimeout(resolve, 5000);
        })""",
        console.url + "/console",
    )
    assert any("frame-ancestors 'none'" in m and "blocked" in m for m in tab.messages), tab.messages
    inner = page.frames[1]
    try:
        framed = inner.evaluate("() => document.getElementById('signin-key') !== null")
    except Exception:  # an error page of another origin: not readable, so not the console either
        framed = False
    assert not framed


def test_a_key_is_issued_for_a_chosen_user_and_an_admin_key_is_confirmed(tab: Tab, console: Console) -> None:
    # The form used to preselect `admin (#1)` and return to it after every key: issued with the defaults, a
    # key was a full admin credential.
    name = "bob-" + uuid.uuid4().hex[:6]
    user = admin_post(console, "/admin/users", {"name": name})
    page = sign_in(tab, console)
    view(page, "keys", "#key-form")
    assert page.input_value("#key-user") == ""
    page.select_option("#key-scopes", [MODEL])
    page.click("#key-form button[type=submit]")  # no user chosen: nothing is issued
    assert page.is_hidden("#new-secret") and page.is_hidden("#confirm")

    admin_id = page.eval_on_selector(
        "#key-user", "s => Array.from(s.options).find((o) => o.textContent.includes(', admin')).value"
    )
    page.select_option("#key-user", admin_id)  # the bootstrap administrator
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#confirm[open]")
    assert "administrator" in page.inner_text("#confirm-text")
    page.click("#confirm button[value=cancel]")
    assert page.is_hidden("#new-secret")

    page.select_option("#key-user", str(user["id"]))
    page.select_option("#key-scopes", [MODEL])
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#new-secret:not([hidden])")
    assert page.is_hidden("#confirm") and name in page.inner_text("#new-secret-about")
    assert page.input_value("#key-user") == ""  # back to no user, not to the admin
    # the scopes are picked from the served models (and `*`), not typed
    options = page.eval_on_selector_all("#key-scopes option", "os => os.map(o => o.value)")
    served = httpx.get(console.url + "/readyz", timeout=10).json()["models"]
    assert set(options) == {"*", *served} and MODEL in served, options
    assert_clean(tab)


def test_disable_asks_first_and_user_name_errors_are_readable(tab: Tab, console: Console) -> None:
    name = "carol-" + uuid.uuid4().hex[:6]
    admin_post(console, "/admin/users", {"name": name})
    page = sign_in(tab, console)
    row = f'#users-table tbody tr[data-user="{name}"]'
    page.wait_for_selector(row)
    page.click(f"{row} button:has-text('Disable')")
    page.wait_for_selector("#confirm[open]")
    assert name in page.inner_text("#confirm-text")
    page.click("#confirm button[value=cancel]")
    assert "active" in page.inner_text(row)
    page.click(f"{row} button:has-text('Disable')")
    page.click("#confirm-ok")
    page.wait_for_selector(f"{row}:has-text('disabled')")

    page.fill("#user-name", "no spaces allowed")
    page.click("#user-form button[type=submit]")
    status = page.wait_for_selector("#status:has-text('user name')").inner_text()
    assert "^" not in status and "pattern" not in status, status  # words, not the regular expression
    assert_clean(tab)


def test_small_screen_empty_audits_banner_and_key_columns(browser: Any, console: Console) -> None:
    # 390x844 (a phone): tables scroll inside the page instead of pushing row buttons off it
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(15_000)
    t = Tab(page)
    try:
        page = sign_in(t, console)
        view(page, "keys", "#keys-table tbody tr")
        headers = page.eval_on_selector_all("#keys-table th", "hs => hs.map(h => h.textContent)")
        assert "created" in headers and "last used" in headers, headers
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide at 390"
        button = page.query_selector("#keys-table tbody tr button")
        if button is not None:  # a row button can be scrolled to and is not cut off by the page
            button.scroll_into_view_if_needed()
            box = button.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box

        view(page, "audits", "#audit-form")
        page.click("#audit-export")
        page.wait_for_selector("#status:has-text('Exported')")
        page.fill("#audit-since", "2001-01-01T00:00")
        page.fill("#audit-until", "2001-01-02T00:00")
        page.click("#audit-form button[type=submit]")
        page.wait_for_selector("#audit-range:has-text('No audit row')")
        assert "Exported" not in (page.inner_text("#status") if page.is_visible("#status") else "")
    finally:
        context.close()


def test_trace_page(tab: Tab, console: Console) -> None:
    """The Trace page runs POST /admin/trace against a suspect on loopback and lists every issued watermark;
    a host outside SDB_TRACE_ALLOWED_HOSTS shows the service's refusal. The keys page shows watermark ids."""
    from tests._support.admin import create_user_and_key
    from tests._support.suspects import predict_endpoint

    key = create_user_and_key(console.url, scopes=[MODEL], name=f"tracee-{uuid.uuid4().hex[:6]}")
    page = sign_in(tab, console)
    view(page, "keys", f"#keys-table tbody tr[data-key='{key.key_id}']")
    assert key.key_info["watermark_id"] in page.inner_text(f"#keys-table tbody tr[data-key='{key.key_id}']")
    view(page, "trace", "#trace-form")
    page.wait_for_selector(f"#trace-model option[value='{MODEL}']", state="attached")
    page.select_option("#trace-model", MODEL)
    page.fill("#trace-url", "http://localhost:9/predict")
    page.fill("#trace-probes", "500")
    page.fill("#trace-decoys", "100")
    page.click("#trace-form button[type=submit]")
    page.wait_for_selector("#status:has-text('is not in SDB_TRACE_ALLOWED_HOSTS')")
    with predict_endpoint(lambda x: np.full((len(x), 10), 0.1)) as url:  # knows nothing: no evidence
        page.fill("#trace-url", url)
        page.click("#trace-form button[type=submit]")
        page.wait_for_selector(f"#trace-table tbody tr[data-key='{key.key_id}']", timeout=120_000)
    row = page.inner_text(f"#trace-table tbody tr[data-key='{key.key_id}']")
    assert "no evidence" in row and key.key_info["watermark_id"] in row
    cells = page.locator(f"#trace-table tbody tr[data-key='{key.key_id}'] td").all_inner_texts()
    column = dict(zip(page.locator("#trace-table thead th").all_inner_texts(), cells, strict=True))
    assert float(column["z"]) == max(float(column["z top-1"]), float(column["z pattern"]))
    assert "own images" in page.inner_text("#trace-table thead")  # this key sent none: the probe images
    assert "watermarks tested" in page.inner_text("#trace-summary")
    shot(page, console, "trace")
    assert_clean(tab)


def test_audits_filter_by_names_and_show_who_called(tab: Tab, console: Console) -> None:
    # An authenticated call is shown by its user and key (not by its network client id `anon-…`), and the
    # audits filter by user / key name as well as by #id.
    uname, kname = "bob-" + uuid.uuid4().hex[:6], "deploy-" + uuid.uuid4().hex[:6]
    user = admin_post(console, "/admin/users", {"name": uname, "role": "user"})
    key = admin_post(console, f"/admin/users/{user['id']}/keys", {"scopes": [MODEL], "name": kname})
    assert distill(console.url, key["api_key"], 3).status_code == 200
    page = sign_in(tab, console)
    view(page, "audits", "#audit-form")
    for field, value in (("#audit-user", uname), ("#audit-key", kname), ("#audit-key", f"#{key['id']}")):
        page.fill("#audit-user", "")
        page.fill("#audit-key", "")
        page.fill(field, value)
        page.click("#audit-form button[type=submit]")
        page.wait_for_selector("#audit-range:has-text('rows 1 to 1 of 1')")
        cells = [c.inner_text() for c in page.query_selector_all("#audits-table tbody tr td")]
        assert cells[4] == f"{uname} (#{user['id']})" and cells[5] == f"{kname} (#{key['id']})", cells
        assert cells[6] == f"{uname} · {kname}", cells  # the client column, not anon-…
    page.fill("#audit-key", "")
    page.fill("#audit-user", "nobody-" + uuid.uuid4().hex[:6])
    page.click("#audit-form button[type=submit]")
    page.wait_for_selector("#status:has-text('no user named')")
    assert_clean(tab)


def test_charts_are_in_utc_whatever_the_browser_time_zone(browser: Any, console: Console) -> None:
    # Kathmandu is UTC+05:45: a chart in local time would label the hourly buckets hh:45.
    context = browser.new_context(viewport={"width": 1280, "height": 860}, timezone_id="Asia/Kathmandu")
    page = context.new_page()
    page.set_default_timeout(15_000)
    t = Tab(page)
    try:
        page = sign_in(t, console)
        assert page.evaluate("new Date().getTimezoneOffset()") == -345  # the browser really is in +05:45
        view(page, "usage", "#chart-requests canvas")
        now = time.time()
        over = page.query_selector("#chart-requests .u-over")
        assert over is not None
        box = over.bounding_box()
        assert box is not None
        over.hover(position={"x": box["width"] - 1, "y": box["height"] / 2})  # the newest hourly bucket
        label = page.inner_text("#chart-requests .u-legend .u-series:first-child .u-value").strip()

        def fmt(ts: float) -> str:  # uPlot's legend date format, {YYYY}-{MM}-{DD} {h}:{mm}{aa}, in UTC
            d = datetime.fromtimestamp(ts, UTC)
            return f"{d:%Y-%m-%d} {d.hour % 12 or 12}:{d:%M}{'am' if d.hour < 12 else 'pm'}"

        last = now // 3600 * 3600
        assert label in {fmt(last), fmt(last - 3600), fmt(last + 3600)}, label
        assert_clean(t)
    finally:
        context.close()
