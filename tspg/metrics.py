"""How well a generator works: perturbation accuracy and how real the perturbed samples look.

The metric functions are plain numpy / scikit-learn on small arrays, so each can be checked
by hand. :func:`evaluate` runs them all for a bundle on the held-out split of its dataset
and returns one JSON-serialisable dict; :func:`evaluation_table` flattens it for printing.

Samples used by :func:`evaluate` (``bundle.split`` holds the sample ids):

- source samples: held-out samples whose label is not the target; "perturbed" is their
  x_adv, "unperturbed" their x, "mean shift" their mean-shift perturbation;
- reference: the real held-out samples of the target class.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .baselines import (
    Baselines,
    class_perturbations,
    de_ranked,
    differential_expression,
    selection_overlap,
    split_arrays,
)
from .bundle import Bundle
from .perturb import consensus_top, discriminate, perturb_scaled, unique_top_genes

logger = logging.getLogger(__name__)

KNN_NEIGHBOURS = 15
# evaluate() on big data: at most this many training / held-out samples (a fixed, seeded,
# class-stratified subsample). The held-out cap bounds the energy distances (all pairs).
EVAL_MAX_TRAIN = 20_000
EVAL_MAX_HELDOUT = 5_000
_SMALL_BLAS = 4_000_000  # values (samples x genes) up to which sklearn runs on one BLAS thread
_ROWS = 1024  # row block for distance sums: memory O(_ROWS * n), never n x n


# ----------------------------------------------------------------------------- accuracy


def perturbation_accuracy(pred_after: Sequence[str], labels: Sequence[str], target: str) -> dict:
    """Share of samples the target model calls ``target`` after perturbation.

    Returns
    -------
    ``{"overall": share over all samples, "non_target": share over samples whose label is
    not the target, "n": int, "n_non_target": int, "by_source": {class: {"n", "accuracy"}}}``
    (classes other than the target, sorted). An empty selection gives NaN.
    """
    pred = np.asarray(pred_after, dtype=object).astype(str)
    labels = np.asarray(labels, dtype=object).astype(str)
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} predictions for {len(labels)} labels")
    hit = pred == target
    non = labels != target
    return {
        "overall": _mean(hit),
        "non_target": _mean(hit[non]),
        "n": int(len(hit)),
        "n_non_target": int(non.sum()),
        "by_source": {
            c: {"n": int((labels == c).sum()), "accuracy": _mean(hit[labels == c])}
            for c in sorted(set(labels.tolist()))
            if c != target
        },
    }


def perturbation_accuracy_table(
    pred_after: Sequence[str], labels: Sequence[str], target: str
) -> pd.DataFrame:
    """The paper's Table 1: ``source``, ``n``, ``accuracy`` per source class, then all non-target."""
    acc = perturbation_accuracy(pred_after, labels, target)
    rows = [{"source": c, **v} for c, v in acc["by_source"].items()]
    rows.append(
        {"source": "all non-target", "n": acc["n_non_target"], "accuracy": acc["non_target"]}
    )
    return pd.DataFrame(rows, columns=["source", "n", "accuracy"])


def target_share(pred: Sequence[str], target: str) -> float:
    """Share of predictions equal to ``target`` (NaN for none)."""
    return _mean(np.asarray(pred, dtype=object).astype(str) == target)


def fit_classifiers(X: np.ndarray, labels: Sequence[str], *, seed: int = 0) -> dict:
    """Classifiers independent of TSPG, fit on (scaled) training data.

    ``logistic_regression`` (multinomial, L2, C = 1, lbfgs) and ``knn_15`` (15 nearest
    neighbours, Euclidean, uniform vote; fewer neighbours when there are fewer samples).
    Both are deterministic.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels, dtype=object).astype(str)
    lr = LogisticRegression(max_iter=500, random_state=seed)
    with warnings.catch_warnings(), _small_blas(X):
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr.fit(X, labels)
    knn = KNeighborsClassifier(n_neighbors=min(KNN_NEIGHBOURS, len(X))).fit(X, labels)
    return {"logistic_regression": lr, f"knn_{KNN_NEIGHBOURS}": knn}


def _small_blas(X: np.ndarray):
    """One BLAS thread for small problems.

    lbfgs on a few hundred samples makes thousands of tiny matrix products; with several
    BLAS threads on a busy machine each one waits for a core, which measured 20x slower
    (3.6 s instead of 0.17 s on the demo). Large problems keep every thread.
    """
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    return (
        threadpool_limits(1, user_api="blas")
        if np.asarray(X).size <= _SMALL_BLAS
        else nullcontext()
    )


# ----------------------------------------------------------------------------- distances


def pairwise_distances(A: np.ndarray, B: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances between the rows of ``A`` and ``B`` (default ``A``), float64.

    With ``B`` omitted the diagonal is exactly zero.
    """
    A = np.atleast_2d(np.asarray(A, dtype=np.float64))
    same = B is None
    B = A if same else np.atleast_2d(np.asarray(B, dtype=np.float64))
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"points of different dimension: {A.shape[1]} and {B.shape[1]}")
    sq = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    D = np.sqrt(np.clip(sq, 0.0, None))
    if same:
        np.fill_diagonal(D, 0.0)
    return D


def _distance_sum(A: np.ndarray, B: np.ndarray | None = None) -> float:
    """Sum of all pairwise distances, row block by row block (the diagonal counts 0)."""
    A = np.asarray(A, dtype=np.float64)
    B_ = A if B is None else np.asarray(B, dtype=np.float64)
    total = 0.0
    for i in range(0, len(A), _ROWS):
        D = pairwise_distances(A[i : i + _ROWS], B_)
        if B is None:  # self-distances: zero the block's diagonal exactly
            j = np.arange(D.shape[0])
            D[j, i + j] = 0.0
        total += float(D.sum())
    return total


def energy_distance(A: np.ndarray, B: np.ndarray) -> float:
    """Energy distance E = 2 mean d(A, B) - mean d(A, A) - mean d(B, B), Euclidean.

    V-statistic: each mean runs over all pairs, the zero self-distances of the diagonal
    included (``mean d(A, A)`` = sum over all n_A^2 pairs / n_A^2). E >= 0, and 0 when the
    two point clouds are identical. NaN when either set is empty.
    """
    A, B = np.atleast_2d(A), np.atleast_2d(B)
    if len(A) == 0 or len(B) == 0:
        return float("nan")
    ab = _distance_sum(A, B) / (len(A) * len(B))
    aa = _distance_sum(A) / len(A) ** 2
    bb = _distance_sum(B) / len(B) ** 2
    return 2 * ab - aa - bb


def mean_pairwise_distance(A: np.ndarray) -> float:
    """Mean Euclidean distance over distinct pairs (off-diagonal); NaN for fewer than 2 points."""
    A = np.atleast_2d(A)
    n = len(A)
    return _distance_sum(A) / (n * (n - 1)) if n >= 2 else float("nan")


def spread_ratio(A: np.ndarray, reference: np.ndarray) -> float:
    """mean_pairwise_distance(A) / mean_pairwise_distance(reference).

    About 1: A is as varied as the reference; near 0: A collapsed onto few points.
    """
    ref = mean_pairwise_distance(reference)
    return mean_pairwise_distance(A) / ref if ref > 0 else float("nan")


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    bundle: Bundle,
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    k: int = 20,
    ks: Sequence[int] = (10, 20, 50),
    seed: int = 0,
    max_train: int | None = EVAL_MAX_TRAIN,
    max_heldout: int | None = EVAL_MAX_HELDOUT,
) -> dict:
    """All metrics of a bundle on the held-out split of the data it was trained on.

    On big data, on a fixed subsample: at most ``max_train`` training samples (baselines,
    independent classifiers) and ``max_heldout`` held-out samples (seeded with ``seed``,
    class-stratified, :func:`tspg.data.subsample`); ``samples`` reports the numbers used
    and the split sizes. None uses every sample.

    Parameters
    ----------
    bundle
        A loaded bundle; ``bundle.split`` names the training and held-out samples.
    adata
        The bundle's dataset (see :func:`tspg.datasets.load_bundle_dataset`): every sample
        of the split, the bundle's genes, labels in ``obs[label_key]``.
    label_key
        Default: the bundle's label key.
    k
        Top genes per direction for the consensus lists and the unique-gene count.
    ks
        List lengths for the overlap with the baselines' top genes.
    seed
        Seed of the random choices: the subsamples of big splits and one sample per
        source class for the unique-gene count; everything else is deterministic.

    Returns
    -------
    dict of sections, all values plain JSON types (NaN becomes None):

    - ``bundle``: name, dataset, target, genes, classes
    - ``samples``: numbers of training, held-out, held-out target and source samples used,
      and ``train_total`` / ``heldout_total``: the sizes of the splits (larger when subsampled)
    - ``target_model``: held-out accuracy
    - ``perturbation_accuracy``: overall, non_target, by_source (n, accuracy)
    - ``independent_classifiers``: per classifier its held-out accuracy and the share of
      perturbed / unperturbed / mean-shift samples it calls the target, and of the real
      held-out target samples (``target_share_real_target``: what real cells reach)
    - ``energy_distance``, ``spread_ratio``, ``discriminator``: perturbed, unperturbed and
      mean-shift sources against the real held-out target (``discriminator`` also scores
      ``real_target``: its mean D(x)); ``energy_distance`` and ``spread_ratio`` also hold
      ``training_target``: the real training samples of the target class, i.e. what a
      generator that copied them exactly would score
    - ``perturbation_size``: mean L2 norm of P and of the mean-shift change x_ms - x (both
      the change actually made, after clipping to [0, 1])
    - ``top_genes``: consensus top-k up/down lists, unique-gene counts, their overlap with
      the differential-expression and mean-shift top genes (a list of records, see
      :func:`tspg.baselines.selection_overlap`), and ``overlap_up_de_top50``: how many of the
      consensus top-k up genes are among the 50 highest differential-expression scores
    - ``params``: k, ks, seed, layer, label key; ``seconds``: wall time
    """
    start = time.perf_counter()
    n_threads = (
        torch.get_num_threads()
    )  # scikit-learn's thread pools change torch's; restored below
    try:
        return _evaluate(
            bundle,
            adata,
            layer=layer,
            label_key=label_key,
            k=k,
            ks=ks,
            seed=seed,
            start=start,
            caps=(max_train, max_heldout),
        )
    finally:
        torch.set_num_threads(n_threads)


def _evaluate(bundle, adata, *, layer, label_key, k, ks, seed, start, caps) -> dict:
    label_key = label_key or bundle.label_key
    target = bundle.target
    Xtr, ytr, _ = split_arrays(
        bundle,
        adata,
        layer=layer,
        label_key=label_key,
        part="train",
        max_samples=caps[0],
        seed=seed,
    )
    Xte, yte, te_ids = split_arrays(
        bundle, adata, layer=layer, label_key=label_key, part="test", max_samples=caps[1], seed=seed
    )
    for part, n, cap in (("training", len(ytr), caps[0]), ("held-out", len(yte), caps[1])):
        total = len(bundle.split["train" if part == "training" else "test"])
        if n < total:
            logger.info(
                "evaluating on a seeded subsample of %d of the %d %s samples (cap %d)",
                n,
                total,
                part,
                cap,
            )
    unknown = sorted(set(yte.tolist()) - set(bundle.classes))
    if unknown:
        raise ValueError(
            f"data: label {unknown[0]!r} is not one of the bundle's classes; is {label_key!r} the right label column?"
        )
    pert = perturb_scaled(bundle, Xte, te_ids, labels=yte)
    is_t, non = yte == target, yte != target
    if not non.any():
        raise ValueError("the held-out split has no source (non-target) samples to perturb")
    base = Baselines(
        class_perturbations(Xtr, ytr, target, genes=bundle.genes),
        differential_expression(Xtr, ytr, bundle.genes, target),
    )
    sets = {
        "perturbed": pert.x_adv[non],
        "unperturbed": Xte[non],
        "mean_shift": base.mean_shift(Xte[non], yte[non]),
    }
    real_t = Xte[is_t]

    with _small_blas(Xtr):
        result = _evaluate_arrays(
            bundle, pert, base, Xtr, ytr, Xte, yte, sets, real_t, k=k, ks=ks, seed=seed
        )
    result["params"] = {
        "k": k,
        "ks": list(ks),
        "seed": seed,
        "layer": layer,
        "label_key": label_key,
        "max_train": caps[0],
        "max_heldout": caps[1],
    }
    result["seconds"] = round(time.perf_counter() - start, 3)
    return _plain(result)


def _evaluate_arrays(bundle, pert, base, Xtr, ytr, Xte, yte, sets, real_t, *, k, ks, seed) -> dict:
    target = bundle.target
    is_t, non = yte == target, yte != target
    classifiers = {}
    for name, model in fit_classifiers(Xtr, ytr, seed=seed).items():
        classifiers[name] = {"heldout_accuracy": _mean(model.predict(Xte) == yte)}
        for s, X in sets.items():
            classifiers[name][f"target_share_{s}"] = target_share(model.predict(X), target)
        classifiers[name]["target_share_real_target"] = target_share(model.predict(real_t), target)
    references = {**sets, "training_target": Xtr[ytr == target]}

    P_src = pert.P[non]
    P_ms = sets["mean_shift"] - Xte[non]  # the change made, as P is
    overlap_df = selection_overlap(P_src, Xte[non], yte[non], bundle.genes, base, ks=ks)
    top_k = consensus_top(P_src, bundle.genes, k=k)
    de_lists = de_ranked(base.de)
    up_k = top_k["up"]
    unique = unique_top_genes(P_src, yte[non], bundle.genes, k=k, seed=seed)

    return {
        "bundle": {
            "name": bundle.name,
            "dataset": bundle.manifest.get("dataset", {}).get("name"),
            "target": target,
            "genes": len(bundle.genes),
            "classes": len(bundle.classes),
        },
        "samples": {
            "train": len(ytr),
            "heldout": len(yte),
            "heldout_target": int(is_t.sum()),
            "heldout_source": int(non.sum()),
            "train_total": len(bundle.split["train"]),
            "heldout_total": len(bundle.split["test"]),
        },
        "target_model": {"heldout_accuracy": _mean(pert.pred_before == yte)},
        "perturbation_accuracy": perturbation_accuracy(pert.pred_after, yte, target),
        "independent_classifiers": classifiers,
        "energy_distance": {s: energy_distance(X, real_t) for s, X in references.items()},
        "spread_ratio": {s: spread_ratio(X, real_t) for s, X in references.items()},
        "discriminator": {
            "real_target": _mean(discriminate(bundle, real_t)),
            **{s: _mean(discriminate(bundle, X)) for s, X in sets.items()},
        },
        "perturbation_size": {
            "tspg_mean_l2": float(np.linalg.norm(P_src, axis=1).mean()),
            "mean_shift_mean_l2": float(np.linalg.norm(P_ms, axis=1).mean()),
        },
        "top_genes": {
            "k": k,
            "consensus_up": top_k["up"],
            "consensus_down": top_k["down"],
            "unique_up": unique["up"],
            "unique_down": unique["down"],
            "unique_n_classes": unique["n_classes"],
            "de_top50_up": de_lists["up"][:50],
            "overlap_up_de_top50": len(set(up_k) & set(de_lists["up"][:50])),
            "overlap": overlap_df.to_dict(orient="records"),
        },
    }


def evaluation_table(result: dict) -> pd.DataFrame:
    """:func:`evaluate`'s result as a long table: ``section``, ``metric``, ``value``.

    Gene lists are left out (they are in ``result["top_genes"]``); the overlap records
    become rows ``<baseline> <direction> top-<k>`` with value ``overlap (Jaccard)``.
    """
    rows = []

    def add(section, metric, value):
        rows.append({"section": section, "metric": metric, "value": value})

    for key in ("samples", "target_model"):
        for m, v in result[key].items():
            add(key.replace("_", " "), m.replace("_", " "), v)
    acc = result["perturbation_accuracy"]
    add("perturbation accuracy", "all held-out", acc["overall"])
    add("perturbation accuracy", f"non-target (n={acc['n_non_target']})", acc["non_target"])
    for c, v in acc["by_source"].items():
        add("perturbation accuracy by source", f"{c} (n={v['n']})", v["accuracy"])
    for name, vals in result["independent_classifiers"].items():
        for m, v in vals.items():
            add(f"independent classifier {name.replace('_', ' ')}", m.replace("_", " "), v)
    for key, label in (
        ("energy_distance", "energy distance to real held-out target"),
        ("spread_ratio", "spread ratio vs real held-out target"),
        ("discriminator", "discriminator mean score"),
    ):
        for m, v in result[key].items():
            add(label, m.replace("_", " "), v)
    for m, v in result["perturbation_size"].items():
        add("perturbation size", m.replace("_", " "), v)
    tg = result["top_genes"]
    add(
        "top genes",
        f"unique up genes, one sample per source class ({tg['unique_n_classes']} classes, k={tg['k']})",
        tg["unique_up"],
    )
    add(
        "top genes",
        f"unique down genes ({tg['unique_n_classes']} classes, k={tg['k']})",
        tg["unique_down"],
    )
    add(
        "top genes",
        f"consensus top-{tg['k']} up genes among the DE top 50",
        tg["overlap_up_de_top50"],
    )
    for r in tg["overlap"]:
        add(
            "top-gene overlap with baselines",
            f"{r['baseline'].replace('_', ' ')} {r['direction']} top-{r['k']}",
            f"{r['overlap']} ({_fmt(r['jaccard'])})",
        )
    add("run", "seconds", result.get("seconds"))
    return pd.DataFrame(rows, columns=["section", "metric", "value"])


# ----------------------------------------------------------------------------- helpers


def _mean(x) -> float:
    x = np.asarray(x)
    return float(x.mean()) if x.size else float("nan")


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _plain(obj):
    """numpy scalars -> Python, NaN -> None, tuples -> lists, recursively."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_plain(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
