"""How fast the dashboard's map and charts respond, on the PBMC demo.

Steps timed (median of ``--runs`` runs, wall and CPU seconds; CPU time is the steadier
number on a shared machine):

- fitting the t-SNE reference map of 1,000 samples x 765 genes (target <= 10 s). The demo
  has 700 cells: the 1,000 are drawn from them with replacement, plus Gaussian noise
  (sd 0.01 on the [0, 1] scaled expression), so the map's size matches the target;
- "re-render after a new selection" of 50 / 100 non-target samples: perturb them, place
  them on the fixed map, build the map frame and the chart dicts of the map and the
  heatmap (target <= 1 s); and its parts;
- building each chart's dict (``chart.to_dict()``) from its frame;
- the dashboard itself: a rerun of the Perturb and of the Map page (Streamlit's AppTest, in
  this process, no browser) after the selection changed (a new seed of the random pick),
  once the page's first run has loaded the bundle and fitted the map;
- the dashboard in the real browser (``streamlit run`` + Playwright on /usr/bin/chromium):
  a warm interaction on 100 samples (type a new seed, Enter: from the key press to the
  page's chart drawn anew; target <= 0.5 s median) on the Perturb page (heatmap) and the Map
  page (map with the moves); and the Map's first visit after a restart with the map kept on
  disk (target <= 3 s): a new server process, Home loaded (Python's imports done), then a
  click on Map until the map is drawn; beside it the same visit with an empty disk cache
  (the map fit anew) and opening /map directly after a restart (imports included).

The generator is trained here for 10 + 10 epochs on the CPU (``tspg+`` recipe, target
CD14+ Monocyte; about a minute), or loaded from a bundle folder:

    python bench/dashboard_speed.py
    python bench/dashboard_speed.py --bundle models/pbmc68k-cd14-monocyte
    python bench/dashboard_speed.py --methods bh fft --jobs 1 2     # compare t-SNE settings
    python bench/dashboard_speed.py --only-browser --runs 7          # the browser goals only

Threads: openTSNE's OpenMP threads spin while waiting; with other work on the machine,
``--jobs 2`` can be much slower than 1 unless Python is started with
``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from functools import partial

import numpy as np
import pandas as pd


def timed(fn, runs: int) -> tuple[float, float, float, object]:
    """(median wall s, min wall s, median CPU s, last result) over ``runs`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(runs):
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.min(walls)), float(np.median(cpus)), out


def rerender(bundle, ref, Xsel, samples, source, tmean):
    """What the app redoes for a new selection: perturb, place, map frame, map and heatmap dicts."""
    from tspg import charts
    from tspg.embedding import map_frame, place
    from tspg.perturbation import perturb_scaled

    pert = perturb_scaled(Xsel, bundle, samples=samples)
    xy = place(ref, pert.x_adv)
    frame = map_frame(
        ref, xy, new_samples=pert.samples, new_source=source, new_pred=pert.pred_after
    )
    hf = charts.heatmap_frame(
        pert.genes, pert.x.mean(0), pert.P.mean(0), pert.x_adv.mean(0), tmean, n_genes=25
    )
    return charts.map_chart(frame).to_dict(), charts.heatmap_chart(hf).to_dict()


def app_reruns(bundle, sizes, runs: int, seed: int) -> list[tuple[str, int, tuple]]:
    """Time AppTest reruns of the Perturb and Map pages after a new selection (new seed each run).

    The bundle is saved to a temporary models folder; the page's first run (loading, the
    t-SNE reference map) is not timed. Returns (page, selection size, ``timed`` result) rows.
    """
    import sys
    import tempfile
    from itertools import count
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from tspg.bundle import save_bundle

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))  # the app imports tspg from this tree
    out = []
    with tempfile.TemporaryDirectory(prefix="tspg-bench-models-") as tmp:
        save_bundle(bundle, tmp)
        os.environ["TSPG_MODELS_DIR"] = tmp
        at = AppTest.from_file(str(root / "streamlit_app.py"), default_timeout=600).run()
        seeds = count(seed + 1)

        def rerun():
            at.session_state["sel_seed"] = next(seeds)
            at.run()
            if at.exception or at.error:
                raise RuntimeError(
                    f"the app failed: {[e.value for e in [*at.exception, *at.error]]}"
                )
            if not at.get("arrow_vega_lite_chart") + at.get("vega_lite_chart"):
                raise RuntimeError(
                    f"the page drew no chart: {[e.value for e in [*at.warning, *at.info]]}"
                )

        for page in ("app_pages/perturb.py", "app_pages/map.py"):
            for m in sizes:
                at.session_state["sel_mode"], at.session_state["sel_n"] = "random", m
                at.switch_page(page).run()  # untimed: loads the page (and fits the map once)
                out.append((page, m, timed(rerun, runs)))
    return out


# ----------------------------------------------------------------------------- the real browser

READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'
RUNNING = '[data-testid="stApp"][data-test-script-state="running"]'
CHROMIUM = "/usr/bin/chromium"
# a signature of what the page's first chart draws (its marks), to see it drawn anew
CHART_SIGNATURE = """() => {
  const c = document.querySelector('[data-testid="stVegaLiteChart"] svg.marks');
  if (!c) return null;
  const marks = c.querySelectorAll('g.role-mark path, g.role-mark line');
  let h = marks.length;
  for (const m of marks) { const t = (m.getAttribute('transform') || '') + (m.getAttribute('fill') || '');
    for (let i = 0; i < t.length; i++) h = (h * 31 + t.charCodeAt(i)) | 0; }
  return h;
}"""


class Server:
    """``streamlit run streamlit_app.py`` on a free port, in its own process group."""

    def __init__(self, models: str, cache: str):
        import socket
        import subprocess
        import sys
        import urllib.request
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = dict(
            os.environ,
            PYTHONPATH=str(root),
            TSPG_MODELS_DIR=models,
            TSPG_CACHE_DIR=cache,
            STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
            TSPG_ENRICHR_URL="http://127.0.0.1:9/",
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
            str(self.port),
            "--server.fileWatcherType",
            "none",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("streamlit did not start")

    def stop(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def _settle(page) -> None:
    page.wait_for_selector(READY, state="attached")
    page.wait_for_timeout(300)
    page.wait_for_selector(READY, state="attached")


def _time_new_seed(page, box: str, seed: int) -> float:
    """Type ``seed`` into the number input labelled ``box``, press Enter: seconds until the
    page's first chart is drawn anew (the run finished and its marks changed)."""
    before = page.evaluate(CHART_SIGNATURE)
    field = page.get_by_role("spinbutton", name=box)
    field.fill(str(seed))
    start = time.perf_counter()
    field.press("Enter")
    page.wait_for_function(
        f"() => document.querySelector('{READY}') && ({CHART_SIGNATURE})() !== {before}",
        polling="raf",
        timeout=120_000,
    )
    return time.perf_counter() - start


def browser_timings(bundle, runs: int, n: int = 100):
    """Rows (step, n, ``timed``-like result, target) measured in Chromium through Playwright."""
    import tempfile

    from playwright.sync_api import sync_playwright

    from tspg.bundle import save_bundle

    out = []
    with tempfile.TemporaryDirectory(prefix="tspg-bench-app-") as tmp:
        models, cache = os.path.join(tmp, "models"), os.path.join(tmp, "cache")
        save_bundle(bundle, models)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(300_000)

            def visit_map(server, direct: bool) -> float:
                if direct:
                    start = time.perf_counter()
                    page.goto(f"{server.url}/map?n={n}")
                else:
                    page.goto(f"{server.url}/?n={n}")
                    page.get_by_role("heading", name="TSPG Explorer").first.wait_for()
                    _settle(page)
                    start = time.perf_counter()
                    page.locator('[data-testid="stSidebarNav"] a').filter(
                        has_text="Map"
                    ).first.click()
                page.locator(
                    '[data-testid="stVegaLiteChart"] svg.marks g.mark-rule'
                ).first.wait_for()
                return time.perf_counter() - start

            # the map's first visit: with an empty cache (fit), then after restarts (read)
            server = Server(models, cache)
            fit = visit_map(server, direct=False)
            server.stop()
            firsts, directs = [], []
            for _ in range(runs):
                server = Server(models, cache)
                firsts.append(visit_map(server, direct=False))
                server.stop()
                server = Server(models, cache)
                directs.append(visit_map(server, direct=True))
                server.stop()
            out.append(
                (
                    "browser: Map first visit, empty cache (t-SNE fit)",
                    n,
                    (fit, fit, float("nan"), None),
                    "",
                )
            )
            out.append(
                (
                    "browser: Map first visit after a restart, map on disk (Home loaded first)",
                    n,
                    (float(np.median(firsts)), float(np.min(firsts)), float("nan"), None),
                    "<= 3 s",
                )
            )
            out.append(
                (
                    "browser: /map opened directly after a restart (imports included)",
                    n,
                    (float(np.median(directs)), float(np.min(directs)), float("nan"), None),
                    "",
                )
            )

            # warm interactions: a new seed of the random pick, the chart drawn anew
            server = Server(models, cache)
            for page_name, box in (("perturb", "Seed"), ("map", "Seed")):
                page.goto(f"{server.url}/{page_name}?n={n}")
                page.locator('[data-testid="stVegaLiteChart"] svg.marks').first.wait_for()
                _settle(page)
                if page_name == "map":  # the map's own seed refits the map: change the pick's
                    page.goto(f"{server.url}/perturb?n={n}")
                    page.locator('[data-testid="stVegaLiteChart"] svg.marks').first.wait_for()
                    _settle(page)
                    times = []
                    for i in range(runs):
                        _time_new_seed(page, "Seed", 100 + i)  # a new pick on Perturb...
                        _settle(page)
                        page.locator('[data-testid="stSidebarNav"] a').filter(
                            has_text="Map"
                        ).first.click()
                        start = time.perf_counter()  # ...then the Map draws it
                        page.get_by_role("heading", name="Map", exact=True).first.wait_for()
                        page.locator(
                            '[data-testid="stVegaLiteChart"] svg.marks g.mark-rule'
                        ).first.wait_for()
                        page.wait_for_selector(READY, state="attached")
                        times.append(time.perf_counter() - start)
                        page.locator('[data-testid="stSidebarNav"] a').filter(
                            has_text="Perturb"
                        ).first.click()
                        page.locator('[data-testid="stVegaLiteChart"] svg.marks').first.wait_for()
                        _settle(page)
                    step = "browser: Map drawn for a new pick of 100 (page switch to drawn map)"
                else:
                    times = []
                    for i in range(runs):
                        times.append(_time_new_seed(page, box, 1 + i))
                        _settle(page)
                    step = "browser: Perturb, new seed (Enter to heatmap drawn anew)"
                out.append(
                    (
                        step,
                        n,
                        (float(np.median(times)), float(np.min(times)), float("nan"), None),
                        "<= 0.5 s",
                    )
                )
            server.stop()
            browser.close()
    return out


def get_bundle(path: str | None):
    from tspg.bundle import load_bundle
    from tspg.config import TrainConfig
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo
    from tspg.pipeline import train

    if path:
        return load_bundle(path)
    t = time.perf_counter()
    bundle = train(
        demo(),
        label_key=DEMO_LABEL_KEY,
        target=DEMO_TARGET,
        config=TrainConfig.for_recipe("tspg+", epochs=10, target_epochs=10),
        device="cpu",
        dataset="pbmc68k_reduced",
    )
    print(f"(trained a demo generator, 10 + 10 epochs, in {time.perf_counter() - t:.0f} s)")
    return bundle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--bundle", help="a bundle folder trained on the demo genes (default: train one here)"
    )
    p.add_argument("--runs", type=int, default=3, help="runs per step (the median is shown)")
    p.add_argument("--map-size", type=int, default=1000, help="samples on the reference map")
    p.add_argument(
        "--selections", type=int, nargs="+", default=[50, 100], help="selection sizes to place"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["bh"],
        choices=["bh", "fft"],
        help="t-SNE gradient methods to time",
    )
    p.add_argument(
        "--jobs", type=int, nargs="+", default=[1], help="openTSNE thread counts to time"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in this process (the app uses 1: $TSPG_APP_THREADS)",
    )
    p.add_argument(
        "--no-app", action="store_true", help="skip the AppTest reruns of the Perturb and Map pages"
    )
    p.add_argument("--no-browser", action="store_true", help="skip the timings in the real browser")
    p.add_argument(
        "--only-browser", action="store_true", help="only the timings in the real browser"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)

    from tspg import charts
    from tspg.datasets import DEMO_LABEL_KEY, demo
    from tspg.embedding import fit_reference_map, map_frame, place
    from tspg.perturbation import perturb_scaled

    bundle = get_bundle(args.bundle)
    rows = []

    def add(step, n, res, target=""):
        wall, best, cpu, _ = res
        rows.append(
            {"step": step, "n": n, "median s": wall, "min s": best, "CPU s": cpu, "target": target}
        )
        print(f"  {step:<58} {n:>6}  {wall:7.3f} s", flush=True)

    if args.only_browser:
        for step, m, res, target in browser_timings(bundle, args.runs):
            add(step, m, res, target)
        return _print_table(rows, args.runs)
    adata = demo()
    Xs = bundle.scale(adata).astype(np.float64)
    labels = adata.obs[DEMO_LABEL_KEY].astype(str).to_numpy()
    names = np.asarray(adata.obs_names).astype(str)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(Xs), size=args.map_size, replace=args.map_size > len(Xs))
    X_map = np.clip(Xs[pick] + rng.normal(0, 0.01, (len(pick), Xs.shape[1])), 0, 1)
    map_labels, map_names = labels[pick], np.array([f"{names[i]}#{k}" for k, i in enumerate(pick)])

    print(
        f"reference map: {len(X_map)} samples x {Xs.shape[1]} genes (the demo's {len(Xs)} cells resampled + noise sd 0.01)"
    )
    ref = None
    for method in args.methods:
        for jobs in args.jobs:
            fit = partial(
                fit_reference_map,
                X_map,
                samples=map_names,
                labels=map_labels,
                seed=args.seed,
                n_jobs=jobs,
                negative_gradient_method=method,
            )
            res = timed(fit, args.runs)
            add(
                f"fit reference map (t-SNE {method}, {jobs} thread{'s' * (jobs > 1)}, 50 PCs)",
                len(X_map),
                res,
                "<= 10 s",
            )
            ref = ref or res[3]

    source = np.flatnonzero(labels != bundle.target)
    perturb_scaled(Xs[:10].astype(np.float32), bundle)  # warm-up: torch's first call allocates
    tmean = Xs[labels == bundle.target].mean(0)
    for m in args.selections:
        sel = rng.choice(len(source), size=min(m, len(source)), replace=False)
        Xsel = Xs[source[sel]].astype(np.float32)

        pert = perturb_scaled(Xsel, bundle, samples=names[source[sel]])
        add(
            "re-render after a new selection (all below)",
            m,
            timed(
                partial(rerender, bundle, ref, Xsel, pert.samples, labels[source[sel]], tmean),
                args.runs,
            ),
            "<= 1 s",
        )
        add(
            "  perturb (G, clip, target model before/after)",
            m,
            timed(partial(perturb_scaled, Xsel, bundle), args.runs),
        )
        add(
            "  place on the fixed map (openTSNE transform)",
            m,
            timed(partial(place, ref, pert.x_adv), args.runs),
        )

    # chart dicts from their frames (the selection of the last size)
    xy = place(ref, pert.x_adv)
    frame = map_frame(
        ref, xy, new_samples=pert.samples, new_pred=pert.pred_after, new_source=labels[source[sel]]
    )
    j = 0
    gene_frame = frame.assign(value=np.concatenate([X_map[:, j], pert.x_adv[:, j]]))
    full_heat = charts.heatmap_frame(
        pert.genes, pert.x.mean(0), pert.P.mean(0), pert.x_adv.mean(0), tmean
    )
    dist = pd.concat(
        [
            pd.DataFrame({"class": labels, "value": Xs[:, j], "kind": "real"}),
            pd.DataFrame(
                {"class": labels[source[sel]], "value": pert.x_adv[:, j], "kind": "perturbed"}
            ),
        ]
    )
    history = bundle.manifest.get("history") or {"total": list(np.linspace(3, 1, 150))}
    history = {
        k: v
        for k, v in history.items()
        if isinstance(v, list) and v and isinstance(v[0], (int, float))
    } or {"total": [1.0]}
    enrich = pd.DataFrame(
        {
            "library": ["GO", "KEGG"] * 25,
            "term": [f"term {i}" for i in range(50)],
            "q": np.geomspace(1e-8, 0.5, 50),
        }
    )
    builds = {
        f"map chart ({len(frame)} points)": lambda: charts.map_chart(frame).to_dict(),
        "gene map chart": lambda: charts.gene_map_chart(gene_frame, bundle.genes[j]).to_dict(),
        "heatmap chart, top 25 + 25 genes": lambda: charts.heatmap_chart(
            charts.heatmap_frame(
                pert.genes, pert.x.mean(0), pert.P.mean(0), pert.x_adv.mean(0), tmean, n_genes=25
            )
        ).to_dict(),
        f"heatmap chart, all {len(bundle.genes)} genes": lambda: charts.heatmap_chart(
            full_heat
        ).to_dict(),
        f"gene distribution chart ({len(dist)} values)": lambda: charts.gene_distribution_chart(
            dist, bundle.genes[j]
        ).to_dict(),
        "loss chart": lambda: charts.loss_chart(history).to_dict(),
        "enrichment chart": lambda: charts.enrichment_chart(enrich).to_dict(),
        "map chart -> SVG (vl-convert)": lambda: charts.chart_to_svg(charts.map_chart(frame)),
    }
    for name, fn in builds.items():
        fn()  # warm-up (first vl-convert call starts its engine)
        add(f"chart: {name}", "", timed(fn, args.runs))

    if not args.no_app:
        for page, m, res in app_reruns(bundle, args.selections, args.runs, args.seed):
            add(f"app: {page} rerun after a new selection (AppTest)", m, res, "<= 1 s")
    if not args.no_browser and os.path.exists(CHROMIUM):
        for step, m, res, target in browser_timings(bundle, args.runs):
            add(step, m, res, target)
    return _print_table(rows, args.runs)


def _print_table(rows, runs: int) -> int:
    table = pd.DataFrame(rows)
    print()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of {runs} runs"
    )
    with pd.option_context("display.max_colwidth", 80, "display.width", 170):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
