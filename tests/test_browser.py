"""The dashboard in a real browser: ``streamlit run`` headless, driven by Playwright on Debian's Chromium.

Walks Home -> Perturb -> Map -> Genes -> Enrichment, checks what each page shows, and saves a
screenshot of each under ``screenshots/`` (git-ignored). The browser is the system's
``/usr/bin/chromium``; nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from enrichr_server import closed_port_url

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'
STARTUP_S = 90
STEP_MS = 90_000  # a page's first run imports torch or fits a t-SNE map on 2 shared cores

pytestmark = pytest.mark.browser

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        "/usr/bin/chromium is not installed (apt-get install chromium); CI installs it and runs this test",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_models_dir, tmp_path_factory):
    """``streamlit run streamlit_app.py`` on a free port of 127.0.0.1; always stopped afterwards."""
    root = tmp_path_factory.mktemp("browser_models")
    for p in Path(demo_models_dir).iterdir():
        if p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, root / p.name)
    port = _free_port()
    log = tmp_path_factory.mktemp("browser_log") / "streamlit.log"
    env = dict(
        os.environ,
        TSPG_MODELS_DIR=str(root),
        TSPG_CACHE_DIR=str(tmp_path_factory.mktemp("browser_cache")),
        STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
        TSPG_ENRICHR_URL=closed_port_url(),  # Enrichr refuses at once: the offline fallback, on any machine
    )
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "streamlit_app.py",
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--server.fileWatcherType",
        "none",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"streamlit did not answer within {STARTUP_S} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            pg = context.new_page()
            pg.set_default_timeout(STEP_MS)
            yield pg
        finally:
            browser.close()


def settle(page, heading: str) -> None:
    """Wait for the page's heading, then for the app's own 'script finished' state."""
    page.get_by_role("heading", name=heading, exact=True).first.wait_for(state="visible")
    page.wait_for_selector(READY, state="attached")
    page.wait_for_timeout(300)  # a rerun may start right after (a widget settling)
    page.wait_for_selector(READY, state="attached")


def go(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=title).first.click()
    settle(page, title)


def shot(page, name: str) -> None:
    """A screenshot of the whole page (Streamlit scrolls inside its main block, so grow the viewport)."""
    SHOTS.mkdir(exist_ok=True)
    size = page.viewport_size
    height = page.evaluate(
        "() => document.querySelector('[data-testid=\"stMainBlockContainer\"]').scrollHeight"
    )
    page.set_viewport_size(
        {"width": size["width"], "height": min(max(size["height"], height + 120), 6000)}
    )
    page.wait_for_timeout(500)  # charts re-fit the wider or taller frame
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def chart_drawn(page, n: int = 1) -> None:
    """At least ``n`` Vega charts drawn (a canvas or an svg inside each)."""
    charts = page.locator('[data-testid="stVegaLiteChart"]')
    charts.nth(n - 1).locator("canvas, svg").first.wait_for(state="visible")


# Opacity of each point of a map chart drawn as SVG, by its class: {class: [opacity, ...]}.
# Vega writes each point's tooltip fields into its aria-label ("x: ..; class: ..; ...").
MAP_OPACITIES = """chart => {
  const out = {};
  for (const mark of chart.querySelectorAll('g.role-mark path[role="graphics-symbol"]')) {
    const fields = Object.fromEntries((mark.getAttribute('aria-label') || '').split('; ').map(f => f.split(': ')));
    if (fields['class'] === undefined) continue;
    (out[fields['class']] ??= []).push(parseFloat(mark.getAttribute('opacity') ?? '1'));
  }
  return out;
}"""


def legend_click_highlights(page, cls: str) -> None:
    """Click ``cls`` in the map's legend: its points stay opaque, every other class fades."""
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    assert chart.locator("svg.marks").count() == 1, (
        "the map is not drawn as SVG: its points cannot be read"
    )
    before = chart.evaluate(MAP_OPACITIES)
    assert cls in before and len(before) > 2 and all(o > 0.5 for v in before.values() for o in v)
    chart.locator("g.role-legend-label text").filter(
        has_text=re.compile(rf"^{re.escape(cls)}$")
    ).click()
    chart.element_handle().wait_for_selector('g.role-mark path[opacity="0.08"]', state="attached")
    after = chart.evaluate(MAP_OPACITIES)
    assert all(o > 0.5 for o in after[cls])
    assert all(o < 0.5 for c, v in after.items() if c != cls for o in v)
    assert {c: len(v) for c, v in after.items()} == {
        c: len(v) for c, v in before.items()
    }  # same points, faded


def test_walk_home_perturb_map_genes_enrichment(page, server):
    page.goto(server)
    settle(page, "TSPG Explorer")
    assert (
        page.get_by_test_id("stMetric")
        .filter(has_text="Target")
        .first.inner_text()
        .endswith("CD14+ Monocyte")
    )
    assert page.get_by_text("Perturbation accuracy").first.is_visible()
    sidebar = page.get_by_test_id("stSidebar")
    bundle_box = sidebar.get_by_role("combobox", name="Bundle")
    assert "pbmc68k-reduced-cd14-monocyte" in bundle_box.input_value()
    shot(page, "home")

    go(page, "Perturb")
    page.get_by_text("20 samples → CD14+ Monocyte").wait_for()
    assert page.get_by_test_id("stMetric").filter(has_text="Called the target after").count() == 1
    chart_drawn(page)
    assert page.get_by_role("heading", name="Perturbation heatmap").is_visible()
    with page.expect_download() as dl:  # built on click, in the server's download thread
        page.get_by_role("button", name="Perturbed samples (.h5ad)").click()
    h5ad = dl.value.path()
    assert Path(h5ad).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    with page.expect_download() as dl:
        page.get_by_test_id("stDownloadButton").filter(has_text="SVG").first.click()
    assert (
        dl.value.suggested_filename.startswith("heatmap-")
        and b"<svg" in Path(dl.value.path()).read_bytes()[:2000]
    )
    shot(page, "perturb")

    go(page, "Map")
    chart_drawn(page)
    page.get_by_text("placed on the fixed reference map").wait_for()
    shot(page, "map")
    legend_click_highlights(page, "CD19+ B")

    go(page, "Genes")
    chart_drawn(page, 3)  # gene frequency, the gene on the map, the gene per class
    assert page.get_by_text("Unique up genes").first.is_visible()
    shot(page, "genes")

    go(page, "Enrichment")
    page.get_by_text("Backend: offline").wait_for()
    assert page.get_by_text("Enrichr could not be used").first.is_visible()
    chart_drawn(page)
    shot(page, "enrichment")
    assert (
        "pbmc68k-reduced-cd14-monocyte" in bundle_box.input_value()
    )  # the choice held across pages
