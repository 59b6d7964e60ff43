"""Mixed precision (``--precision bfloat16``) on a CPU with native bfloat16: speed and results.

Prints tables (not a test). For each dataset, recipe and seed, one generator is trained in
float32 and in bfloat16 (the same seed, split and data) and compared on the held-out
non-target samples:

- speed: seconds of the target model and of the generator (whole runs, this process);
- results: the held-out perturbation accuracy, the verdict, and the top-20 up / down genes of
  the mean P. ``shared f32-bf16`` counts the genes the two precisions' lists share; the noise
  floor beside it, ``shared f32-f32``, counts what float32 runs of two different seeds share
  (seed i against seed i+1). A precision that changes the answer less than a new seed does
  is within the method's own noise.
- planted truth (``planted``: tspg.datasets.planted_gem, 4 classes, 20 up and 20 down genes
  planted per class): the share of the top-20 up / down genes that are the planted ones.

Then GTEx-sized epochs (tspg.datasets.synthetic_gem, 9,352 training samples x 4,386 genes):
seconds per epoch of each precision, ``--gtex-epochs`` each, interleaved.

    python bench/precision.py                                  # demo + planted, 3 seeds, and GTEx
    python bench/precision.py --datasets demo --recipes paper --seeds 0 1 2 --gtex-epochs 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tspg  # noqa: E402, F401 - before torch: the OpenMP spin count, read when torch loads


def dataset(name: str):
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo, planted_gem

    if name == "demo":
        return demo(), DEMO_LABEL_KEY, DEMO_TARGET
    return planted_gem(600, 500, n_classes=4, n_up=20, n_down=20, seed=0), "label", "type-00"


def top_genes(bundle, adata, label_key: str) -> dict[str, list[str]]:
    """The top-20 up / down genes of the mean P over the held-out non-target samples."""
    from tspg.ranking import rank_genes

    test = set(bundle.split["test"])
    keep = [
        i
        for i, (s, c) in enumerate(zip(adata.obs_names, adata.obs[label_key], strict=True))
        if s in test and str(c) != bundle.target
    ]
    out = tspg.perturb(adata[keep].copy(), bundle, copy=True)
    table = rank_genes(out.layers["tspg_perturbation"], list(out.var_names), k=20)
    return {d: list(table.loc[table["direction"] == d, "gene"]) for d in ("up", "down")}


def runs(args) -> list[dict]:
    from tspg.config import TrainConfig
    from tspg.datasets import truth_recovery

    rows = []
    for name in args.datasets:
        adata, key, target = dataset(name)
        for recipe in args.recipes:
            for seed in args.seeds:
                for precision in ("float32", "bfloat16"):
                    cfg = TrainConfig.for_recipe(recipe, seed=seed, seeds=1, precision=precision)
                    start = time.perf_counter()
                    b = tspg.train(adata, label_key=key, target=target, config=cfg, dataset=name)
                    seconds = time.perf_counter() - start
                    top = top_genes(b, adata, key)
                    row = {
                        "dataset": name,
                        "recipe": recipe,
                        "seed": seed,
                        "precision": precision,
                        "target model s": b.metrics["train_seconds_target_model"],
                        "generator s": b.metrics["train_seconds_generator"],
                        "run s": seconds,
                        "accuracy": b.metrics["perturbation_accuracy_non_target"],
                        "verdict": b.manifest["verdict"]["level"],
                        "up": top["up"],
                        "down": top["down"],
                    }
                    if name == "planted":
                        rec = truth_recovery(adata, target, up=top["up"], down=top["down"])
                        row.update(planted_up=rec["up"], planted_down=rec["down"])
                    rows.append(row)
                    print(
                        {k: v for k, v in row.items() if k not in ("up", "down")},
                        file=sys.stderr,
                        flush=True,
                    )
    return rows


def summary(rows: list[dict]):
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    for (name, recipe), g in df.groupby(["dataset", "recipe"], sort=False):
        f32 = g[g.precision == "float32"].set_index("seed")
        bf16 = g[g.precision == "bfloat16"].set_index("seed")
        seeds = list(f32.index)

        def shared(a, b, d):
            return len(set(a[d]) & set(b[d]))

        def med(values):
            return statistics.median(values) if values else float("nan")

        row = {"dataset": name, "recipe": recipe, "seeds": len(seeds)}
        for prec, part in (("f32", f32), ("bf16", bf16)):
            row[f"generator s {prec}"] = med(list(part["generator s"]))
            row[f"target s {prec}"] = med(list(part["target model s"]))
            row[f"accuracy {prec}"] = med(list(part["accuracy"]))
            row[f"verdicts {prec}"] = " ".join(part["verdict"])
        for d in ("up", "down"):
            row[f"{d}: shared f32-bf16"] = med([shared(f32.loc[s], bf16.loc[s], d) for s in seeds])
            row[f"{d}: shared f32-f32"] = med(
                [shared(f32.loc[a], f32.loc[b], d) for a, b in zip(seeds, seeds[1:], strict=False)]
            )
        if name == "planted":
            for d in ("up", "down"):
                row[f"planted {d} f32"] = med(list(f32[f"planted_{d}"]))
                row[f"planted {d} bf16"] = med(list(bf16[f"planted_{d}"]))
        out.append(row)
    return pd.DataFrame(out)


def gtex_epochs(epochs: int) -> list[dict]:
    from tspg.config import TrainConfig
    from tspg.datasets import synthetic_gem
    from tspg.pipeline import prepare
    from tspg.training import fit_generator, fit_target

    prep = prepare(synthetic_gem(), label_key="label", dataset="gtex")
    X, y = prep.X[prep.train_idx], prep.y[prep.train_idx]
    t = prep.class_index("class-00")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(2):  # interleaved: float32, bfloat16, float32, bfloat16
        for precision in ("float32", "bfloat16"):
            cfg = TrainConfig.for_recipe(
                "paper",
                target_hidden=(512, 256, 128),
                epochs=epochs,
                target_epochs=epochs,
                precision=precision,
            )
            for what, fit in (("target model", fit_target), ("generator", fit_generator)):
                stamps: list[float] = []

                def cb(*a, stamps=stamps):
                    stamps.append(time.perf_counter())

                start = time.perf_counter()
                if what == "target model":
                    f = fit(X, y, len(prep.classes), cfg, callback=cb)
                else:
                    fit(X, y, t, f, cfg, callback=cb)
                steps = [b - a for a, b in zip([start, *stamps], stamps, strict=False)][1:]
                times.setdefault((what, precision), []).extend(steps)
    return [
        {
            "epoch of": what,
            "precision": p,
            "s/epoch (median)": statistics.median(v),
            "epochs": len(v),
        }
        for (what, p), v in times.items()
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--datasets", nargs="+", default=["demo", "planted"], choices=["demo", "planted"]
    )
    p.add_argument("--recipes", nargs="+", default=["paper", "tspg+"], choices=["paper", "tspg+"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--gtex-epochs", type=int, default=3, help="timed epochs at GTEx size (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: tspg's)")
    args = p.parse_args(argv)

    import pandas as pd
    import torch

    from tspg.training import cpu_has_bfloat16, use_threads

    if not cpu_has_bfloat16():
        sys.exit("this CPU has no native bfloat16 (avx512_bf16 or amx_bf16): nothing to compare")
    threads = use_threads(args.threads)
    head = (
        f"torch {torch.__version__}, CPU, {threads} threads; paper sizes unless stated; "
        f"load average {{:.1f}} at the end"
    )
    rows = runs(args) if args.datasets else []
    gtex = gtex_epochs(args.gtex_epochs) if args.gtex_epochs else []
    print(head.format(os.getloadavg()[0]))
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        if rows:
            print(summary(rows).T.to_string(header=False, float_format=lambda v: f"{v:.3f}"))
        if gtex:
            print(
                "\nGTEx-sized (9,352 x 4,386, 53 classes), paper recipe, the reference code's "
                "sizes (target model 512-256-128), epochs after the first:"
            )
            print(pd.DataFrame(gtex).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
