"""What does a seed ensemble cost? N generators against one target model, timed side by side.

For each repeat: train the target model and one generator from scratch (``train``), then
N more generators against that target model (``train(..., target_model=...)``), the way
an ensemble is trained; every call's wall time is split into the target model, the
generator and the rest (data preparation, held-out metrics). Prints medians over repeats
and the ratio of an N-ensemble's wall time to (N x one generator + one target model).

    python bench/ensemble_cost.py --n 3 5 --repeats 3 --threads 1
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", nargs="+", type=int, default=[3, 5])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target", default=DEMO_TARGET)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    adata = demo()
    rows = []
    for rep in range(args.repeats):
        base = 100 * rep
        start = time.perf_counter()
        first = train(
            adata,
            label_key=DEMO_LABEL_KEY,
            target=args.target,
            config=TrainConfig.for_recipe("tspg+", seed=base),
            device="cpu",
        )
        wall_single = time.perf_counter() - start
        t_f = first.metrics["train_seconds_target_model"]
        t_g = first.metrics["train_seconds_generator"]
        walls, gens = [], []
        for i in range(1, max(args.n)):
            s = time.perf_counter()
            b = train(
                adata,
                label_key=DEMO_LABEL_KEY,
                target=args.target,
                config=TrainConfig.for_recipe("tspg+", seed=base + i),
                target_model=first,
                device="cpu",
            )
            walls.append(time.perf_counter() - s)
            gens.append(b.metrics["train_seconds_generator"])
        row = {"f": t_f, "G": t_g, "single wall": wall_single}
        for n in args.n:
            ens_wall = wall_single + sum(walls[: n - 1])
            ens_g = [t_g, *gens[: n - 1]]
            row[f"ens{n} wall"] = ens_wall
            row[f"ens{n} bound"] = n * statistics.median(ens_g) + t_f
            row[f"ens{n} ratio"] = ens_wall / row[f"ens{n} bound"]
        row["overhead per member"] = statistics.median(
            w - g for w, g in zip(walls, gens, strict=True)
        )
        rows.append(row)
        print(
            f"  repeat {rep}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
            file=sys.stderr,
            flush=True,
        )
    print(
        f"\ndemo, target {args.target}, {args.threads} thread(s), {args.repeats} repeats, medians (seconds)\n"
    )
    print("| what | seconds |")
    print("|---|---|")
    for k in rows[0]:
        print(f"| {k} | {statistics.median(r[k] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
