"""The dashboard in a real browser: ``streamlit run`` headless, driven by Playwright on Debian's Chromium.

Walks Home -> Perturb -> Map -> Genes -> Enrichment at 1280 x 800 (the map also at 2560
wide), checks what each page shows and does (no label cut, the heatmap's colours, picking
samples, N clamped, the view kept over a reload, the map's moves and legends, a bad upload),
and saves a screenshot of each under ``screenshots/`` (git-ignored). The browser is the system's
``/usr/bin/chromium``; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlparse

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


@contextmanager
def streamlit_server(models: Path, tmp_path_factory) -> Iterator[str]:
    """``streamlit run streamlit_app.py`` on a free port of 127.0.0.1 over ``models``; its
    URL; always stopped afterwards."""
    port = _free_port()
    log = tmp_path_factory.mktemp("browser_log") / "streamlit.log"
    env = dict(
        os.environ,
        TSPG_MODELS_DIR=str(models),
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
def server(demo_models_dir, tmp_path_factory):
    """The dashboard over the demo bundle and, beside it, a damaged copy: (URL, models folder)."""
    root = tmp_path_factory.mktemp("browser_models")
    for p in Path(demo_models_dir).iterdir():
        if p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, root / p.name)
            shutil.copytree(p, bad := root / "a-damaged-copy")  # beside it, a damaged bundle
            weights = bad / "generator.safetensors"
            weights.write_bytes(weights.read_bytes()[:-64])
    with streamlit_server(root, tmp_path_factory) as url:
        yield url, root


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
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


def query(page) -> dict[str, list[str]]:
    return parse_qs(urlparse(page.url).query, keep_blank_values=True)


# Texts cut by their box (an ellipsis): leaf elements that hide overflow, and inputs.
CUT_TEXT = """() => [...document.querySelectorAll('[data-testid="stSidebar"] *, [data-testid="stMain"] *')]
  .filter(e => e.children.length === 0 && e.textContent.trim() && e.clientWidth > 0
      && e.scrollWidth > e.clientWidth + 1 && ['hidden', 'clip'].includes(getComputedStyle(e).overflowX))
  .map(e => e.textContent.trim())
  .concat([...document.querySelectorAll('[data-testid="stSidebar"] input, [data-testid="stMain"] input')]
    .filter(e => e.value && e.scrollWidth > e.clientWidth + 1).map(e => e.value))"""


def nothing_cut(page) -> None:
    assert page.evaluate(CUT_TEXT) == []


def chart_fills_the_page(page, chart) -> None:
    """The chart is as wide as the main column (its content box)."""
    width = chart.evaluate("c => c.getBoundingClientRect().width")
    inner = page.evaluate(
        """() => { const m = document.querySelector('[data-testid="stMainBlockContainer"]');
        const s = getComputedStyle(m);
        return m.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight); }"""
    )
    assert width >= 0.95 * inner, (width, inner)


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


# Opacity of each point of a map chart drawn as SVG, by a field (class or kind):
# {value: [opacity, ...]}. Vega writes each point's tooltip fields into its aria-label
# ("x: ..; class: ..; ..."); moves are lines, not points.
MAP_OPACITIES = """(chart, field) => {
  const out = {};
  for (const mark of chart.querySelectorAll('g.role-mark path[role="graphics-symbol"]')) {
    const fields = Object.fromEntries((mark.getAttribute('aria-label') || '').split('; ').map(f => f.split(': ')));
    if (fields[field] === undefined) continue;
    (out[fields[field]] ??= []).push(parseFloat(mark.getAttribute('opacity') ?? '1'));
  }
  return out;
}"""

# Fill colours of the heatmap's P cells of one direction: ["rgb(..)", ...]
P_FILLS = """(chart, direction) => [...chart.querySelectorAll('g.role-mark path[role="graphics-symbol"]')]
  .filter(m => (m.getAttribute('aria-label') || '').includes('direction: ' + direction)
            && (m.getAttribute('aria-label') || '').includes('column: P'))
  .map(m => m.getAttribute('fill'))"""


def whiteness(fill: str) -> float:
    """0 (a saturated colour) .. 1 (white), from "rgb(r, g, b)" or "#rrggbb"."""
    if fill.startswith("#"):
        rgb = [int(fill[i : i + 2], 16) for i in (1, 3, 5)]
    else:
        rgb = [float(v) for v in re.findall(r"[\d.]+", fill)[:3]]
    return min(rgb) / 255


def legend_click_highlights(page, cls: str) -> None:
    """Click ``cls`` in the map's legend: its points stay opaque, every other class fades."""
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    assert chart.locator("svg.marks").count() == 1, (
        "the map is not drawn as SVG: its points cannot be read"
    )
    before = chart.evaluate(MAP_OPACITIES, "class")
    assert cls in before and len(before) > 2 and all(o > 0.5 for v in before.values() for o in v)
    page.wait_for_timeout(800)  # no double click with an earlier click
    chart.locator("g.role-legend-label text").filter(
        has_text=re.compile(rf"^{re.escape(cls)}$")
    ).click()
    chart.element_handle().wait_for_selector('g.role-mark path[opacity="0.08"]', state="attached")
    after = chart.evaluate(MAP_OPACITIES, "class")
    assert all(o > 0.5 for o in after[cls]), after[cls]
    assert all(o < 0.5 for c, v in after.items() if c != cls for o in v)
    assert {c: len(v) for c, v in after.items()} == {
        c: len(v) for c, v in before.items()
    }  # same points, faded


def legend_click_isolates_the_perturbed(page) -> None:
    """Click "selected, after (perturbed)" in the map's "sample" legend: only they stay opaque."""
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    chart.locator("g.role-legend-label text").filter(has_text="selected, after (perturbed)").click()
    chart.element_handle().wait_for_selector('g.role-mark path[opacity="0.08"]', state="attached")
    kinds = chart.evaluate(MAP_OPACITIES, "kind")
    assert set(kinds) == {"real", "before", "perturbed"}
    assert all(o > 0.5 for o in kinds["perturbed"])
    assert all(o < 0.5 for k in ("real", "before") for o in kinds[k])
    # shift-click takes the entry out of the pick again: every point opaque (not so soon
    # after the first click that the two make a double click)
    page.wait_for_timeout(800)
    chart.locator("g.role-legend-label text").filter(has_text="selected, after (perturbed)").click(
        modifiers=["Shift"]
    )
    chart.element_handle().wait_for_selector('g.role-mark path[opacity="0.08"]', state="detached")
    assert all(o > 0.5 for v in chart.evaluate(MAP_OPACITIES, "kind").values() for o in v)


def heldout_prefix(server_models: Path) -> str:
    """A prefix that at least two held-out non-target samples share (for typing an id)."""
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo

    manifest = json.loads(next(server_models.glob("*cd14*/manifest.json")).read_text())
    labels = demo().obs[DEMO_LABEL_KEY].astype(str)
    ids = sorted(s for s in manifest["split"]["test"] if labels[s] != DEMO_TARGET)
    for n in range(6, 1, -1):
        prefixes = [s[:n] for s in ids]
        shared = [p for p in dict.fromkeys(prefixes) if prefixes.count(p) >= 2]
        if shared:
            return shared[0]
    raise AssertionError("no shared prefix")


def test_walk_home_perturb_map_genes_enrichment(page, server):
    url, models_root = server
    page.goto(url)
    # the first run of a new server shows the title and a spinner at once, not a blank page
    page.get_by_text("Starting TSPG Explorer").first.wait_for(state="visible")
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
    assert sidebar.get_by_text("1 unreadable bundle(s)").is_visible()  # the damaged copy
    nothing_cut(page)  # 1280 x 800: the bundle's name, every label whole
    assert query(page)["bundle"] == ["pbmc68k-reduced-cd14-monocyte"]
    shot(page, "home")

    go(page, "Perturb")
    page.get_by_text("20 samples → CD14+ Monocyte").wait_for()
    assert page.get_by_test_id("stMetric").filter(has_text="Called the target after").count() == 1
    chart_drawn(page)
    assert page.get_by_role("heading", name="Perturbation heatmap").is_visible()
    heat = page.locator('[data-testid="stVegaLiteChart"]').first
    down = heat.evaluate(P_FILLS, "down")
    assert len(down) == 20 and max(whiteness(f) for f in down) < 0.75  # every down gene blue
    nothing_cut(page)
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

    # N above the pool: clamped, with a message; the view is in the URL and F5 keeps it
    n_box = page.get_by_role("spinbutton", name="N samples")
    n_box.fill("300")
    n_box.press("Enter")
    page.get_by_text("N = 300 is more than the").wait_for()
    settle(page, "Perturb")
    clamped = n_box.input_value()
    assert 20 < int(clamped) < 300
    assert query(page)["n"] == [clamped]
    page.reload()
    settle(page, "Perturb")
    assert page.get_by_role("spinbutton", name="N samples").input_value() == clamped
    page.get_by_text(f"{clamped} samples → CD14+ Monocyte").wait_for()

    # by id: a prefix and Enter picks one sample, never every match
    page.get_by_text("By sample id").click()
    settle(page, "Perturb")
    ids = page.get_by_role("combobox", name="Sample ids")
    ids.click()
    ids.fill(heldout_prefix(models_root))
    ids.press("Enter")
    page.get_by_text("1 samples → CD14+ Monocyte").wait_for()
    ids.press("Escape")  # close the list (while open, the rest of the page is hidden from roles)
    settle(page, "Perturb")
    assert len(query(page)["ids"]) == 1

    # by class: clearing the pick leaves it empty (no snapping back to a class)
    page.get_by_text("By source class").click()
    page.get_by_text("Source classes").wait_for()
    settle(page, "Perturb")
    picked = page.get_by_test_id("stButtonGroup").locator('button[aria-pressed="true"]')
    picked.first.wait_for()
    assert picked.count() == 1
    picked.first.click()
    page.get_by_text("No samples selected.").wait_for()
    settle(page, "Perturb")
    assert page.get_by_test_id("stButtonGroup").locator('button[aria-pressed="true"]').count() == 0
    assert query(page)["classes"] == [""]

    # 100 genes a direction: blocks side by side, rows kept short, legend at the top
    page.goto(f"{url}/perturb?k=100")
    settle(page, "Perturb")
    chart_drawn(page)
    heat = page.locator('[data-testid="stVegaLiteChart"]').first
    box = heat.bounding_box()
    assert box["height"] < 1600, box
    legend = heat.locator("g.role-legend").first.bounding_box()
    assert legend["y"] - box["y"] < 250  # the legend is at the top, not 4,000 px below
    shot(page, "perturb-k100")

    page.goto(url)  # back to the default view
    settle(page, "TSPG Explorer")
    go(page, "Map")
    chart_drawn(page)
    page.get_by_text("placed on the fixed reference map").wait_for()
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    assert chart.locator("g.mark-rule line").count() == 20  # each sample's move
    chart_fills_the_page(page, chart)
    legend_click_isolates_the_perturbed(page)
    legend_click_highlights(page, "CD19+ B")
    shot(page, "map")
    page.set_viewport_size({"width": 2560, "height": 1400})  # a wide screen: the map widens
    page.wait_for_timeout(800)
    chart_fills_the_page(page, chart)
    assert chart.evaluate("c => c.getBoundingClientRect().width") > 1800
    shot(page, "map-2560")
    page.set_viewport_size({"width": 1280, "height": 800})

    go(page, "Genes")
    chart_drawn(page, 3)  # gene frequency, the gene on the map, the gene per class
    assert page.get_by_text("Unique up genes").first.is_visible()
    shot(page, "genes")

    go(page, "Enrichment")
    page.get_by_text("Backend: offline").wait_for()
    assert page.get_by_text("Enrichr could not be used").first.is_visible()
    assert page.get_by_text("ranked by mean P over its 20 source samples").first.is_visible()
    chart_drawn(page)
    shot(page, "enrichment")
    assert (
        "pbmc68k-reduced-cd14-monocyte" in bundle_box.input_value()
    )  # the choice held across pages

    # a bad upload: one line naming the file (not the server's temporary copy)
    sidebar.get_by_text("Upload a .h5ad file").click()
    settle(page, "Enrichment")
    sidebar.locator('input[type="file"]').set_input_files(
        {"name": "garbage.h5ad", "mimeType": "application/octet-stream", "buffer": b"not hdf5"}
    )
    error = page.get_by_test_id("stAlertContentError").first
    error.wait_for()
    assert "garbage.h5ad: not a readable .h5ad file" in error.inner_text()
    assert "tspg-upload" not in error.inner_text()

    # z-scored data (scanpy's pbmc68k_reduced .X; the demo bundle learnt its log counts):
    # the Perturb page warns about the units and the selection's verdict fails on data fit
    import scanpy as sc

    zscored = Path(models_root).parent / "zscored.h5ad"
    sc.datasets.pbmc68k_reduced().write_h5ad(zscored)
    sidebar.locator('input[type="file"]').set_input_files(str(zscored))
    sidebar.get_by_text("zscored.h5ad").wait_for()
    settle(page, "Enrichment")
    go(page, "Perturb")
    page.get_by_text("fall outside the range of the bundle's training data").wait_for()
    assert page.get_by_text("Verdict on this selection: fail").first.is_visible()
    page.get_by_text("Why: the").first.click()
    page.get_by_test_id("stExpanderDetails").first.wait_for()
    shot(page, "perturb-zscored")


def test_sweep_page_a_click_on_a_cell_opens_its_bundle(page, tmp_path_factory):
    """A real (small) sweep on an in-process Dask cluster; its page in the browser."""
    distributed = pytest.importorskip("distributed")
    from conftest import SMALL_NETS

    from tspg.config import TrainConfig
    from tspg.datasets import synthetic_gem
    from tspg.sweep import GeneSet, sweep

    out = tmp_path_factory.mktemp("browser_sweep")
    gem = synthetic_gem(n_samples=90, n_genes=30, n_classes=3, seed=0)
    g = list(gem.var_names)
    sets = [GeneSet("SET_A", tuple(g[:10])), GeneSet("SET_B", tuple(g[8:20]))]
    config = TrainConfig.for_recipe("tspg+", epochs=2, target_epochs=2, batch_size=32, **SMALL_NETS)
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        sweep(
            gem,
            label_key="label",
            gene_sets=sets,
            targets=["class-00", "class-01"],
            config=config,
            out=out,
            client=client,
            threads=1,
            dataset="syn",
        )
    with streamlit_server(out, tmp_path_factory) as url:
        page.goto(f"{url}/sweep")
        settle(page, "Sweep")
        chart_drawn(page)
        bundle_box = page.get_by_test_id("stSidebar").get_by_role("combobox", name="Bundle")
        assert bundle_box.input_value() == "syn-set-a-class-00"  # the first
        cell = page.locator('[data-testid="stVegaLiteChart"]').first.locator(
            'g.role-mark path[aria-label*="gene set: SET_B"][aria-label*="target: class-01"]'
        )
        cell.click()
        page.get_by_text("Opened bundle").wait_for()
        settle(page, "Sweep")
        assert bundle_box.input_value() == "syn-set-b-class-01"
        shot(page, "sweep")
        go(page, "Models")  # the other pages now show that bundle
        assert page.get_by_role("heading", name="syn-set-b-class-01: verdict").is_visible()
