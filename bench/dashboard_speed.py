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
  once the page's first run has loaded the bundle and fitted the map.

The generator is trained here for 10 + 10 epochs on the CPU (``tspg+`` recipe, target
CD14+ Monocyte; about a minute), or loaded from a bundle folder:

    python bench/dashboard_speed.py
    python bench/dashboard_speed.py --bundle models/pbmc68k-cd14-monocyte
    python bench/dashboard_speed.py --methods bh fft --jobs 1 2     # compare t-SNE settings

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
        "--no-app", action="store_true", help="skip the AppTest reruns of the Perturb and Map pages"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from tspg import charts
    from tspg.datasets import DEMO_LABEL_KEY, demo
    from tspg.embedding import fit_reference_map, map_frame, place
    from tspg.perturbation import perturb_scaled

    bundle = get_bundle(args.bundle)
    adata = demo()
    Xs = bundle.scale(adata).astype(np.float64)
    labels = adata.obs[DEMO_LABEL_KEY].astype(str).to_numpy()
    names = np.asarray(adata.obs_names).astype(str)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(Xs), size=args.map_size, replace=args.map_size > len(Xs))
    X_map = np.clip(Xs[pick] + rng.normal(0, 0.01, (len(pick), Xs.shape[1])), 0, 1)
    map_labels, map_names = labels[pick], np.array([f"{names[i]}#{k}" for k, i in enumerate(pick)])

    rows = []

    def add(step, n, res, target=""):
        wall, best, cpu, _ = res
        rows.append(
            {"step": step, "n": n, "median s": wall, "min s": best, "CPU s": cpu, "target": target}
        )
        print(f"  {step:<58} {n:>6}  {wall:7.3f} s", flush=True)

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
            timed(partial(perturb_scaled, bundle, Xsel), args.runs),
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

    table = pd.DataFrame(rows)
    print()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of {args.runs} runs"
    )
    with pd.option_context("display.max_colwidth", 70, "display.width", 160):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
