"""How real are the transitions? Both recipes and the mean-shift baseline on the demo.

For each target class, recipe and training seed (one fixed train/held-out split), trains a
generator on scanpy's pbmc68k_reduced and measures it on the held-out non-target samples
with ``tspg.metrics.evaluate``. Prints one row per target and recipe (medians over seeds)
plus the mean-shift baseline, and the seed stability of the consensus top-20 up genes.

    python bench/quality.py                      # 3 targets x 2 recipes x 3 seeds
    python bench/quality.py --ablation           # the paper's recipe, one change at a time
    python bench/quality.py --targets "CD19+ B" --seeds 0 --recipes tspg+
    python bench/quality.py --targets "CD56+ NK" --recipes tspg+ --set ed_repulsion=0.7
    python bench/quality.py --targets all --recipes tspg+                 # every demo class + goal table
    python bench/quality.py --targets all --recipes tspg+ --ensemble 3 --seeds 0 1 2 3 4 5
    python bench/quality.py --targets "CD14+ Monocyte" --recipes tspg+ --by-source

Every run of a seed shares one target model (trained with that seed) across the targets:
the figures are those of training each target from scratch with that seed (the target
model's training depends on the seed and the data only), in less time. ``train s`` is the
generator's training time plus the target model's.

``--ensemble N`` groups the seeds into consecutive groups of N: each group trains one
target model (the group's first seed) and N generators against it, and is measured as one
ensemble whose perturbation is the members' mean P = mean_i (clip(x + G_i(x), 0, 1) - x);
Jaccard is then between the groups' consensus genes (independent ensembles, each with its
own target model). ``--by-source`` prints, per target and source class, TSPG's consensus
genes of that source against differential expression of the target vs that source alone
and the per-source mean shift (bench/sources.py).

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

import numpy as np
import torch

from tspg.bundle import Bundle
from tspg.config import TrainConfig
from tspg.datasets import DEMO_LABEL_KEY, demo
from tspg.metrics import evaluate
from tspg.pipeline import TARGET_MODEL_FIELDS, train

TARGETS = ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]


class MeanPerturbation(torch.nn.Module):
    """An ensemble as one generator: returns the members' mean P = mean_i (clip(x + G_i(x), 0, 1) - x).

    x + mean P lies in [0, 1], so clip(x + this(x), 0, 1) - x is the mean P exactly and every
    tspg function that perturbs with ``bundle.generator`` perturbs with the ensemble.
    """

    def __init__(self, generators):
        super().__init__()
        self.members = torch.nn.ModuleList(generators)

    def forward(self, x):
        return torch.stack([(x + G(x)).clamp(0.0, 1.0) - x for G in self.members]).mean(0)


_TARGET_MODELS: dict = {}


def shared_target_model(adata, target, config, seed):
    """The bundle whose target model every target of this seed (and target-model config) reuses."""
    key = (seed, tuple(getattr(config, f) for f in TARGET_MODEL_FIELDS))
    return _TARGET_MODELS.get(key), key


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


def train_group(adata, target: str, overrides: dict, seeds) -> tuple[Bundle, float]:
    """One bundle for ``seeds``: the first seed's target model (shared across targets) and
    one generator per seed; several generators are wrapped in :class:`MeanPerturbation`."""
    overrides = dict(overrides)
    recipe = overrides.pop("recipe")
    members, seconds = [], 0.0
    for seed in seeds:
        config = TrainConfig.for_recipe(recipe, seed=seed, **overrides)
        f_bundle, key = shared_target_model(adata, target, config, seeds[0])
        bundle = train(
            adata,
            label_key=DEMO_LABEL_KEY,
            target=target,
            config=config,
            target_model=f_bundle,
            device="cpu",
            dataset="pbmc68k_reduced",
        )
        if f_bundle is None:
            _TARGET_MODELS[key] = bundle
            f_bundle = bundle
        seconds += bundle.metrics["train_seconds_generator"]
        members.append(bundle)
    seconds += f_bundle.metrics["train_seconds_target_model"]
    first = members[0]
    if len(members) == 1:
        return first, seconds
    ensemble = Bundle(
        first.manifest,
        MeanPerturbation([b.generator for b in members]).eval(),
        first.discriminator,
        first.target_model,
    )
    return ensemble, seconds


def run_one(adata, target: str, overrides: dict, seeds, by_source: bool = False) -> dict:
    bundle, seconds = train_group(adata, target, overrides, list(seeds))
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
        "down": ev["top_genes"]["consensus_down"],
        "seconds": seconds,
        "n_heldout_target": ev["samples"]["heldout_target"],
        "by_source": source_comparison(bundle, adata) if by_source else None,
        "u": unbiased_distances(adata, bundle),
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


def unbiased_distances(adata, bundle) -> dict:
    """Energy distances as U-statistics (``ens_cache.energy_distance_u``: the zero self-distances
    left out, so a small set is not penalised): perturbed (x_adv), mean-shifted and real
    training target samples against the real held-out target samples, and x_adv and the
    mean-shifted samples against the real *training* target samples."""
    from ens_cache import energy_distance_u

    from tspg.baselines import class_perturbations, mean_shift_perturb, split_arrays
    from tspg.perturbation import perturb_scaled

    Xtr, ytr, _ = split_arrays(adata, bundle, part="train")
    Xte, yte, _ = split_arrays(adata, bundle, part="test")
    t, non = bundle.target, yte != bundle.target
    x_adv = perturb_scaled(Xte[non], bundle, predict=False).x_adv
    shifts = class_perturbations(Xtr, ytr, t, genes=bundle.genes)
    x_ms = mean_shift_perturb(Xte[non], yte[non], shifts)
    held, train_t = Xte[yte == t], Xtr[ytr == t]
    return {
        "tspg": energy_distance_u(x_adv, held),
        "ms": energy_distance_u(x_ms, held),
        "real": energy_distance_u(train_t, held),
        "tspg_train": energy_distance_u(x_adv, train_t),
        "ms_train": energy_distance_u(x_ms, train_t),
        "n_train_target": int(len(train_t)),
    }


def u_table(goals) -> str:
    """The energy distances as U-statistics (medians over seeds; mean shift and real: first run)."""
    lines = [
        "",
        "Energy distance as a U-statistic (unbiased; can be negative): to the real held-out target "
        "(TSPG / mean shift / real training target cells), to the real training target cells "
        "(TSPG / mean shift), and the gap held-out minus training (TSPG / mean shift)",
        "",
        "| target | recipe | held-out / training target | E (U) to held-out: TSPG / MS / real | to training: TSPG / MS | gap: TSPG / MS |",
        "|" + "---|" * 6,
    ]
    for target, name, _, _, runs in goals:
        u = {k: statistics.median(r["u"][k] for r in runs) for k in runs[0]["u"]}
        lines.append(
            f"| {target} | {name} | {runs[0]['n_heldout_target']} / {runs[0]['u']['n_train_target']} "
            f"| {fmt(u['tspg'])} / {fmt(u['ms'])} / {fmt(u['real'])} | {fmt(u['tspg_train'])} / {fmt(u['ms_train'])} "
            f"| {fmt(u['tspg'] - u['tspg_train'])} / {fmt(u['ms'] - u['ms_train'])} |"
        )
    return "\n".join(lines)


def source_comparison(bundle, adata) -> list[dict]:
    """bench/sources.py's per-source comparison for one (ensemble) bundle, every sample."""
    import ens_cache
    import sources

    from tspg.data import align_genes
    from tspg.perturbation import generate_perturbed

    X = bundle.scaler.transform(align_genes(adata, bundle.genes), genes=bundle.genes)
    train_ids = set(bundle.split["train"])
    train_mask = np.array([s in train_ids for s in adata.obs_names])
    ctx = ens_cache.Context(
        "pbmc68k_reduced",
        adata,
        bundle.label_key,
        bundle.config.seed,
        bundle,
        X,
        adata.obs[bundle.label_key].astype(str).to_numpy(),
        list(adata.obs_names),
        train_mask,
        ~train_mask,
        0.0,
    )
    P, _ = generate_perturbed(bundle.generator, X)
    return sources.analyse(ctx, bundle.target, P, "all", 50)["sources"]


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
    down = [jaccard(a["down"], b["down"]) for a, b in itertools.combinations(runs, 2)]
    med["jaccard_down"] = statistics.mean(down) if down else float("nan")
    return med


def goal_table(goals) -> str:
    """One row per target and recipe: the realism goals against mean shift, and why a miss."""
    lines = [
        "",
        "Goals: E-dist at most mean shift's, 15-NN at least mean shift's (medians over seeds); "
        "n = real held-out target samples; real = the real target cells' own 15-NN share and "
        "E-dist (training vs held-out target samples)",
        "",
        "| target | recipe | n | E-dist | mean shift | real | met | 15-NN | mean shift | real | met | Jaccard up / down |",
        "|" + "---|" * 12,
    ]
    for target, name, s, b, runs in goals:
        ed_ok = s["ed"] <= b["ed"]
        knn_ok = s["knn"] >= b["knn"]
        lines.append(
            f"| {target} | {name} | {runs[0]['n_heldout_target']} | {fmt(s['ed'])} | {fmt(b['ed'])} | {fmt(b['ed_training_target'])} "
            f"| {'yes' if ed_ok else 'no'} | {fmt(s['knn'])} | {fmt(b['knn'])} | {fmt(b['knn_real'])} | {'yes' if knn_ok else 'no'} "
            f"| {fmt(s['jaccard'], '.2f')} / {fmt(s['jaccard_down'], '.2f')} |"
        )
    return "\n".join(lines)


def source_table(goals) -> str:
    """Per target and source class: TSPG's genes against per-source DE and mean shift (first run)."""
    lines = [
        "",
        "Per source class (first seed or ensemble; every sample of the source class): overlap of the "
        "top-20 up/down of TSPG_s (TSPG's consensus over that class), DE_s (Wilcoxon, target vs "
        "that class alone) and MS_s (per-source mean shift); TSPG-only = top 20 in TSPG_s and "
        "beyond 50 in both baselines, base-only = top 20 in DE_s and MS_s and beyond 50 in TSPG_s",
        "",
        "| target | recipe | source | n | TSPG_s∩DE_s | TSPG_s∩MS_s | DE_s∩MS_s | TSPG-only | base-only "
        "| within-class variance share P / MS |",
        "|" + "---|" * 10,
    ]
    for target, name, _, _, runs in goals:
        for r in runs[0]["by_source"] or []:
            var = (
                f"{r['within_var_share']:.2f} / {r['within_var_share_ms']:.2f}"
                if "within_var_share" in r
                else "-"
            )
            lines.append(
                f"| {target} | {name} | {r['source']} | {r['n']} | {r['tspg_de_up']}/{r['tspg_de_down']} "
                f"| {r['tspg_ms_up']}/{r['tspg_ms_down']} | {r['de_ms_up']}/{r['de_ms_down']} "
                f"| {len(r['only_tspg_up'])}/{len(r['only_tspg_down'])} | {len(r['only_base_up'])}/{len(r['only_base_down'])} | {var} |"
            )
    return "\n".join(lines)


def fmt(v, spec=".3f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", nargs="+", default=TARGETS, help="target classes, or: all")
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
    p.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="N",
        help="measure ensembles of N generators (consecutive groups of the seeds, one target model each)",
    )
    p.add_argument(
        "--by-source",
        action="store_true",
        help="also compare TSPG's genes per source class with per-source DE and mean shift",
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
    if args.targets == ["all"]:
        args.targets = sorted(adata.obs[DEMO_LABEL_KEY].astype(str).unique())
    n = args.ensemble
    if n < 1 or len(args.seeds) < n:
        p.error(f"--ensemble {n}: give at least {n} seeds")
    groups = [tuple(args.seeds[i : i + n]) for i in range(0, len(args.seeds) - n + 1, n)]
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
    unit = "seeds" if n == 1 else f"ensembles of {n} generators, seeds"
    print(
        f"demo pbmc68k_reduced, split seed 0, {unit} {groups if n > 1 else args.seeds}; held-out non-target samples",
        file=sys.stderr,
    )
    header = (
        "| target | recipe | f | LR | 15-NN | E-dist | spread | Jaccard (min) | DE50 | train s |"
    )
    lines = [header, "|" + "---|" * 10]
    everything = {}
    goals = []  # (target, name, summary, baseline, runs)
    for target in targets:
        baseline = None
        for name, overrides in variants.items():
            runs = []
            for group in groups:
                r = run_one(adata, target, overrides, group, by_source=args.by_source)
                print(
                    f"  {target} / {name} / seed(s) {group}: f {r['f']:.3f} LR {r['lr']:.3f} 15-NN {r['knn']:.3f} E {r['ed']:.3f} ({r['seconds']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(r)
            baseline = runs[0]["baseline"]
            s = summarise(runs)
            goals.append((target, name, s, baseline, runs))
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
    print(goal_table(goals))
    print(u_table(goals))
    if args.by_source:
        print(source_table(goals))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(everything, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
