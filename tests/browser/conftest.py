"""Browser test fixtures: a real `sdb serve` process (SQLite) and headless Chromium driven by Playwright.

The browser is Debian's `chromium` (SDB_CHROMIUM, default /usr/bin/chromium; Playwright's own browser
downloads are not used). Without it, or without the playwright package, the tests are skipped locally and
fail under CI (CI=true), where scripts/test.sh installs both. Screenshots of every console page go to
SDB_SCREENSHOT_DIR when it is set (README images: `SDB_SCREENSHOT_DIR=docs/console`), else to a pytest
temporary directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests._support.db import run_migrations
from tests._support.evaluation import write_evaluation_report
from tests._support.server import ADMIN_TOKEN, REPO, Server, base_env

CHROMIUM = os.environ.get("SDB_CHROMIUM", "/usr/bin/chromium")
MODEL = "alpha"
# A model whose name is markup: the console must show it as text.
HOSTILE_MODEL = "<img src=x onerror=alert(2)>"
HOSTILE_USER = "<script>alert(1)</script>"
DEMO_BOX = REPO / "models" / "digits-demo"
EXTRACTION_THRESHOLD = 100  # samples per window: low, so that one test client gets flagged


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: scripts/test.sh)")
    pytest.skip(reason)


@dataclass
class Console:
    url: str
    database_url: str
    models: Path
    admin_key: str = ADMIN_TOKEN
    shots: Path = field(default_factory=Path)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    from sdb_core.artifact import make_test_box
    from sdb_core.watermark import CONFIG_KEY, WatermarkConfig
    from service.crud import accounts
    from service.db.session import Database

    work = tmp_path_factory.mktemp("console-server")
    models = work / "models"
    models.mkdir()
    # a box made today records its watermark configuration: both channels (the Trace page shows each one's z)
    marks = {CONFIG_KEY: asdict(WatermarkConfig())}
    write_evaluation_report(make_test_box(models, name=MODEL, seed=3, extra=marks))
    if DEMO_BOX.is_dir():  # the shipped demo box: real manifest metrics on the Models page
        (models / DEMO_BOX.name).symlink_to(DEMO_BOX, target_is_directory=True)
    make_test_box(models, name=HOSTILE_MODEL, dir_name="hostile", seed=4)
    db_url = f"sqlite:///{work / 'sdb.db'}"
    run_migrations(db_url)
    # The admin API refuses such a name; a row written by an older version or by hand must still be safe.
    db = Database(db_url)
    with db.write() as s:
        accounts.create_user(s, HOSTILE_USER, "user")
    db.dispose()
    env = base_env(
        models,
        db_url,
        predict_rate_per_minute=0,
        distill_rate_per_minute=0,
        calibrate_forward_batch="false",
        default_model=MODEL,
        token_ttl_seconds=600,
        extraction_sample_threshold=EXTRACTION_THRESHOLD,
        trace_allowed_hosts='["127.0.0.1"]',  # the Trace page's suspect runs on loopback
        trace_probe_data="digits",
    )
    srv = Server(env, work / "server.log", ready_path="/readyz")
    shots = Path(os.environ.get("SDB_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        yield Console(srv.start(wait_s=90).url, db_url, models, shots=shots)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Tab:
    """A page plus what it reported: console messages, page errors and JavaScript dialogs (alert)."""

    page: Any
    messages: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def csp_violations(self) -> list[str]:
        return [m for m in self.messages if "Content Security Policy" in m]


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    t = Tab(page)
    page.on("console", lambda m: t.messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: t.errors.append(str(e)))

    def on_dialog(d: Any) -> None:
        t.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    try:
        yield t
    finally:
        context.close()
