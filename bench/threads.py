"""How torch's threads should wait, and how many to use, on a quiet and on a busy machine.

Prints a table (not a test). Each run is a fresh Python process that trains the target model
and the generator on the demo (scanpy's pbmc68k_reduced, 80/20 split, target CD14+ Monocyte)
for a few epochs and reports seconds per epoch (medians over the epochs after the first).
Runs of all variants are interleaved, repeat by repeat, so that load from other work slows
them alike; figures are medians over ``--reps`` repeats.

Variants (threads, how OpenMP threads wait for work):
  1                  one thread (nothing waits)
  2 sleep            2 threads, OMP_WAIT_POLICY=PASSIVE: waiting threads sleep at once
  2 bounded spin     2 threads, tspg's default: they spin GOMP_SPINCOUNT rounds, then sleep
  2 spin             2 threads, libgomp's own default (what torch does without tspg): 300,000 rounds
  tspg default       tspg's default: the cores idle when the run starts, bounded spin

Scenarios: ``quiet`` (nothing started beside it), ``busyN`` (N busy processes started before
the run: the threads are chosen on a busy machine), ``laterN`` (N busy processes started when
the generator starts: the threads were chosen on a quiet machine, which then got busy).

    python bench/threads.py                         # every scenario, medians of 3
    python bench/threads.py --scenarios quiet busy1 --reps 5 --recipe tspg+
    python bench/threads.py --variants "2 bounded spin" "2 spin" --spins 10000 30000 100000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from vs_reference import spinners  # bench/ is on the path when this script runs

VARIANTS = {  # name -> (threads, environment); threads None: tspg's default
    "1": (1, {}),
    "2 sleep": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 bounded spin": (2, {}),
    "2 spin": (2, {"GOMP_SPINCOUNT": "300000"}),
    "tspg default": (None, {}),
}
SCENARIOS = ("quiet", "busy1", "busy2", "later1", "later2")


def child(threads: int | None, recipe: str, epochs: int) -> None:
    """One run (in its own process): print threads, target and generator s/epoch."""
    import tspg  # noqa: F401 - before torch: sets the spin count, read when torch loads
    from tspg.config import TrainConfig
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo
    from tspg.pipeline import prepare
    from tspg.training import fit_generator, fit_target, use_threads

    used = use_threads(threads)
    prep = prepare(demo(), label_key=DEMO_LABEL_KEY, dataset="demo")
    X, y = prep.X[prep.train_idx], prep.y[prep.train_idx]
    cfg = TrainConfig.for_recipe(recipe, seeds=1, epochs=epochs, target_epochs=epochs)
    stamps: dict[str, list[float]] = {"target": [], "generator": []}

    def stamp(what):
        return lambda *a: stamps[what].append(time.perf_counter())

    f = fit_target(X, y, len(prep.classes), cfg, callback=stamp("target"))
    print("generator", flush=True)  # the driver starts the 'later' busy processes now
    sys.stdin.readline()
    fit_generator(X, y, prep.class_index(DEMO_TARGET), f, cfg, callback=stamp("generator"))

    def per_epoch(ts):
        return statistics.median(b - a for a, b in zip(ts, ts[1:], strict=False))

    print(f"result {used} {per_epoch(stamps['target']):.4f} {per_epoch(stamps['generator']):.4f}")


def one_run(variant: str, scenario: str, recipe: str, epochs: int) -> tuple[int, float, float]:
    threads, extra = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra)
    cmd = [sys.executable, __file__, "--child", str(threads or 0), recipe, str(epochs)]
    n_busy = int(scenario[-1]) if scenario != "quiet" else 0
    busy = spinners(n_busy) if scenario.startswith("busy") else []
    if busy:
        time.sleep(1.0)  # let the load show in /proc/stat before the threads are chosen
    try:
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for line in proc.stdout:
            if line.startswith("generator"):
                if scenario.startswith("later"):
                    busy = spinners(n_busy)
                proc.stdin.write("go\n")
                proc.stdin.flush()
            elif line.startswith("result"):
                _, used, t, g = line.split()
                proc.wait()
                return int(used), float(t), float(g)
        raise RuntimeError(f"{variant} / {scenario}: the run ended without a result")
    finally:
        for p in busy:
            p.kill()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--recipe", default="paper", choices=("paper", "tspg+"))
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each network per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--spins",
        nargs="+",
        type=int,
        default=[],
        help="more variants: 2 threads spinning this many rounds (GOMP_SPINCOUNT), then sleeping",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for n in args.spins:
        VARIANTS[f"2 spin {n}"] = (2, {"GOMP_SPINCOUNT": str(n)})
        if f"2 spin {n}" not in args.variants:
            args.variants.append(f"2 spin {n}")
    if args.child:
        threads, recipe, epochs = args.child
        child(int(threads) or None, recipe, int(epochs))
        return

    import pandas as pd

    runs: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for rep in range(args.reps):
        for scenario in args.scenarios:
            for variant in args.variants:
                runs.setdefault((scenario, variant), []).append(
                    one_run(variant, scenario, args.recipe, args.epochs)
                )
                print(rep, scenario, variant, runs[scenario, variant][-1], file=sys.stderr)
    rows = []
    for (scenario, variant), rs in runs.items():
        rows.append(
            {
                "scenario": scenario,
                "variant": variant,
                "threads used": "/".join(sorted({str(r[0]) for r in rs})),
                "target s/epoch": statistics.median(r[1] for r in rs),
                "generator s/epoch": statistics.median(r[2] for r in rs),
            }
        )
    table = pd.DataFrame(rows)
    best = table.groupby("scenario")["generator s/epoch"].transform("min")
    table["generator x best"] = table["generator s/epoch"] / best
    print(
        f"demo, {args.recipe} recipe, {args.epochs} epochs per network, medians of {args.reps}; "
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    worst = table.groupby("variant")["generator x best"].max()
    print("\nworst 'x best' over the scenarios:")
    print(worst.reindex(args.variants).to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
