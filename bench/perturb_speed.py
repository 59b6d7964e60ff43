"""Time to perturb 1,000 samples x 4,386 genes (GTEx size) on the CPU.

The networks are untrained but of the paper's size (generator 4386-512-256-128, 3 residual
blocks, 256-512-4386; target model 4386-1024-512-128-53): the time of a forward pass does
not depend on the weights' values. Prints the median (and fastest) of several runs after a
warm-up, per torch thread count.

    python bench/perturb_speed.py                   # 1,000 x 4,386, threads 1 and all
    python bench/perturb_speed.py --runs 15 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from tspg.bundle import Bundle
from tspg.nets import Discriminator, Generator, TargetClassifier
from tspg.perturbation import generate_perturbed, perturb_scaled


def timed(fn, runs: int) -> tuple[float, float]:
    fn()  # warm-up: first call allocates and picks kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3), float(np.min(times) * 1e3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--genes", type=int, default=4386)
    p.add_argument("--classes", type=int, default=53)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts (default: 1 and all)",
    )
    args = p.parse_args(argv)

    torch.manual_seed(0)
    n, g = args.samples, args.genes
    G, D, f = Generator(g).eval(), Discriminator(g).eval(), TargetClassifier(g, args.classes).eval()
    classes = [f"class-{c:02d}" for c in range(args.classes)]
    manifest = {
        "name": "bench",
        "genes": [f"gene-{j}" for j in range(g)],
        "classes": classes,
        "target": classes[0],
    }
    bundle = Bundle(manifest, G, D, f)
    X = np.random.default_rng(0).random((n, g), dtype=np.float32)
    # multiply-adds of the two large layers (g->512 in, 512->g out): the floor of the work
    gemm_a, gemm_w1, gemm_w2 = torch.from_numpy(X), torch.randn(512, g), torch.randn(g, 512)
    h = torch.randn(n, 512)

    steps = {
        "perturbation: G(x) + clip (tspg.perturb)": lambda: generate_perturbed(G, X),
        "perturbation + target model before/after": lambda: perturb_scaled(X, bundle),
        "floor: the two large matmuls of G alone": lambda: (gemm_a @ gemm_w1.T, h @ gemm_w2.T),
    }
    default_threads = torch.get_num_threads()
    rows = []
    for threads in args.threads or sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for name, fn in steps.items():
            med, best = timed(fn, args.runs)
            rows.append(
                {
                    "step": name,
                    "threads": threads,
                    "median ms": round(med, 1),
                    "fastest ms": round(best, 1),
                }
            )
    torch.set_num_threads(default_threads)
    flops = 2 * n * (g * 512 * 2 + 512 * 256 * 2 + 256 * 128 * 2 + 6 * 128 * 128) / 1e9
    print(
        f"{n} samples x {g} genes, {args.classes} classes, untrained networks of the paper's size, "
        f"torch {torch.__version__}, {default_threads} CPU threads available; median of {args.runs} runs"
    )
    print(f"generator forward pass: {flops:.1f} GFLOP")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
