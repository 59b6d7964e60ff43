"""Trained generators' perturbations, cached on disk, for the ensemble and realism benches.

One generator = (dataset, recipe overrides, target-model seed, target class, generator
seed). Its perturbation P = clip(x + G(x), 0, 1) - x of EVERY sample of the dataset
(scaled space) is stored as ``<root>/<dataset>/<tag>/f<f_seed>/<target>/g<seed>.npz``
together with its training time, so each analysis reads arrays instead of retraining.
All generators of one (dataset, f_seed) share one target model and one split (split seed
0), trained once and saved as a bundle under ``<root>/<dataset>/f<f_seed>-bundle``.

    python bench/ens_cache.py --dataset demo --targets all --seeds 0-9          # fill the cache
    python bench/ens_cache.py --dataset planted --targets all --seeds 0-5 --set epochs=90

Used as a module by bench/ensemble.py and bench/quality.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tspg.bundle import load_bundle, save_bundle, slug
from tspg.config import TrainConfig
from tspg.data import align_genes
from tspg.datasets import DEMO_LABEL_KEY, demo
from tspg.perturbation import class_probabilities, generate_perturbed
from tspg.pipeline import train

ROOT = Path(os.environ.get("TSPG_ENS_CACHE", "/tmp/tspg_ens"))


# ----------------------------------------------------------------------------- datasets


def planted_gem(
    *,
    n_classes: int = 6,
    n_genes: int = 600,
    n_up: int = 20,
    n_down: int = 20,
    effect: float = 1.0,
    seed: int = 0,
    label_key: str = "label",
):
    """A log-expression-like GEM whose classes have planted up and down gene programs.

    Each class c raises ``n_up`` genes (up program) and lowers ``n_down`` other genes (down
    program, chosen among well-expressed genes so that they can go down); programs of
    different classes are disjoint. Effects are ``effect`` x U(0.6, 1.4) log units (noise sd
    0.5 per value, per-gene baselines Gamma(2, 1)). Two nuisance programs shared by all
    classes (a 'cell cycle' on in 30% of samples, a 'library size' factor on every gene)
    give the data structure that is not the label. Class sizes are unequal (20 to 200).

    Returns
    -------
    AnnData with ``obs[label_key]`` and ``uns["planted"] = {class: {"up": [...], "down": [...]}}``.
    """
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    sizes = np.linspace(200, 20, n_classes).round().astype(int)
    y = np.repeat(np.arange(n_classes), sizes)
    base = rng.gamma(2.0, 1.0, n_genes)
    order = rng.permutation(n_genes)
    expressed = [g for g in order if base[g] > 1.2]
    low = [g for g in order if base[g] <= 1.2]
    programs = {}
    shift = np.zeros((n_classes, n_genes))
    for c in range(n_classes):
        down = [expressed.pop() for _ in range(n_down)]
        up = [(low or expressed).pop() for _ in range(n_up)]
        shift[c, up] = effect * rng.uniform(0.6, 1.4, n_up)
        shift[c, down] = -effect * rng.uniform(0.6, 1.4, n_down) * np.minimum(base[down], 2.0) / 2.0
        programs[c] = (up, down)
    n = len(y)
    cycle_genes = rng.choice(n_genes, 30, replace=False)
    cycling = rng.random(n) < 0.3
    X = base + shift[y] + rng.normal(0, 0.5, (n, n_genes))
    X[np.ix_(cycling, cycle_genes)] += 1.0
    X *= rng.lognormal(0, 0.1, n)[:, None]  # library size
    X = np.clip(X, 0, None).astype(np.float32)
    genes = [f"g{j:04d}" for j in range(n_genes)]
    names = [f"class-{c}" for c in range(n_classes)]
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame(
            {label_key: pd.Categorical([names[c] for c in y])},
            index=[f"s{i:05d}" for i in range(n)],
        ),
        var=pd.DataFrame(index=genes),
    )
    adata.uns["planted"] = {
        names[c]: {"up": [genes[g] for g in up], "down": [genes[g] for g in down]}
        for c, (up, down) in programs.items()
    }
    adata.uns["tspg_import"] = {"source": "planted", "n_missing_filled": 0}
    return adata


DATASETS = {
    "demo": (lambda: demo(), DEMO_LABEL_KEY),
    "planted": (lambda: planted_gem(effect=1.0), "label"),
    "subtle": (lambda: _named(planted_gem(effect=0.35, seed=1), "subtle"), "label"),
}


def _named(adata, name):
    adata.uns["tspg_import"] = {"source": name, "n_missing_filled": 0}
    return adata


_LOADED: dict = {}


def load_dataset(name: str):
    """(AnnData, label key) of a named dataset (loaded once per process)."""
    if name not in _LOADED:
        make, key = DATASETS[name]
        _LOADED[name] = (make(), key)
    return _LOADED[name]


# ----------------------------------------------------------------------------- cache


def tag_of(overrides: dict) -> str:
    """Folder name of a recipe: ``tspg+`` plus its overrides, sorted."""
    return "tspg+" + "".join(f",{k}={v}" for k, v in sorted(overrides.items()))


@dataclass
class Context:
    """One dataset with its shared target model, split and scaled data."""

    name: str
    adata: object
    label_key: str
    f_seed: int
    bundle: object  # the bundle whose target model (and split, scaler) everything reuses
    X: np.ndarray  # every sample, scaled, the bundle's genes
    labels: np.ndarray
    samples: list
    train: np.ndarray  # boolean masks
    test: np.ndarray
    target_seconds: float

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.classes)

    def f_proba(self, X: np.ndarray) -> np.ndarray:
        return class_probabilities(self.bundle.target_model, X)


_CONTEXTS: dict = {}


def context(name: str, f_seed: int = 0) -> Context:
    """The dataset, its target model trained with ``f_seed`` (cached on disk) and arrays."""
    key = (name, f_seed)
    if key in _CONTEXTS:
        return _CONTEXTS[key]
    adata, label_key = load_dataset(name)
    folder = ROOT / name / f"f{f_seed}-bundle"
    info = ROOT / name / f"f{f_seed}-bundle.json"
    if not (folder / "manifest.json").exists():
        classes = sorted(adata.obs[label_key].astype(str).unique())
        config = TrainConfig.for_recipe("tspg+", seed=f_seed, epochs=1)
        start = time.perf_counter()
        b = train(
            adata,
            label_key=label_key,
            target=classes[0],
            config=config,
            device="cpu",
            dataset=name,
            name=f"f{f_seed}-bundle",
        )
        seconds = b.metrics["train_seconds_target_model"]
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_bundle(b, folder.parent, overwrite=True)
        info.write_text(
            json.dumps({"target_seconds": seconds, "wall": time.perf_counter() - start})
        )
    b = load_bundle(folder)
    X = b.scaler.transform(align_genes(adata, b.genes), genes=b.genes)
    samples = list(adata.obs_names)
    tr = set(b.split["train"])
    train_mask = np.array([s in tr for s in samples])
    ctx = Context(
        name,
        adata,
        label_key,
        f_seed,
        b,
        X,
        adata.obs[label_key].astype(str).to_numpy(),
        samples,
        train_mask,
        ~train_mask,
        json.loads(info.read_text())["target_seconds"],
    )
    _CONTEXTS[key] = ctx
    return ctx


def path_of(name: str, overrides: dict, f_seed: int, target: str, seed: int) -> Path:
    return ROOT / name / tag_of(overrides) / f"f{f_seed}" / slug(target) / f"g{seed}.npz"


def generator_P(
    name: str,
    target: str,
    seed: int,
    *,
    f_seed: int = 0,
    overrides: dict | None = None,
    train_missing: bool = True,
) -> tuple[np.ndarray, float]:
    """(P of every sample, generator training seconds), trained and cached when missing."""
    overrides = dict(overrides or {})
    path = path_of(name, overrides, f_seed, target, seed)
    if path.exists():
        with np.load(path) as z:
            return z["P"], float(z["seconds"])
    if not train_missing:
        raise FileNotFoundError(path)
    ctx = context(name, f_seed)
    hooks = {k: overrides.pop(k) for k in list(overrides) if k in BENCH_HOOKS}
    config = TrainConfig.for_recipe("tspg+", seed=seed, **overrides)
    undo = _install_hooks(hooks)
    try:
        b = train(
            ctx.adata,
            label_key=ctx.label_key,
            target=target,
            config=config,
            target_model=ctx.bundle,
            device="cpu",
            dataset=name,
        )
    finally:
        undo()
    P, _ = generate_perturbed(b.generator, ctx.X)
    seconds = b.metrics["train_seconds_generator"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, P=P.astype(np.float32), seconds=seconds)
    tmp.rename(path)
    return P, seconds


def parse_seeds(text: list[str]) -> list[int]:
    """``["0-9"]`` or ``["0", "1", "2"]`` -> a list of ints."""
    out = []
    for t in text:
        a, _, b = t.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


# Experiment-only changes to the training, keyed ``bench_<name>`` in the overrides (they are
# no TrainConfig field): installed by monkeypatching tspg.training while one generator trains.
BENCH_HOOKS = ("bench_ref_noise",)


def _install_hooks(hooks: dict):
    """Patch tspg.training for the ``bench_*`` overrides; returns a function that undoes it.

    ``bench_ref_noise=h``: L_ed compares x_adv with the real target samples plus Gaussian
    noise of h x each gene's standard deviation over those samples (clipped to [0, 1]), a
    smoothed target distribution instead of the few training cells themselves.
    """
    import tspg.training as tr

    original = tr.energy_distance
    h = float(hooks.get("bench_ref_noise", 0.0))
    if not h:
        return lambda: None
    gen = torch.Generator().manual_seed(12345)

    def smoothed(a, b, *, repulsion=1.0):
        sd = b.std(0, keepdim=True) if len(b) > 1 else torch.zeros_like(b[:1])
        noise = torch.randn(b.shape, generator=gen).to(b.device) * sd * h
        return original(a, (b + noise).clamp(0.0, 1.0), repulsion=repulsion)

    tr.energy_distance = smoothed

    def undo():
        tr.energy_distance = original

    return undo


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name in BENCH_HOOKS:
            out[name] = float(value)
            continue
        kind = type(getattr(TrainConfig(), name, None))
        if kind not in (int, float, str):
            raise SystemExit(f"--set {item}: not a number or word field of TrainConfig")
        out[name] = kind(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="demo", choices=list(DATASETS))
    p.add_argument("--targets", nargs="+", default=["all"])
    p.add_argument("--seeds", nargs="+", default=["0-2"])
    p.add_argument("--f-seeds", nargs="+", default=["0"])
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE")
    p.add_argument("--shard", default="0/1", help="i/n: train only every n-th job from i")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    overrides = parse_set(args.set)
    i, n = map(int, args.shard.split("/"))
    jobs = []
    for f_seed in parse_seeds(args.f_seeds):
        ctx = context(args.dataset, f_seed)
        targets = ctx.classes if args.targets == ["all"] else args.targets
        for seed in parse_seeds(args.seeds):
            for t in targets:
                jobs.append((f_seed, t, seed))
    jobs = jobs[i::n]
    start = time.perf_counter()
    for j, (f_seed, t, seed) in enumerate(jobs):
        cached = path_of(args.dataset, overrides, f_seed, t, seed).exists()
        _, s = generator_P(args.dataset, t, seed, f_seed=f_seed, overrides=overrides)
        print(
            f"[{j + 1}/{len(jobs)} {time.perf_counter() - start:.0f}s] {args.dataset} {tag_of(overrides)} "
            f"f{f_seed} {t} g{seed}: {'cached' if cached else f'{s:.1f} s'}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- realism


_CLASSIFIERS: dict = {}


def classifiers(ctx: Context) -> dict:
    """LR and 15-NN fit on the context's training split (as ``tspg.metrics.evaluate`` fits them)."""
    from tspg.metrics import fit_classifiers

    key = (ctx.name, ctx.f_seed)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS[key] = fit_classifiers(ctx.X[ctx.train], ctx.labels[ctx.train], seed=0)
    return _CLASSIFIERS[key]


def source_rows(ctx: Context, target: str, part: str = "test") -> np.ndarray:
    """Boolean mask of the held-out (or training) samples whose class is not ``target``."""
    return getattr(ctx, part) & (ctx.labels != target)


def energy_distance_u(A: np.ndarray, B: np.ndarray) -> float:
    """Energy distance as a U-statistic: the self-distance means leave out the zero diagonal.

    Unbiased for the population energy distance (so it can be slightly negative); unlike the
    V-statistic of ``tspg.metrics.energy_distance`` it does not add mean d(B, B') / n_B to
    every row of a target with few held-out samples, nor mean d(A, A') / n_A to a small A.
    """
    from tspg.metrics import pairwise_distances

    def self_mean(X):
        n = len(X)
        return pairwise_distances(X).sum() / (n * (n - 1)) if n > 1 else float("nan")

    return float(2 * pairwise_distances(A, B).mean() - self_mean(A) - self_mean(B))


def realism(ctx: Context, target: str, X_adv: np.ndarray) -> dict:
    """f / LR / 15-NN target share, energy distance and spread of ``X_adv`` vs the real held-out target.

    The same definitions as ``tspg.metrics.evaluate`` (its functions are called here).
    """
    from tspg.metrics import energy_distance, spread_ratio, target_share

    real_t = ctx.X[ctx.test & (ctx.labels == target)]
    t = ctx.classes.index(target)
    clf = classifiers(ctx)
    return {
        "f": float((ctx.f_proba(X_adv).argmax(1) == t).mean()),
        "lr": target_share(clf["logistic_regression"].predict(X_adv), target),
        "knn": target_share(clf["knn_15"].predict(X_adv), target),
        "ed": energy_distance(X_adv, real_t),
        "ed_u": energy_distance_u(X_adv, real_t),
        "spread": spread_ratio(X_adv, real_t),
    }


def yardsticks(ctx: Context, target: str) -> dict:
    """Realism of the mean-shift baseline, the unperturbed sources and the real target cells."""
    from tspg.baselines import class_perturbations, mean_shift_perturb
    from tspg.metrics import energy_distance, spread_ratio, target_share

    rows = source_rows(ctx, target)
    tr = ctx.train
    shifts = class_perturbations(ctx.X[tr], ctx.labels[tr], target, genes=ctx.bundle.genes)
    X_ms = mean_shift_perturb(ctx.X[rows], ctx.labels[rows], shifts)
    real_t = ctx.X[ctx.test & (ctx.labels == target)]
    train_t = ctx.X[tr & (ctx.labels == target)]
    clf = classifiers(ctx)
    return {
        "mean_shift": realism(ctx, target, X_ms),
        "unperturbed": {
            "ed": energy_distance(ctx.X[rows], real_t),
            "ed_u": energy_distance_u(ctx.X[rows], real_t),
        },
        "real": {
            "lr": target_share(clf["logistic_regression"].predict(real_t), target),
            "knn": target_share(clf["knn_15"].predict(real_t), target),
            "ed": energy_distance(train_t, real_t),
            "ed_u": energy_distance_u(train_t, real_t),
            "spread": spread_ratio(train_t, real_t),
        },
        "n_real_heldout": int(len(real_t)),
        "n_real_train": int(len(train_t)),
        "n_sources": int(rows.sum()),
    }
