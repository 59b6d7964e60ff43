"""Our training speed beside the original TSPG's (issue 16), and against an older commit of ours.

Prints tables (not a test). Each measurement runs in a fresh Python process (so peak memory
is its own), and the implementations are interleaved run by run, so that a machine shared
with other work slows both alike; figures are medians over ``--reps`` runs.

Cases:
  demo  scanpy's pbmc68k_reduced, 80/20 split: 560 training samples x 765 genes, 10 classes,
        target CD14+ Monocyte. A whole run (tspg.train: split, target model, generator,
        held-out metrics), all epochs of the recipe.
  gtex  tspg.datasets.synthetic_gem(): 11,688 x 4,386, 53 classes (GTEx's shape); 80/20 split
        (9,352 training samples), target class-00. ``--gtex-epochs`` epochs of the target
        model and of the generator (a whole run would take many minutes).
Columns: target model (s, whole), target model s/epoch and generator s/epoch (medians over
the epochs after the first), whole run (s), peak RSS (MB, the process's, data included).
The original TensorFlow code (ctargon/TSPG ba027b4) cannot run here (no TensorFlow); its
figures, measured side by side on this machine in issue 16, are quoted beside ours.

    python bench/vs_reference.py                              # demo + gtex, both recipes, 1 and 2 threads
    python bench/vs_reference.py --cases demo --recipes paper --sizes reference
    python bench/vs_reference.py --baseline main              # interleave with main's tspg/training.py
    python bench/vs_reference.py --baseline mkl               # this code with MKL only (TSPG_ONEDNN=0)
    python bench/vs_reference.py --cases demo --threads 1 2 auto --busy 2   # thread default, busy machine
    python bench/vs_reference.py --cases demo --threads 1 2 --busy 2 --wait-policy active
    python bench/vs_reference.py --limit --cases gtex         # CPU limit of a GTEx-sized epoch
    python bench/vs_reference.py --profile demo:paper         # where the time goes (torch.profiler)
    python bench/vs_reference.py --sync-debug                 # CUDA only: host syncs per step
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

# issue 16: the original (TensorFlow), 2 threads, its own sizes (target model 512-256-128)
ORIGINAL = {
    ("demo", "paper", "whole run s"): "31.9",
    ("demo", "paper", "target model s"): "2.4",
    ("demo", "paper", "generator s/epoch"): "0.091",
    ("demo", "paper", "peak RSS MB"): "886",
    ("gtex", "paper", "generator s/epoch"): "5.95",
    ("gtex", "paper", "target s/epoch"): "2.6-3.1",
}
SIZES = {"paper": {}, "reference": {"target_hidden": (512, 256, 128)}}


# ----------------------------------------------------------------------------- one measurement


def load_baseline(ref: str):
    """``tspg/training.py`` as it is at git ``ref``, imported as a module of the tspg package."""
    src = subprocess.run(
        ["git", "show", f"{ref}:tspg/training.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_training.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("tspg._baseline_training", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dataset(name: str):
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo, synthetic_gem

    if name == "demo":
        return demo(), DEMO_LABEL_KEY, DEMO_TARGET
    return synthetic_gem(), "label", "class-00"


def config_for(case: dict):
    from tspg.config import TrainConfig

    extra = dict(SIZES[case["sizes"]])
    if case["mode"] == "epochs":
        extra.update(epochs=case["epochs"], target_epochs=case["epochs"])
    return TrainConfig.for_recipe(case["recipe"], **extra)


def run_case(case: dict) -> dict:
    """Run one measurement in this process; returns its row."""
    import torch

    import tspg.pipeline as pipeline
    from tspg.training import use_threads

    threads = use_threads(None if case["threads"] == "auto" else int(case["threads"]))
    impl = pipeline
    if case["impl"] not in ("new", "mkl"):  # "mkl": this code, run with TSPG_ONEDNN=0
        impl = load_baseline(case["impl"])
    wall: dict[str, list[float]] = {"target": [], "generator": []}
    cpu: dict[str, list[float]] = {"target": [], "generator": []}

    def timed(stage, fit):
        def call(*args, compile=False, **kw):  # the baseline takes no compile option
            stamps = [(time.perf_counter(), time.process_time())]
            user_cb = kw.pop("callback", None)

            def cb(i, n, losses):
                stamps.append((time.perf_counter(), time.process_time()))
                if user_cb:
                    user_cb(i, n, losses)

            out = fit(*args, callback=cb, **kw)
            pairs = list(zip(stamps, stamps[1:], strict=False))
            wall[stage] = [b[0] - a[0] for a, b in pairs]
            cpu[stage] = [b[1] - a[1] for a, b in pairs]
            if stage == "generator" and not hasattr(out, "steps"):  # an older GeneratorFit
                out.steps = out.steps_per_point = 0
            return out

        return call

    pipeline.fit_target = timed("target", impl.fit_target)
    pipeline.fit_generator = timed("generator", impl.fit_generator)
    adata, label_key, target = dataset(case["dataset"])
    start, start_cpu = time.perf_counter(), time.process_time()
    bundle = pipeline.train(
        adata,
        label_key=label_key,
        target=target,
        config=config_for(case),
        device="cpu",
        dataset=case["dataset"],
    )
    whole, whole_cpu = time.perf_counter() - start, time.process_time() - start_cpu

    def steady(xs):
        return statistics.median(xs[1:] or xs)

    m = bundle.metrics
    run = case["mode"] == "run"
    return {
        **case,
        "threads used": threads,
        "target model s": sum(wall["target"]),
        "target s/epoch": steady(wall["target"]),
        "generator s/epoch": steady(wall["generator"]),
        "whole run s": whole if run else None,
        "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "target model CPU s": sum(cpu["target"]),
        "target CPU s/epoch": steady(cpu["target"]),
        "generator CPU s/epoch": steady(cpu["generator"]),
        "whole run CPU s": whole_cpu if run else None,
        "accuracy": m["perturbation_accuracy_non_target"],
        "target accuracy": m["target_model_accuracy"],
        "load": os.getloadavg()[0],
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- the table


def spinners(n: int) -> list[subprocess.Popen]:
    """``n`` processes that keep one core each busy (a shared machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def table(args) -> None:
    import pandas as pd

    impls = ["new"] + ([args.baseline] if args.baseline else [])
    cases = [
        dict(
            dataset=d,
            recipe=r,
            sizes=s,
            threads=t,
            mode="run" if d == "demo" and not args.demo_epochs else "epochs",
            epochs=args.gtex_epochs if d == "gtex" else args.demo_epochs,
        )
        for d in args.cases
        for r in args.recipes
        for s in args.sizes
        for t in args.threads
    ]
    busy = spinners(args.busy)
    rows = []
    try:
        for rep in range(args.reps):
            for case in cases:
                for impl in impls:  # interleaved: the same load for both
                    cmd = [sys.executable, str(HERE), "--case", json.dumps({**case, "impl": impl})]
                    env = dict(os.environ)
                    if impl != "new":  # a baseline multiplies with MKL, as tspg did before
                        env["TSPG_ONEDNN"] = "0"
                    if args.wait_policy:
                        env["OMP_WAIT_POLICY"] = args.wait_policy.upper()
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
                    if out.returncode:
                        sys.exit(f"failed: {case} {impl}\n{out.stderr[-3000:]}")
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"rep {rep + 1}: {case} {impl} done", file=sys.stderr, flush=True)
    finally:
        for p in busy:
            p.kill()
    df = pd.DataFrame(rows)
    keys = ["dataset", "recipe", "sizes", "threads", "impl"]
    wall_values = [
        "target model s",
        "target s/epoch",
        "generator s/epoch",
        "whole run s",
        "peak RSS MB",
    ]
    cpu_values = [
        "target model CPU s",
        "target CPU s/epoch",
        "generator CPU s/epoch",
        "whole run CPU s",
    ]
    values = wall_values + cpu_values
    med = (
        df.groupby(keys, sort=False)[values + ["accuracy", "threads used", "load"]]
        .median()
        .reset_index()
    )

    def shown(columns):
        out = []
        for _, r in med.iterrows():
            row = {k: r[k] for k in keys}
            for v in columns:
                row[v] = "" if pd.isna(r[v]) else f"{r[v]:.3g}" if r[v] < 100 else f"{r[v]:.0f}"
            row["threads used"] = int(r["threads used"])
            row["accuracy"] = f"{r['accuracy']:.2f}"
            row["load"] = f"{r['load']:.1f}"
            out.append(row)
        return pd.DataFrame(out).to_string(index=False)

    print(
        f"torch {rows[0]['torch']}, CPU, {os.cpu_count()} cores; {args.busy} busy processes "
        f"started by this script; OpenMP waits: {args.wait_policy or 'bounded spin (tspg)'}; "
        f"medians of {args.reps}; 'accuracy' = held-out perturbation "
        "accuracy (non-target); 'load' = the 1-minute load average after the run"
    )
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print("wall-clock seconds")
        print(shown(wall_values))
        print("\nCPU seconds (all threads; with 1 thread about what a quiet machine takes)")
        print(shown(cpu_values))
        if args.baseline:
            print(f"\nratio {args.baseline} / new (above 1: new is faster)")
            ratio = []
            for key, g in med.groupby(keys[:-1], sort=False):
                new, old = g[g.impl == "new"].iloc[0], g[g.impl == args.baseline].iloc[0]
                ratio.append(
                    dict(zip(keys[:-1], key, strict=True))
                    | {v: f"{old[v] / new[v]:.2f}" for v in values if not pd.isna(new[v])}
                )
            print(pd.DataFrame(ratio).to_string(index=False))
        quoted = [
            dict(dataset=d, recipe=r, what=w, original=v) for (d, r, w), v in ORIGINAL.items()
        ]
        print(
            "\nthe original (TensorFlow, ctargon/TSPG ba027b4; its target model 512-256-128), "
            "2 threads, as measured in issue 16 (it cannot run here):"
        )
        print(pd.DataFrame(quoted).to_string(index=False))


# ----------------------------------------------------------------------------- the CPU limit


@functools.cache
def _eviction_buffer():
    import torch

    return torch.empty(16 * 2**20)  # 64 MB, twice this machine's 32 MB L3


def _evict_caches() -> None:
    """Write 64 MB, so that the next product's operands come from memory, as a training
    step's weights mostly do."""
    _eviction_buffer().fill_(1.0)


def matmul_rate(m: int, k: int, n: int, reps: int = 20) -> tuple[float, float, float]:
    """Best FLOP per wall-clock second and per CPU second (all threads) of a float32
    (m x k) @ (k x n) on this machine, repeated on operands in cache; and per wall-clock
    second with the caches emptied before each product. Each the faster of MKL (torch's
    ``a @ b``) and oneDNN."""
    import torch

    from tspg.nets import _onednn, onednn_works

    a, b = torch.randn(m, k), torch.randn(k, n)
    ways = [lambda: a @ b] + ([lambda: _onednn(a, b.t())] if onednn_works() else [])
    wall = cpu = cold = float("inf")
    for way in ways:
        for _ in range(3):
            way()
        for _ in range(reps):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(5):
                way()
            wall = min(wall, (time.perf_counter() - t) / 5)
            cpu = min(cpu, (time.process_time() - c) / 5)
        for _ in range(reps):
            _evict_caches()
            t = time.perf_counter()
            way()
            cold = min(cold, time.perf_counter() - t)
    flop = 2 * m * k * n
    return flop / wall, flop / max(cpu, 1e-9), flop / cold


def matmuls(run) -> Counter:
    """(m, k, n) of every matrix product ``run()`` makes, counted (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    shapes = Counter()
    for ev in prof.events():
        dims = [s for s in ev.input_shapes if len(s) == 2]
        if ev.name == "aten::mm" and len(dims) >= 2:
            (m, k), (_, n) = dims[0], dims[1]
        elif ev.name == "mkldnn::_linear_pointwise" and len(dims) >= 2:  # a @ w.T
            (m, k), (n, _) = dims[0], dims[1]
        elif ev.name == "aten::addmm" and len(dims) >= 2:
            (m, k), (_, n) = dims[-2], dims[-1]
        else:
            continue
        shapes[(m, k, n)] += 1
    return shapes


def _limit_row(X, y, t: int, n_classes: int, recipe: str, sizes: str) -> list[dict]:
    """The CPU limit and the measured epoch of the target model and the generator."""
    import numpy as np
    import torch

    from tspg.config import TrainConfig
    from tspg.training import Batches, fit_generator, fit_target

    cfg = TrainConfig.for_recipe(recipe, **SIZES[sizes])
    pool = np.arange(len(y)) if cfg.train_on == "all" else np.flatnonzero(y != t)
    per_epoch = {
        "target model": Batches(
            np.arange(len(y)), cfg.target_batch_size, torch.Generator()
        ).per_pass,
        "generator": Batches(pool, cfg.batch_size, torch.Generator()).per_pass,
    }
    # an epoch's products in full batches (the FLOPs of each product grow with a batch's
    # rows, and an epoch's last batch is partial)
    full_batches = {
        "target model": len(y) / cfg.target_batch_size,
        "generator": len(pool) / cfg.batch_size,
    }
    steps = 4  # profiled steps of each, full batches
    few = TrainConfig.for_recipe(recipe, **SIZES[sizes], steps=steps, target_steps=steps)
    f = fit_target(X, y, n_classes, few)
    shapes = {
        "target model": matmuls(lambda: fit_target(X, y, n_classes, few)),
        "generator": matmuls(lambda: fit_generator(X, y, t, f, few)),
    }
    rates = {s: matmul_rate(*s) for s in set(shapes["target model"]) | set(shapes["generator"])}
    # measured: the median epoch after the first (2 epochs at GTEx size, 6 on the demo)
    n_epochs = 2 if X.shape[1] > 2000 else 6
    timed = TrainConfig.for_recipe(recipe, **SIZES[sizes], epochs=n_epochs, target_epochs=n_epochs)
    stamps: dict[str, list[tuple[float, float]]] = {"target model": [], "generator": []}

    def stamp(what):
        return lambda *a: stamps[what].append((time.perf_counter(), time.process_time()))

    f = fit_target(X, y, n_classes, timed, callback=stamp("target model"))
    fit_generator(X, y, t, f, timed, callback=stamp("generator"))
    rows = []
    for what in ("target model", "generator"):
        counted = shapes[what].items()
        scale = full_batches[what] / steps
        flops = sum(2 * m * k * n * c for (m, k, n), c in counted) * scale
        limit = [  # wall-clock, CPU, wall-clock from memory
            sum(2 * m * k * n * c / rates[(m, k, n)][i] for (m, k, n), c in counted) * scale
            for i in (0, 1, 2)
        ]
        gaps = list(zip(stamps[what], stamps[what][1:], strict=False))
        wall = statistics.median(b[0] - a[0] for a, b in gaps)
        cpu = statistics.median(b[1] - a[1] for a, b in gaps)
        rows.append(
            {
                "recipe": recipe,
                "sizes": sizes,
                "epoch of": what,
                "steps": per_epoch[what],
                "TFLOP": f"{flops / 1e12:.3f}",
                "limit s": f"{limit[0]:.3f}",
                "measured s": f"{wall:.3f}",
                "measured / limit": f"{wall / limit[0]:.2f}",
                "limit from memory s": f"{limit[2]:.3f}",
                "measured / limit from memory": f"{wall / limit[2]:.2f}",
                "limit CPU s": f"{limit[1]:.3f}",
                "measured CPU s": f"{cpu:.3f}",
                "CPU measured / limit": f"{cpu / limit[1]:.2f}",
            }
        )
    return rows


def cpu_limit(args) -> None:
    """Seconds per epoch this machine needs for the matrix products alone, at its best rate
    for each shape, beside the measured epoch."""
    import pandas as pd

    from tspg.pipeline import prepare
    from tspg.training import use_threads

    rows = []
    for case in args.cases:
        adata, label_key, target = dataset(case)
        prep = prepare(adata, label_key=label_key, dataset=case)
        X, y = prep.X[prep.train_idx], prep.y[prep.train_idx]
        for threads in args.threads:
            use_threads(int(threads))
            for recipe in args.recipes:
                for sizes in args.sizes:
                    t, k = prep.class_index(target), len(prep.classes)
                    for row in _limit_row(X, y, t, k, recipe, sizes):
                        rows.append({"case": case, "threads": threads, **row})
                        print(rows[-1], file=sys.stderr, flush=True)
    print(
        "One epoch (demo: 560 x 765, 10 classes; gtex: 9,352 x 4,386, 53 classes): the matrix "
        "products' FLOPs (torch.profiler) at this machine's best rate for each shape (the "
        "limit: operands in cache; from memory: caches emptied before each product), beside "
        "the median measured epoch; wall-clock and CPU seconds (all threads; robust on a "
        f"shared machine); load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(pd.DataFrame(rows).to_string(index=False))


# ----------------------------------------------------------------------------- profiles


CATEGORIES = (  # (label, op-name fragments), the first match wins
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise")),
    (
        "optimiser (Adam)",
        (
            "adam",
            "Optimizer.",
            "aten::_foreach",
            "aten::lerp",
            "aten::addcdiv",
            "aten::addcmul",
            "aten::sqrt",
            "aten::div",
        ),
    ),
    ("BatchNorm", ("batch_norm",)),
    ("data indexing", ("aten::index", "aten::gather", "aten::scatter", "aten::take")),
    ("host syncs", ("aten::item", "aten::_local_scalar_dense")),
    (
        "random draws",
        ("aten::normal_", "aten::randperm", "aten::random_", "aten::uniform_", "aten::randint"),
    ),
    ("zeroing gradients", ("zero_grad", "aten::zero_", "aten::fill_")),
)


def profile_case(args) -> None:
    """torch.profiler of a few epochs: self time by category, and the top operations."""
    import pandas as pd
    from torch.profiler import ProfilerActivity, profile

    import tspg.training as new
    from tspg.pipeline import prepare
    from tspg.training import use_threads

    name, recipe, *rest = args.profile.split(":")
    sizes = rest[0] if rest else "paper"
    use_threads(int(args.threads[0]))
    impl = new
    if args.baseline:  # a baseline multiplies with MKL, as tspg did before
        import tspg.nets

        tspg.nets.ONEDNN = False
        impl = new if args.baseline == "mkl" else load_baseline(args.baseline)
    adata, label_key, target = dataset(name)
    prep = prepare(adata, label_key=label_key, dataset=name)
    X, y = prep.X[prep.train_idx], prep.y[prep.train_idx]
    t = prep.class_index(target)
    epochs = 1 if name == "gtex" else 5
    case = dict(recipe=recipe, sizes=sizes, mode="epochs", epochs=epochs)
    cfg = config_for(case)
    f = impl.fit_target(X, y, len(prep.classes), cfg)  # warm-up, and the target model for G
    for stage, run in (
        ("target model", lambda: impl.fit_target(X, y, len(prep.classes), cfg)),
        ("generator", lambda: impl.fit_generator(X, y, t, f, cfg)),
    ):
        start = time.perf_counter()
        run()
        plain = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        by = Counter()
        for e in events:
            label = next(
                (lab for lab, frags in CATEGORIES if any(s in e.key for s in frags)), "other ops"
            )
            by[label] += e.self_cpu_time_total / 1e6
        print(
            f"\n{name}, {recipe} recipe ({sizes} sizes), {stage}, {epochs} epochs, "
            f"{args.threads[0]} thread(s), {'baseline ' + args.baseline if args.baseline else 'new'}: "
            f"{plain:.2f} s without the profiler; with it, op self time {total:.2f} s:"
        )
        print(
            pd.DataFrame(
                [
                    {"where": k, "s": f"{v:.3f}", "share": f"{v / total:.0%}"}
                    for k, v in by.most_common()
                ]
            ).to_string(index=False)
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


# ----------------------------------------------------------------------------- host syncs (CUDA)


def sync_debug(args) -> None:
    """Count the host synchronisations of a short run on CUDA (torch's sync debug mode)."""
    import warnings

    import numpy as np
    import torch

    from tspg.config import TrainConfig
    from tspg.training import fit_generator, fit_target

    if not torch.cuda.is_available():
        print("--sync-debug needs a CUDA GPU; none here")
        return
    rng = np.random.default_rng(0)
    X = rng.random((2048, 500), dtype=np.float32)
    y = rng.integers(0, 5, 2048)
    rows = []
    for recipe in ("tspg+", "paper"):
        for steps in (16, 48):  # chunks of 16 steps (2048 / 128): 1 and 3 chunks
            cfg = TrainConfig.for_recipe(recipe, steps=steps, target_steps=steps)
            f = fit_target(X, y, 5, cfg, device="cuda")
            for stage, run in (
                ("target model", lambda cfg=cfg: fit_target(X, y, 5, cfg, device="cuda")),
                ("generator", lambda cfg=cfg, f=f: fit_generator(X, y, 1, f, cfg, device="cuda")),
            ):
                torch.cuda.synchronize()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        run()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                syncs = sum("synchroniz" in str(w.message) for w in caught)
                rows.append(
                    dict(recipe=recipe, stage=stage, steps=steps, chunks=steps // 16, syncs=syncs)
                )
    import pandas as pd

    print(
        "host synchronisations on CUDA (setup included); the loop's own: the difference per 2 chunks"
    )
    print(pd.DataFrame(rows).to_string(index=False))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", nargs="+", choices=["demo", "gtex"], default=["demo", "gtex"])
    p.add_argument("--recipes", nargs="+", choices=["paper", "tspg+"], default=["paper", "tspg+"])
    p.add_argument(
        "--sizes",
        nargs="+",
        choices=list(SIZES),
        default=["paper"],
        help="network sizes: the paper's (target model 1024-512-128) or the reference code's (512-256-128)",
    )
    p.add_argument(
        "--threads", nargs="+", default=["1", "2"], help="thread counts; 'auto': tspg's default"
    )
    p.add_argument("--reps", type=int, default=3, help="runs per setting (medians)")
    p.add_argument("--gtex-epochs", type=int, default=3, help="epochs timed at GTEx size")
    p.add_argument(
        "--demo-epochs",
        type=int,
        default=0,
        help="epochs timed on the demo instead of a whole run (0: the whole run)",
    )
    p.add_argument(
        "--baseline",
        help="git ref whose tspg/training.py to interleave (e.g. main), run with MKL only "
        "(TSPG_ONEDNN=0, as tspg multiplied before); 'mkl': this code with MKL only",
    )
    p.add_argument("--busy", type=int, default=0, help="busy processes to start meanwhile")
    p.add_argument(
        "--wait-policy",
        choices=["active", "passive"],
        help="OMP_WAIT_POLICY of the runs (default: tspg's bounded spin, GOMP_SPINCOUNT)",
    )
    p.add_argument("--limit", action="store_true", help="the CPU limit of an epoch (per case)")
    p.add_argument("--profile", help="DATASET:RECIPE[:SIZES], e.g. demo:paper or gtex:tspg+")
    p.add_argument("--top", type=int, default=15, help="operations listed by --profile")
    p.add_argument("--sync-debug", action="store_true", help="count host syncs (CUDA only)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import tspg  # noqa: F401 - before torch: tspg sets GOMP_SPINCOUNT, read when torch loads

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
    elif args.limit:
        cpu_limit(args)
    elif args.profile:
        profile_case(args)
    elif args.sync_debug:
        sync_debug(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
