"""How real are the transitions? Both recipes and the mean-shift baseline on the demo.

For each target class, recipe and training seed (one fixed train/held-out split), trains a
generator on scanpy's pbmc68k_reduced and measures it on the held-out non-target samples
with ``tspg.metrics.evaluate``. Prints one row per target and recipe (medians over seeds)
plus the mean-shift baseline, and the seed stability of the consensus top-20 up genes.

    python bench/quality.py                      # 3 targets x 2 recipes x 3 seeds
    python bench/quality.py --ablation           # the paper's recipe, one change at a time
    python bench/quality.py --targets "CD19+ B" --seeds 0 --recipes tspg+
    python bench/quality.py --targets "CD56+ NK" --recipes tspg+ --set ed_repulsion=0.7

Columns: f = target model, LR = logistic regression, 15-NN: share of x_adv each labels as
the target; E-dist = energy distance to the real held-out target samples; spread = mean
pairwise distance of x_adv over that of the real held-out target; Jaccard = mean pairwise
Jaccard of the consensus top-20 up genes over the seeds; DE50 = how many of those 20 are
among the 50 highest differential-expression scores (target vs rest, training split).
The "real target cells" row is the reference a perfect generator would meet: LR and 15-NN
on the real held-out target samples, E-dist and spread of the real training target samples.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import torch

from tspg.config import TrainConfig
from tspg.datasets import DEMO_LABEL_KEY, demo
from tspg.metrics import evaluate
from tspg.pipeline import train

TARGETS = ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]

# The paper's recipe, then one change at a time towards tspg+ (the README explains each).
ABLATION = {
    "paper": {"recipe": "paper"},
    "paper, L_adv averaged not summed": {"recipe": "paper", "adv_reduce": "mean"},
    "paper, D sees target samples as real": {"recipe": "paper", "disc_real": "target"},
    "paper, no L_norm": {"recipe": "paper", "w_norm": 0.0},
    "paper, no L_td": {"recipe": "paper", "w_td": 0.0},
    "paper, L_td weight 10": {"recipe": "paper", "w_td": 10.0},
    "paper, 300 epochs": {"recipe": "paper", "epochs": 300},
    "tspg+ without L_ed": {"recipe": "tspg+", "w_ed": 0.0},
    "tspg+ with full repulsion (proper E-distance)": {"recipe": "tspg+", "ed_repulsion": 1.0},
    "tspg+ with 150 epochs": {"recipe": "tspg+", "epochs": 150},
    "tspg+": {"recipe": "tspg+"},
}


def run_one(adata, target: str, overrides: dict, seed: int) -> dict:
    overrides = dict(overrides)
    config = TrainConfig.for_recipe(overrides.pop("recipe"), seed=seed, **overrides)
    start = time.perf_counter()
    bundle = train(
        adata,
        label_key=DEMO_LABEL_KEY,
        target=target,
        config=config,
        device="cpu",
        dataset="pbmc68k_reduced",
    )
    seconds = time.perf_counter() - start
    ev = evaluate(adata, bundle)
    clf = ev["independent_classifiers"]
    return {
        "f": ev["perturbation_accuracy"]["non_target"],
        "lr": clf["logistic_regression"]["target_share_perturbed"],
        "knn": clf["knn_15"]["target_share_perturbed"],
        "ed": ev["energy_distance"]["perturbed"],
        "spread": ev["spread_ratio"]["perturbed"],
        "de50": ev["top_genes"]["overlap_up_de_top50"],
        "up": ev["top_genes"]["consensus_up"],
        "seconds": seconds,
        "baseline": {
            "lr": clf["logistic_regression"]["target_share_mean_shift"],
            "knn": clf["knn_15"]["target_share_mean_shift"],
            "ed": ev["energy_distance"]["mean_shift"],
            "spread": ev["spread_ratio"]["mean_shift"],
            "ed_unperturbed": ev["energy_distance"]["unperturbed"],
            # a perfect copy of the target: its real training samples, and what the
            # classifiers call its real held-out samples
            "ed_training_target": ev["energy_distance"]["training_target"],
            "spread_training_target": ev["spread_ratio"]["training_target"],
            "lr_real": clf["logistic_regression"]["target_share_real_target"],
            "knn_real": clf["knn_15"]["target_share_real_target"],
        },
    }


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else float("nan")


def summarise(runs: list[dict]) -> dict:
    med = {
        k: statistics.median(r[k] for r in runs)
        for k in ("f", "lr", "knn", "ed", "spread", "de50", "seconds")
    }
    pairs = [jaccard(a["up"], b["up"]) for a, b in itertools.combinations(runs, 2)]
    med["jaccard"] = statistics.mean(pairs) if pairs else float("nan")
    med["jaccard_min"] = min(pairs) if pairs else float("nan")
    return med


def fmt(v, spec=".3f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", nargs="+", default=TARGETS)
    p.add_argument("--recipes", nargs="+", default=["tspg+", "paper"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--ablation",
        action="store_true",
        help="one target (default CD19+ B), the variants of ABLATION",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="override TrainConfig fields of every recipe, e.g. ed_repulsion=0.7",
    )
    p.add_argument("--json", help="also write every run's figures here")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (these networks are small: 1 is fastest on a busy 2-core machine)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    adata = demo()
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        kind = type(getattr(TrainConfig(), name, None))
        if kind not in (int, float, str):
            p.error(f"--set {item}: not a number or word field of TrainConfig")
        overrides[name] = kind(value)
    suffix = "".join(f", {k}={v}" for k, v in overrides.items())
    variants = (
        ABLATION
        if args.ablation
        else {r + suffix: {"recipe": r, **overrides} for r in args.recipes}
    )
    targets = args.targets if not args.ablation or args.targets != TARGETS else ["CD19+ B"]
    print(
        f"demo pbmc68k_reduced, split seed 0, training seeds {args.seeds}; held-out non-target samples",
        file=sys.stderr,
    )
    header = (
        "| target | recipe | f | LR | 15-NN | E-dist | spread | Jaccard (min) | DE50 | train s |"
    )
    lines = [header, "|" + "---|" * 10]
    everything = {}
    for target in targets:
        baseline = None
        for name, overrides in variants.items():
            runs = []
            for seed in args.seeds:
                r = run_one(adata, target, overrides, seed)
                print(
                    f"  {target} / {name} / seed {seed}: f {r['f']:.3f} LR {r['lr']:.3f} 15-NN {r['knn']:.3f} E {r['ed']:.3f} ({r['seconds']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(r)
            baseline = runs[0]["baseline"]
            s = summarise(runs)
            everything[f"{target} / {name}"] = runs
            lines.append(
                f"| {target} | {name} | {fmt(s['f'])} | {fmt(s['lr'])} | {fmt(s['knn'])} | {fmt(s['ed'])} | {fmt(s['spread'], '.2f')} "
                f"| {fmt(s['jaccard'], '.2f')} ({fmt(s['jaccard_min'], '.2f')}) | {s['de50']:.0f} | {s['seconds']:.1f} |"
            )
        lines.append(
            f"| {target} | mean shift | - | {fmt(baseline['lr'])} | {fmt(baseline['knn'])} | {fmt(baseline['ed'])} | {fmt(baseline['spread'], '.2f')} | - | - | - |"
        )
        lines.append(
            f"| {target} | unperturbed | - | - | - | {fmt(baseline['ed_unperturbed'])} | - | - | - | - |"
        )
        lines.append(
            f"| {target} | real target cells | - | {fmt(baseline['lr_real'])} | {fmt(baseline['knn_real'])} | {fmt(baseline['ed_training_target'])} "
            f"| {fmt(baseline['spread_training_target'], '.2f')} | - | - | - |"
        )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(everything, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
