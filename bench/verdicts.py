"""The verdict (tspg/verdict.py) on the ten demo targets and on cases known to be bad.

Prints Markdown tables:

1. ``demo``: every class of the demo (scanpy's pbmc68k_reduced, label bulk_labels) as the
   target, default recipe, one generator each sharing one target model (as
   ``tspg-train --demo --all-targets``): the verdict stored at training time, each check's
   level and key figures, next to the independent figures of ``tspg evaluate`` (and
   whether evaluate's verdict equals the stored one), and the seconds grading took.
2. ``bad``: a target model trained on shuffled labels; the CD14+ Monocyte generator with
   its last layer zeroed; pbmc68k_reduced's z-scored ``.X`` given for perturbation.
3. ``collapse``: the paper's recipe on a synthetic "bulk microarray" of two well separated
   classes and 10,000 genes (80 samples), where its generator collapses, next to tspg+.
4. ``timing``: ``tspg-train --demo`` (CD14+ Monocyte) a few times: training seconds and
   the seconds the verdict adds.
5. ``large`` (not in the default run): the seconds of the training-time verdict on a
   GTEx-sized GEM, where it grades seeded subsamples.

    python bench/verdicts.py                       # everything, one thread (~6 min quiet)
    python bench/verdicts.py --cases demo bad      # some of it
    python bench/verdicts.py --models /tmp/vm      # keep the demo bundles; reuse them next time
    python bench/verdicts.py --cases large         # the verdict's cost at GTEx size
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tspg.bundle import Bundle, list_bundles, load_bundle, save_bundle
from tspg.config import TrainConfig
from tspg.datasets import DEMO_LABEL_KEY, DEMO_NAME, DEMO_TARGET, demo, synthetic_gem
from tspg.metrics import evaluate
from tspg.perturbation import perturb_adata
from tspg.pipeline import train, train_all_targets
from tspg.verdict import selection_verdict, verdict_lines

SHORT = {"ok": "ok", "caution": "CAUTION", "fail": "FAIL"}
CHECKS = ("target_model", "moved", "agreement", "realism", "sample_size")


def fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def fig(verdict: dict, check: str, key: str):
    return verdict["checks"].get(check, {}).get("figures", {}).get(key, {}).get("value")


def demo_bundles(adata, models: Path | None) -> list[Bundle]:
    """One bundle per demo class (default recipe), from ``models`` when it holds them all."""
    classes = sorted(adata.obs[DEMO_LABEL_KEY].astype(str).unique())
    if models is not None and models.is_dir():
        found = {e.manifest["target"]: e.path for e in list_bundles(models) if e.manifest}
        if set(classes) <= set(found):
            return [load_bundle(found[c]) for c in classes]
    bundles = train_all_targets(
        adata, label_key=DEMO_LABEL_KEY, config=TrainConfig(), device="cpu", dataset=DEMO_NAME
    )
    if models is not None:
        for b in bundles:
            save_bundle(b, models, overwrite=True)
    return bundles


def demo_table(adata, bundles: list[Bundle]) -> None:
    print("## The ten demo targets (default recipe; verdict stored at training time)\n")
    print(
        "| target | n t | verdict | f model | moved | agree | real | size "
        "| recall | prec | reach | changed | f acc "
        "| LR x_adv (real) | 15-NN x_adv (real) | E x_adv / x / ms | = evaluate | grade s |"
    )
    print("|" + "---|" * 18)
    for b in bundles:
        v = b.manifest["verdict"]
        ev = evaluate(adata, b)
        clf, ed = ev["independent_classifiers"], ev["energy_distance"]
        lv = [SHORT[v["checks"][c]["level"]] for c in CHECKS]
        lr, knn = clf["logistic_regression"], clf["knn_15"]
        print(
            f"| {b.target} | {ev['samples']['heldout_target']} | **{SHORT[v['level']]}** | "
            + " | ".join(lv)
            + f" | {fmt(fig(v, 'target_model', 'target_recall'))}"
            f" | {fmt(fig(v, 'target_model', 'target_precision'))}"
            f" | {fmt(fig(v, 'moved', 'reach'))} | {fmt(fig(v, 'moved', 'changed_share'))}"
            f" | {fmt(ev['perturbation_accuracy']['non_target'])}"
            f" | {fmt(lr['target_share_perturbed'])} ({fmt(lr['target_share_real_target'])})"
            f" | {fmt(knn['target_share_perturbed'])} ({fmt(knn['target_share_real_target'])})"
            f" | {fmt(ed['perturbed'], 3)} / {fmt(ed['unperturbed'], 3)} / {fmt(ed['mean_shift'], 3)}"
            f" | {'yes' if ev['verdict'] == v else 'NO'}"
            f" | {b.metrics.get('train_seconds_verdict', float('nan')):.2f} |"
        )
    print()
    for b in bundles:
        v = b.manifest["verdict"]
        if v["level"] != "ok":
            print(f"- {b.target}:")
            for line in verdict_lines(v, only=("fail", "caution"))[1:]:
                print(f"  {line.strip()}")
    print()


def zeroed(bundle: Bundle) -> Bundle:
    G = copy.deepcopy(bundle.generator)
    last = [m for m in G.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    manifest = copy.deepcopy(bundle.manifest)
    manifest["name"] += "-zeroed"
    manifest.pop("verdict", None)
    return Bundle(manifest, G, bundle.discriminator, bundle.target_model)


def bad_cases(adata, bundles: list[Bundle] | None) -> None:
    print("## Cases known to be bad\n")
    rows = []
    shuffled = adata.copy()
    rng = np.random.default_rng(0)
    shuffled.obs[DEMO_LABEL_KEY] = (
        shuffled.obs[DEMO_LABEL_KEY].to_numpy()[rng.permutation(shuffled.n_obs)].astype(str)
    )
    b = train(
        shuffled,
        label_key=DEMO_LABEL_KEY,
        target=DEMO_TARGET,
        config=TrainConfig(),
        device="cpu",
        dataset="pbmc68k_reduced, labels shuffled",
    )
    rows.append(("target model trained on shuffled labels (CD14+ Monocyte)", b.manifest["verdict"]))
    mono = next((x for x in bundles or [] if x.target == DEMO_TARGET), None)
    if mono is None:
        mono = train(
            adata, label_key=DEMO_LABEL_KEY, target=DEMO_TARGET, device="cpu", dataset=DEMO_NAME
        )
    rows.append(
        ("CD14+ Monocyte generator, last layer zeroed", evaluate(adata, zeroed(mono))["verdict"])
    )
    import scanpy as sc

    z = sc.datasets.pbmc68k_reduced()  # .X is z-scored; the demo trains on .raw (log-normalised)
    rows.append(
        (
            "pbmc68k_reduced's z-scored .X perturbed with the CD14+ Monocyte bundle",
            selection_verdict(mono, perturb_adata(z, mono)),
        )
    )
    for what, v in rows:
        print(f"- **{what}**: {SHORT[v['level']]}")
        for line in verdict_lines(v)[1:]:
            print(f"  {line.strip()}")
    print()


def collapse(n_genes: int) -> None:
    print(f"## The paper's recipe on two well separated classes, {n_genes:,} genes\n")
    adata = synthetic_gem(n_samples=80, n_genes=n_genes, n_classes=2, seed=0)
    print(
        "| recipe | target | verdict | moved | mean abs P | reach | f acc | logit margin | LR x_adv | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    reasons = []
    for recipe in ("paper", "tspg+"):
        start = time.perf_counter()
        bundles = train_all_targets(
            adata,
            label_key="label",
            config=TrainConfig.for_recipe(recipe),
            device="cpu",
            dataset="synthetic",
        )
        seconds = time.perf_counter() - start
        for b in bundles:
            v = b.manifest["verdict"]
            print(
                f"| {recipe} | {b.target} | {SHORT[v['level']]} | {SHORT[v['checks']['moved']['level']]}"
                f" | {fmt(fig(v, 'moved', 'mean_abs_P'), 3)} | {fmt(fig(v, 'moved', 'reach'))}"
                f" | {fmt(b.metrics['perturbation_accuracy_non_target'])}"
                f" | {fmt(fig(v, 'moved', 'margin_source_median'), 1)}"
                f" | {fmt(fig(v, 'agreement', 'logistic_regression_perturbed'))}"
                f" | {seconds / len(bundles):.0f} |"
            )
            if v["checks"]["moved"]["level"] != "ok":
                reasons.append(f"- {recipe}, {b.target}: {v['checks']['moved']['reason']}")
    print("\n" + "\n".join(reasons) + "\n")


def timing(adata, runs: int) -> None:
    print(f"## Seconds the verdict adds to tspg-train --demo ({runs} runs)\n")
    total, graded = [], []
    for _ in range(runs):
        start = time.perf_counter()
        b = train(
            adata, label_key=DEMO_LABEL_KEY, target=DEMO_TARGET, device="cpu", dataset=DEMO_NAME
        )
        total.append(time.perf_counter() - start)
        graded.append(b.metrics["train_seconds_verdict"])
    t, g = statistics.median(total), statistics.median(graded)
    print("| training s (median) | of which the verdict s | share |")
    print("|---|---|---|")
    print(f"| {t:.2f} | {g:.2f} | {100 * g / t:.1f}% |")
    print(
        f"\nall runs: training {[round(x, 2) for x in total]}, verdict {[round(x, 2) for x in graded]}\n"
    )


def large(n_samples: int, n_genes: int, n_classes: int) -> None:
    """Seconds of the training-time verdict on a GTEx-sized GEM (untrained networks: the
    cost of grading does not depend on what the networks learned)."""
    from tspg.bundle import new_manifest
    from tspg.data import subsample
    from tspg.metrics import fit_classifiers
    from tspg.nets import Discriminator, Generator, TargetClassifier
    from tspg.pipeline import prepare
    from tspg.verdict import MAX_HELDOUT, MAX_TRAIN, heldout_verdict

    print(
        f"## The training-time verdict on {n_samples:,} samples x {n_genes:,} genes, {n_classes} classes\n"
    )
    adata = synthetic_gem(n_samples, n_genes, n_classes, seed=0)
    prep = prepare(adata, label_key="label", dataset="synthetic")
    names = np.asarray(prep.classes, dtype=object)
    tr, te = prep.train_idx, prep.test_idx
    ytr, yte = names[prep.y[tr]], names[prep.y[te]]
    target = prep.classes[0]
    torch.manual_seed(0)
    manifest = new_manifest(
        name="large",
        classes=prep.classes,
        target=target,
        genes=prep.genes,
        config=TrainConfig().to_dict(),
        target_mean=prep.X[tr][ytr == target].mean(0).tolist(),
    )
    bundle = Bundle(
        manifest,
        Generator(n_genes).eval(),
        Discriminator(n_genes).eval(),
        TargetClassifier(n_genes, n_classes).eval(),
    )
    print("| step | seconds | samples |")
    print("|---|---|---|")
    start = time.perf_counter()
    fit = subsample(ytr, MAX_TRAIN, min_per_class=1)
    classifiers = fit_classifiers(prep.X[tr][fit], ytr[fit])
    print(
        f"| fit the classifiers | {time.perf_counter() - start:.1f} | {len(fit)} of {len(tr)} training |"
    )
    start = time.perf_counter()
    heldout_verdict(bundle, prep.X[tr], ytr, prep.X[te], yte, classifiers=classifiers)
    print(
        f"| grade the held-out split | {time.perf_counter() - start:.1f} | at most {MAX_HELDOUT} source and {MAX_HELDOUT} target of {len(te)} held-out scored |\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", nargs="+", default=["demo", "bad", "collapse", "timing"])
    p.add_argument("--models", type=Path, help="keep (and reuse) the ten demo bundles here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--collapse-genes", type=int, default=10_000)
    p.add_argument("--timing-runs", type=int, default=3)
    p.add_argument(
        "--large",
        default="11688,4386,53",
        help="samples,genes,classes of the 'large' case (GTEx-sized by default)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    adata = demo()
    bundles = None
    if "demo" in args.cases:
        bundles = demo_bundles(adata, args.models)
        demo_table(adata, bundles)
    if "bad" in args.cases:
        bad_cases(adata, bundles)
    if "collapse" in args.cases:
        collapse(args.collapse_genes)
    if "timing" in args.cases:
        timing(adata, args.timing_runs)
    if "large" in args.cases:
        large(*(int(x) for x in args.large.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
