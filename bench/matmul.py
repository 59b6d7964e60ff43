"""MKL or oneDNN for the dense layers' matrix products on this CPU (the threshold in tspg/nets.py).

Prints a table (not a test): for each dense layer shape of the networks (demo: 765 genes,
GTEx-sized: 4,386; the target model's and the generator's hidden widths) and each batch size
of the recipes (32: the paper's target model; 128: a generator step; 256: D's step on real
and fake), the time of the three products of a layer, forward (x W^T + b), the input's
gradient (g W) and the weights' gradient (g^T x), by MKL (torch's float32 default) over the
time by oneDNN: above 1, oneDNN is faster. Medians of ``--reps`` timings of 5 calls each,
the two libraries interleaved; the last column says which one tspg uses for the layer.

``--training``: seconds per epoch of the target model and of the generator (paper recipe,
the reference code's sizes; the demo and a GTEx-sized GEM) with oneDNN on and off
(``tspg.nets.ONEDNN``), alternated run by run in one process, so that a shared machine's
changing load falls on both alike. Each run trains 2 epochs and times the second.

    python bench/matmul.py                 # 1 and 2 threads
    python bench/matmul.py --threads 2 --reps 9
    python bench/matmul.py --training --threads 2 --reps 3
    python bench/matmul.py --quality

``--quality``: does oneDNN change the answer? Planted truth wide enough for oneDNN
(tspg.datasets.planted_gem: 600 samples x 4,200 genes, 4 classes, 20 up and 20 down genes
planted per class): every class as the target, the default recipe with one generator,
oneDNN on and off, and a second seed with oneDNN on for scale. Per run: the share of the
top-20 up / down genes (mean P over the held-out non-target samples) that are planted, the
held-out perturbation accuracy and the verdict; then the top-20 genes that oneDNN on and
off share, beside those that two seeds share. (The demo's layers are too narrow for
oneDNN: its ten classes train on MKL either way.)
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


def training(args) -> None:
    """Epoch times with oneDNN on and off, alternated in one process."""
    import pandas as pd

    import tspg.nets
    from tspg.config import TrainConfig
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo, synthetic_gem
    from tspg.pipeline import prepare
    from tspg.training import fit_generator, fit_target, use_threads

    use_threads(args.threads[0])
    rows = []
    for name, adata, key, target in (
        ("demo", demo(), DEMO_LABEL_KEY, DEMO_TARGET),
        ("GTEx-sized", synthetic_gem(), "label", "class-00"),
    ):
        prep = prepare(adata, label_key=key, dataset=name)
        X, y, t = prep.X[prep.train_idx], prep.y[prep.train_idx], prep.class_index(target)
        cfg = TrainConfig.for_recipe(
            "paper", target_hidden=(512, 256, 128), epochs=2, target_epochs=2
        )
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.reps):
            for on in (True, False):
                tspg.nets.ONEDNN = on
                for stage in ("target model", "generator"):
                    stamps: list[float] = []

                    def stamp(*_, stamps=stamps):
                        stamps.append(time.perf_counter())

                    if stage == "target model":
                        f = fit_target(X, y, len(prep.classes), cfg, callback=stamp)
                    else:
                        fit_generator(X, y, t, f, cfg, callback=stamp)
                    times.setdefault((stage, on), []).append(stamps[1] - stamps[0])
        tspg.nets.ONEDNN = True
        for stage in ("target model", "generator"):
            on, off = (statistics.median(times[(stage, v)]) for v in (True, False))
            rows.append(
                {
                    "data": name,
                    "epoch of": stage,
                    "oneDNN s": f"{on:.3f}",
                    "MKL only s": f"{off:.3f}",
                    "MKL / oneDNN": f"{off / on:.2f}",
                    "runs (oneDNN)": " ".join(f"{v:.3f}" for v in times[(stage, True)]),
                    "runs (MKL)": " ".join(f"{v:.3f}" for v in times[(stage, False)]),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"paper recipe, reference sizes, {args.threads[0]} thread(s), second epoch of each run, "
        f"medians of {args.reps} runs alternated in one process; load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print(pd.DataFrame(rows).to_string(index=False))


def quality(args) -> None:
    """Planted-truth recovery, accuracy and verdicts with oneDNN on and off."""
    import pandas as pd
    from precision import top_genes  # bench/precision.py

    import tspg
    import tspg.nets
    from tspg.config import TrainConfig
    from tspg.datasets import planted_gem, truth_recovery
    from tspg.training import use_threads

    use_threads(args.threads[0])
    adata = planted_gem(600, 4200, n_classes=4, n_up=20, n_down=20, seed=0)
    rows, tops = [], {}
    for target in sorted(adata.obs["label"].unique()):
        for on, seed in ((True, 0), (False, 0), (True, 1)):
            tspg.nets.ONEDNN = on
            cfg = TrainConfig(seed=seed, seeds=1)
            b = tspg.train(adata, label_key="label", target=target, config=cfg, dataset="planted")
            top = tops[(target, on, seed)] = top_genes(b, adata, "label")
            rec = truth_recovery(adata, target, up=top["up"], down=top["down"])
            rows.append(
                {
                    "target": target,
                    "matmul": b.metrics["matmul"],
                    "seed": seed,
                    "planted up": rec["up"],
                    "planted down": rec["down"],
                    "accuracy": b.metrics["perturbation_accuracy_non_target"],
                    "verdict": b.manifest["verdict"]["level"],
                    "not ok": ", ".join(
                        f"{name} ({c['level']})"
                        for name, c in b.manifest["verdict"]["checks"].items()
                        if c["level"] != "ok"
                    ),
                    "generator s": round(b.metrics["train_seconds_generator"], 1),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    tspg.nets.ONEDNN = True
    shared = [
        {
            "target": t,
            **{
                f"{d}: oneDNN on/off": len(set(tops[(t, True, 0)][d]) & set(tops[(t, False, 0)][d]))
                for d in ("up", "down")
            },
            **{
                f"{d}: seed 0/1": len(set(tops[(t, True, 0)][d]) & set(tops[(t, True, 1)][d]))
                for d in ("up", "down")
            },
        }
        for t in sorted({r["target"] for r in rows})
    ]
    print(
        f"planted_gem 600 x 4,200, 4 classes, tspg+ (one generator), {args.threads[0]} thread(s); "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False))
        print("\ntop-20 genes shared (of 20)")
        print(pd.DataFrame(shared).to_string(index=False))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--training", action="store_true", help="epoch times, oneDNN on and off")
    p.add_argument("--quality", action="store_true", help="planted truth, oneDNN on and off")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import tspg  # noqa: F401 - before torch: tspg sets GOMP_SPINCOUNT, read when torch loads

    if args.training:
        return training(args)
    if args.quality:
        return quality(args)
    import pandas as pd
    import torch

    from tspg.nets import ONEDNN_MIN_WEIGHTS, onednn_works

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
                row["tspg uses"] = "oneDNN" if n_in * n_out >= ONEDNN_MIN_WEIGHTS else "MKL"
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
