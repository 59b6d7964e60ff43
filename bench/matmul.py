"""MKL or oneDNN for the dense layers' matrix products on this CPU (the thresholds in tspg/nets.py).

Prints a table (not a test): for each dense layer shape of the networks (demo: 765 genes,
GTEx-sized: 4,386; the target model's and the generator's hidden widths) and each batch size
of the recipes (32: the paper's target model; 128: a generator step; 256: D's step on real
and fake), the time of the three products of a layer, forward (x W^T + b), the input's
gradient (g W) and the weights' gradient (g^T x), by MKL (torch's float32 default) over the
time by oneDNN: above 1, oneDNN is faster. Medians of ``--reps`` timings of 5 calls each,
the two libraries interleaved; the last column says which one tspg uses for each product.

    python bench/matmul.py                 # 1 and 2 threads
    python bench/matmul.py --threads 2 --reps 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LAYERS = [  # (in, out): the wide layers of the three networks, then two narrow ones
    (765, 512),
    (512, 765),
    (765, 1024),
    (1024, 512),
    (4386, 512),
    (512, 4386),
    (4386, 1024),
    (512, 256),
    (256, 128),
]
BATCHES = (32, 128, 256)


def timed(fn, reps: int) -> list[float]:
    fn()
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(5):
            fn()
        out.append((time.perf_counter() - t) / 5)
    return out


def products(x, w, b, g) -> dict:
    """The three products of a dense layer: (MKL, oneDNN) for each."""
    import torch

    from tspg.nets import _onednn

    return {
        "forward": (lambda: torch.addmm(b, x, w.t()), lambda: _onednn(x, w, b)),
        "input grad": (lambda: g.mm(w), lambda: _onednn(g, w.t())),
        "weights grad": (lambda: g.t().mm(x), lambda: _onednn(g.t(), x.t())),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import pandas as pd
    import torch

    from tspg.nets import ONEDNN_MIN_WEIGHTS, ONEDNN_MIN_WEIGHTS_GRAD, onednn_works

    if not onednn_works():
        sys.exit("oneDNN's float32 products are not available on this machine: tspg uses MKL")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in BATCHES:
            for n_in, n_out in LAYERS:
                x, w, b = torch.rand(batch, n_in), torch.randn(n_out, n_in), torch.randn(n_out)
                g = torch.randn(batch, n_out)
                row = {"threads": threads, "batch": batch, "layer": f"{n_in} x {n_out}"}
                for name, (mkl, dnn) in products(x, w, b, g).items():
                    t_mkl, t_dnn = [], []
                    for _ in range(args.reps):  # interleaved
                        t_mkl += timed(mkl, 1)
                        t_dnn += timed(dnn, 1)
                    ratio = statistics.median(t_mkl) / statistics.median(t_dnn)
                    row[f"{name} MKL/oneDNN"] = f"{ratio:.2f}"
                    row[f"{name} GF/s"] = (
                        f"{2 * batch * n_in * n_out / min(statistics.median(t_mkl), statistics.median(t_dnn)) / 1e9:.0f}"
                    )
                weights = n_in * n_out
                row["tspg uses"] = (
                    "MKL"
                    if weights < ONEDNN_MIN_WEIGHTS
                    else "oneDNN"
                    if weights >= ONEDNN_MIN_WEIGHTS_GRAD
                    else "oneDNN, MKL for the weights' grad"
                )
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores; MKL time / oneDNN time per product "
        f"(above 1: oneDNN is faster), medians of {args.reps}; GF/s of the faster one; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
