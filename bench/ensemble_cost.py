"""What does a seed ensemble cost? ``train(..., config=TrainConfig(seeds=N))`` against one
generator (``seeds=1``), timed side by side on the demo.

Each repeat trains, with its own seed, one bundle of one generator and one bundle of N
generators for each N (the same split; each run trains its own target model, as a user's
run does). Every run's wall time is split into the target model, the generators and the
rest (data preparation, held-out metrics, the verdict). Prints medians over the repeats
and the ratio of an N-ensemble's wall time to N x one generator + one target model + the
one-generator run's rest (the goal of issue 11: at most 1).

    python bench/ensemble_cost.py --n 3 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from tspg.config import TrainConfig
from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo
from tspg.pipeline import train


def _run(adata, target: str, seed: int, seeds: int, epochs: int | None) -> dict:
    over = {} if epochs is None else {"epochs": epochs}
    start = time.perf_counter()
    b = train(
        adata,
        label_key=DEMO_LABEL_KEY,
        target=target,
        config=TrainConfig.for_recipe("tspg+", seed=seed, seeds=seeds, **over),
        device="cpu",
    )
    wall = time.perf_counter() - start
    f, g = b.metrics["train_seconds_target_model"], b.metrics["train_seconds_generator"]
    out = {"wall": wall, "f": f, "G": g, "rest": wall - f - g}
    members = b.metrics.get("members", {}).get("train_seconds_generator")
    if members:  # each member's own seconds: the slowest against one generator's
        out.update({"G member median": members["median"], "G member max": members["max"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", nargs="+", type=int, default=[3])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target", default=DEMO_TARGET)
    p.add_argument("--epochs", type=int, default=None, help="generator epochs (default: recipe)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    adata = demo()
    rows = []
    for rep in range(args.repeats):
        one = _run(adata, args.target, 100 * rep, 1, args.epochs)
        row = {f"1 generator: {k}": v for k, v in one.items()}
        for n in args.n:
            ens = _run(adata, args.target, 100 * rep, n, args.epochs)
            bound = n * one["G"] + one["f"] + one["rest"]
            row.update({f"{n} generators: {k}": v for k, v in ens.items()})
            row[f"{n} generators: bound (N x G + f + rest of 1)"] = bound
            row[f"{n} generators: wall / bound"] = ens["wall"] / bound
            row[f"{n} generators: G / (N x G of 1)"] = ens["G"] / (n * one["G"])
        rows.append(row)
        print(
            f"  repeat {rep}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
            file=sys.stderr,
            flush=True,
        )
    print(
        f"\ndemo, target {args.target}, {args.threads} thread(s), {args.repeats} repeats, "
        "medians (seconds; ratios unitless)\n"
    )
    print("| what | median | min | max |")
    print("|---|---|---|---|")
    for k in rows[0]:
        values = [r[k] for r in rows]
        print(f"| {k} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
