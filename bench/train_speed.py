"""Training speed: seconds per epoch of the target model and of the generator, peak memory,
and the wall time of a full ``tspg-train --demo``.

Cases (each in a fresh Python process, so that peak memory is the case's own):
  demo   scanpy's pbmc68k_reduced: 700 samples x 765 genes, 10 classes, target CD14+ Monocyte
  gtex   tspg.datasets.synthetic_gem(): 11,688 samples x 4,386 genes, 53 classes (GTEx size),
         target class-00; only a couple of epochs (slow on a CPU)
Per-epoch times are the median over the timed epochs after the first (which also builds the
networks); the tspg+ recipe by default (--recipe paper adds L_td's draws from the target
distribution and L_norm) and batch size 128. Peak memory: the process's peak RSS
on the CPU (Python, torch and the data included), torch.cuda.max_memory_allocated on CUDA.

    python bench/train_speed.py                                   # everything, device auto
    python bench/train_speed.py --threads 1 2 --full-runs 3 --full-threads 1
    python bench/train_speed.py --cases demo --full-runs 3 --full-threads 0 --full-seeds 0 1
    python bench/train_speed.py --cases demo --full-runs 0        # quick look
    python bench/train_speed.py --cases gtex --full-runs 0 --recipe paper
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import tspg  # noqa: F401 - before torch: tspg sets GOMP_SPINCOUNT, read when torch loads


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(
    case: str, *, gen_epochs: int, target_epochs: int, threads: int, device: str, recipe: str
) -> dict:
    """Time one case in this process; returns one table row."""
    import torch

    from tspg.config import TrainConfig
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo, synthetic_gem
    from tspg.pipeline import prepare
    from tspg.training import fit_generator, fit_target, resolve_device

    torch.set_num_threads(threads)
    dev = resolve_device(device)
    if case == "demo":
        adata, label_key, target = demo(), DEMO_LABEL_KEY, DEMO_TARGET
    else:
        adata, label_key, target = synthetic_gem(), "label", "class-00"
    prep = prepare(adata, label_key=label_key, dataset=case)
    X, y = prep.X[prep.train_idx], prep.y[prep.train_idx]
    config = TrainConfig.for_recipe(recipe, epochs=gen_epochs, target_epochs=target_epochs)
    rss_data = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def timed(fit):
        stamps = [time.perf_counter()]
        result = fit(lambda epoch, n, losses: stamps.append(time.perf_counter()))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        per_epoch = list(np.diff(stamps))
        steady = per_epoch[1:] or per_epoch
        return result, statistics.median(steady), per_epoch[0]

    f, target_s, target_first = timed(
        lambda cb: fit_target(X, y, len(prep.classes), config, device=dev, callback=cb)
    )
    _, gen_s, gen_first = timed(
        lambda cb: fit_generator(X, y, prep.class_index(target), f, config, device=dev, callback=cb)
    )
    if dev.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MB (CUDA allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB RSS ({rss_data:.0f} with data, before training)"
    return {
        "case": f"{case}: {len(prep.train_idx)} train samples x {len(prep.genes)} genes, {len(prep.classes)} classes",
        "recipe": recipe,
        "device": str(dev),
        "threads": threads,
        "target model s/epoch": round(target_s, 3),
        "generator s/epoch": round(gen_s, 3),
        "epochs timed (target, generator)": f"{target_epochs}, {gen_epochs}",
        "first epoch s (target, generator)": f"{target_first:.2f}, {gen_first:.2f}",
        "peak memory": peak,
    }


def full_demo_runs(runs: int, *, threads: int | None, device: str, seeds: int = 0) -> dict:
    """Wall time of ``tspg train --demo`` (default recipe, all epochs), each run a fresh
    process; ``seeds``: generators of the ensemble (0: the default)."""
    env = {k: v for k, v in os.environ.items() if k != "TSPG_THREADS"}
    if threads:
        env["TSPG_THREADS"] = str(threads)  # what tspg-train takes (else: its default)
    outer, inner = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            cmd = [
                sys.executable,
                "-m",
                "tspg.cli",
                "train",
                "--demo",
                "--out",
                tmp,
                "--overwrite",
                "-q",
                "--device",
                device,
            ] + (["--seeds", str(seeds)] if seeds else [])
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            outer.append(time.perf_counter() - start)
            inner.append(float(re.search(r"wall time: ([\d.]+) s", out.stdout).group(1)))
            acc = re.search(r"non-target ([\d.]+)", out.stdout).group(1)
    return {
        "case": f"tspg-train --demo, full run ({runs} run{'s' if runs > 1 else ''}; perturbation accuracy {acc})",
        "device": device,
        "generators": seeds or "the default",
        "threads": threads or "tspg's default",
        "wall s (median)": round(statistics.median(inner), 1),
        "wall s incl. Python start-up (median)": round(statistics.median(outer), 1),
        "range s": f"{min(inner):.1f}-{max(inner):.1f}",
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", nargs="+", choices=["demo", "gtex"], default=["demo", "gtex"])
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts (default: torch's default)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--recipe",
        default="tspg+",
        choices=["tspg+", "paper"],
        help="recipe of the per-epoch cases (the full runs use tspg-train's default)",
    )
    p.add_argument(
        "--demo-epochs",
        type=int,
        default=8,
        help="generator epochs timed on the demo (target model: half)",
    )
    p.add_argument(
        "--gtex-epochs",
        type=int,
        default=2,
        help="generator and target-model epochs timed at GTEx size",
    )
    p.add_argument("--full-runs", type=int, default=3, help="full tspg-train --demo runs (0: none)")
    p.add_argument(
        "--full-threads",
        type=int,
        nargs="+",
        default=None,
        help="thread counts of the full runs, 0: tspg-train's default (default: --threads)",
    )
    p.add_argument(
        "--full-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="generators per full run (--seeds of tspg-train), 0: its default",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)

    import torch

    if args.case:
        epochs = args.demo_epochs if args.case == "demo" else args.gtex_epochs
        target_epochs = max(2, epochs // 2) if args.case == "demo" else epochs
        row = run_case(
            args.case,
            gen_epochs=epochs,
            target_epochs=target_epochs,
            threads=args.threads[0],
            device=args.device,
            recipe=args.recipe,
        )
        print(json.dumps(row))
        return

    import pandas as pd

    from tspg.training import resolve_device

    device = str(resolve_device(args.device))
    threads = args.threads or [torch.get_num_threads()]
    rows = []
    here = Path(__file__).resolve()
    for case in args.cases:
        for t in threads:
            cmd = [
                sys.executable,
                str(here),
                "--case",
                case,
                "--threads",
                str(t),
                "--device",
                device,
                "--recipe",
                args.recipe,
                "--demo-epochs",
                str(args.demo_epochs),
                "--gtex-epochs",
                str(args.gtex_epochs),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done: {case}, {t} threads", file=sys.stderr, flush=True)
    full = (
        [
            full_demo_runs(args.full_runs, threads=t, device=device, seeds=n)
            for t in args.full_threads or threads
            for n in args.full_seeds
        ]
        if args.full_runs
        else []
    )

    print(
        f"torch {torch.__version__}, device {device}, {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at the end"
    )
    with pd.option_context("display.max_colwidth", 80, "display.width", 250):
        print(pd.DataFrame(rows).to_string(index=False))
        if full:
            print()
            print(pd.DataFrame(full).to_string(index=False))


if __name__ == "__main__":
    main()
