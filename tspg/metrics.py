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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .baselines import (
    class_perturbations,
    de_ranked,
    fit_baselines,
    mean_shift_perturb,
    selection_overlap,
    source_comparison,
    split_arrays,
)
from .data import subsample
from .errors import UserError
from .perturbation import (
    Perturbation,
    consensus_top,
    discriminate,
    ensemble_perturbed,
    perturb_scaled,
    unique_top_genes,
)

if TYPE_CHECKING:
    from .bundle import Bundle

logger = logging.getLogger(__name__)

__all__ = [
    "KNN_NEIGHBOURS",
    "energy_distance",
    "evaluate",
    "evaluation_table",
    "fit_classifiers",
    "mean_pairwise_distance",
    "pairwise_distances",
    "perturbation_accuracy",
    "perturbation_accuracy_table",
    "spread_ratio",
    "target_share",
]

KNN_NEIGHBOURS = 15
# evaluate() on big data: at most this many training / held-out samples (a fixed, seeded,
# class-stratified subsample). The held-out cap bounds the energy distances (all pairs).
EVAL_MAX_TRAIN = 20_000
EVAL_MAX_HELDOUT = 5_000
_SMALL_BLAS = 4_000_000  # values (samples x genes) up to which sklearn runs on one BLAS thread
_ROWS = 1024  # row block for distance sums: memory O(_ROWS * n), never n x n
_SAMPLE_KEYS = ("train", "heldout", "heldout_target", "heldout_source")


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


def target_model_figures(
    pred: Sequence[str], labels: Sequence[str], target: str, *, n_classes: int
) -> dict:
    """How well the target model tells the classes, and the target class, apart.

    Returns
    -------
    ``heldout_accuracy`` over ``n`` samples; ``majority_rate`` (the accuracy of always
    answering the most frequent class) and ``chance`` (1 / ``n_classes``), what guessing
    reaches; ``target_recall`` (share of the ``n_target`` target samples called the target),
    ``target_precision`` (share of the ``n_called_target`` samples called the target that
    are), and ``target_prevalence`` (share of target samples, the precision of a guess).
    Shares over no samples are NaN.
    """
    pred = np.asarray(pred, dtype=object).astype(str)
    labels = np.asarray(labels, dtype=object).astype(str)
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} predictions for {len(labels)} labels")
    is_t, called = labels == target, pred == target
    counts = np.unique(labels, return_counts=True)[1]
    return {
        "heldout_accuracy": _mean(pred == labels),
        "n": int(len(labels)),
        "majority_rate": float(counts.max() / len(labels)) if len(labels) else float("nan"),
        "chance": 1.0 / n_classes,
        "target_recall": _mean(called[is_t]),
        "n_target": int(is_t.sum()),
        "target_precision": _mean(is_t[called]),
        "n_called_target": int(called.sum()),
        "target_prevalence": _mean(is_t),
    }


def target_margin(proba: np.ndarray, target_index: int) -> np.ndarray:
    """Per sample, the target model's logit of its call minus its logit of the target.

    Computed as log p_call - log p_target from the softmax probabilities (equal to the
    logit difference); 0 for samples called the target. A probability that underflowed
    to 0 counts as the smallest float32, so the margin is capped at about 104. A large
    margin means a saturated softmax: p_target and its gradient are practically 0.
    """
    proba = np.asarray(proba, dtype=np.float64)
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    logp = np.log(np.clip(proba, tiny, None))
    return logp.max(1) - logp[:, target_index] if len(proba) else np.zeros(0)


def movement_figures(
    P: np.ndarray,
    x: np.ndarray,
    target_mean: np.ndarray | None,
    pred_before: Sequence[str],
    pred_after: Sequence[str],
    target: str,
) -> dict:
    """How far the generator moved some samples, and whether their call changed.

    Returns
    -------
    ``mean_abs_P``: mean |P| over samples and genes (scaled units); ``mean_abs_gap``: mean
    |target mean - x|, how far the samples are from the target class's training mean;
    ``reach``: their ratio (0 when nothing moved, about 0.5-1 when a generator moves the
    samples most of the way); ``changed_share``: share of the ``n_not_target_before``
    samples the target model did not call the target before whose call changed;
    ``n``: samples. NaN where a share rests on no sample (or no target mean is known).
    """
    P = np.asarray(P, dtype=np.float64)
    gap_sum = (
        float(np.abs(np.asarray(target_mean, np.float64) - np.asarray(x, np.float64)).sum())
        if target_mean is not None
        else None
    )
    return movement_from_sums(
        float(np.abs(P).sum()), gap_sum, P.size, pred_before, pred_after, target
    )


def movement_from_sums(
    abs_P_sum: float,
    gap_sum: float | None,
    n_values: int,
    pred_before: Sequence[str],
    pred_after: Sequence[str],
    target: str,
) -> dict:
    """:func:`movement_figures` from sums over the values (samples x genes) of |P| and of
    |target mean - x| (``gap_sum``; None without a target mean): for data perturbed a
    chunk of samples at a time."""
    before = np.asarray(pred_before, dtype=object).astype(str)
    after = np.asarray(pred_after, dtype=object).astype(str)
    mean_abs_P = abs_P_sum / n_values if n_values else float("nan")
    gap = gap_sum / n_values if gap_sum is not None and n_values else float("nan")
    not_t = before != target
    return {
        "mean_abs_P": mean_abs_P,
        "mean_abs_gap": gap,
        "reach": mean_abs_P / gap if gap > 0 else float("nan"),
        "changed_share": _mean(after[not_t] != before[not_t]),
        "n": int(len(before)),
        "n_not_target_before": int(not_t.sum()),
    }


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


def classifier_shares(
    classifiers: dict,
    Xte: np.ndarray,
    yte: Sequence[str],
    sets: dict[str, np.ndarray],
    real_target: np.ndarray,
    target: str,
) -> dict:
    """Per classifier: its held-out accuracy, and the share of each set it calls ``target``.

    Returns
    -------
    ``{name: {"heldout_accuracy", "target_share_<set>" for each of ``sets``,
    "target_share_real_target"}}``; NaN for an empty set.
    """
    yte = np.asarray(yte, dtype=object).astype(str)

    def share(model, X):
        return target_share(model.predict(X), target) if len(X) else float("nan")

    out = {}
    for name, model in classifiers.items():
        out[name] = {"heldout_accuracy": _mean(model.predict(Xte) == yte) if len(Xte) else math.nan}
        for s, X in sets.items():
            out[name][f"target_share_{s}"] = share(model, X)
        out[name]["target_share_real_target"] = share(model, real_target)
    return out


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


# ----------------------------------------------------------------------------- held-out figures


@dataclass
class HeldOut:
    """The held-out split of a bundle, perturbed, with the figures its verdict grades.

    ``sets`` holds the source (non-target) samples perturbed (x_adv), unperturbed (x) and
    mean-shifted; ``real_target`` the real held-out target samples; ``figures`` the dict of
    :func:`heldout_figures`. For a seed ensemble, ``sets["perturbed"]`` is x + the members'
    mean P and ``members`` holds each generator's own x_adv of the same samples (empty for one
    generator): realism figures of "perturbed" are the median over ``members`` (see
    :func:`heldout_arrays`).
    """

    perturbation: Perturbation
    Xte: np.ndarray
    yte: np.ndarray
    shifts: pd.DataFrame
    sets: dict[str, np.ndarray]
    real_target: np.ndarray
    figures: dict
    members: list[np.ndarray] = field(default_factory=list)


def heldout_arrays(
    bundle: Bundle,
    Xtr: np.ndarray,
    ytr: Sequence[str],
    Xte: np.ndarray,
    yte: Sequence[str],
    samples: Sequence[str] | None = None,
    *,
    classifiers: dict | None = None,
    seed: int = 0,
    max_train: int | None = None,
    max_heldout: int | None = None,
) -> HeldOut:
    """Perturb the held-out split and compute the figures the verdict grades.

    The one place these figures are computed: :func:`evaluate` reports them and
    :func:`tspg.verdict.grade` grades them, at training time and in ``tspg evaluate``.

    Parameters
    ----------
    bundle
        The bundle (its generator, target model, target and target mean).
    Xtr, ytr
        Scaled training split and its labels (for the independent classifiers and the
        mean shift).
    Xte, yte, samples
        Scaled held-out split, its labels and sample ids.
    classifiers
        Already fitted :func:`fit_classifiers` (on ``Xtr``), e.g. shared by the targets
        of one run; fitted here when None.
    seed
        Seed of the classifiers and of the subsamples.
    max_train, max_heldout
        At most about this many training samples fit the classifiers, and this many
        held-out source and this many held-out target samples are scored by them and by
        the energy distances (seeded, stratified subsamples; None: all); the target
        model's figures and the movement use every held-out sample. ``samples`` in the
        figures says what was used.
    """
    target = bundle.target
    ytr = np.asarray(ytr, dtype=object).astype(str)
    yte = np.asarray(yte, dtype=object).astype(str)
    Xte = np.asarray(Xte)
    pert = perturb_scaled(Xte, bundle, samples=samples, labels=yte)
    is_t, non = yte == target, yte != target
    # the classifiers' shares and the energy distances (O(n^2)) on at most max_heldout
    # source and max_heldout target samples; everything else on the whole split
    t_idx, s_idx = np.flatnonzero(is_t), np.flatnonzero(non)
    t_idx = t_idx[subsample(yte[t_idx], max_heldout, seed=seed, min_per_class=1)]
    s_idx = s_idx[subsample(yte[s_idx], max_heldout, seed=seed, min_per_class=1)]
    graded = np.sort(np.concatenate([t_idx, s_idx]))
    shifts = class_perturbations(Xtr, ytr, target, genes=bundle.genes)
    sets = {
        "perturbed": pert.x_adv[s_idx],
        "unperturbed": Xte[s_idx],
        "mean_shift": mean_shift_perturb(Xte[s_idx], yte[s_idx], shifts),
    }
    real_t = Xte[t_idx]
    target_mean = bundle.target_mean
    if target_mean is None and (ytr == target).any():
        target_mean = Xtr[ytr == target].mean(0)
    if classifiers is None:
        fit = subsample(ytr, max_train, seed=seed, min_per_class=1)
        classifiers = fit_classifiers(np.asarray(Xtr)[fit], ytr[fit], seed=seed)
    # samples the classifiers were fit on (the k-NN remembers them)
    n_fit = max(getattr(m, "n_samples_fit_", 0) for m in classifiers.values()) or len(ytr)
    before, after = pert.pred_before, pert.pred_after
    margin = target_margin(pert.proba_before[non], bundle.classes.index(bundle.target))
    figures = {
        "samples": {
            "train": len(ytr),
            "heldout": len(yte),
            "heldout_target": int(is_t.sum()),
            "heldout_source": int(non.sum()),
            "graded_target": len(t_idx),
            "graded_source": len(s_idx),
            "classifier_train": n_fit,
        },
        "target_model": {
            **target_model_figures(before, yte, target, n_classes=len(bundle.classes)),
            "margin_source_median": float(np.median(margin)) if len(margin) else math.nan,
        },
        "perturbation_accuracy": perturbation_accuracy(after, yte, target),
        "movement": movement_figures(
            pert.P[non], Xte[non], target_mean, before[non], after[non], target
        ),
        "independent_classifiers": classifier_shares(
            classifiers, Xte[graded], yte[graded], sets, real_t, target
        ),
        "energy_distance": {s: energy_distance(X, real_t) for s, X in sets.items()},
    }
    members = _member_x_adv(bundle, pert, Xte, s_idx)
    if members:
        _realism_over_members(figures, members, classifiers, real_t, target)
    return HeldOut(pert, Xte, yte, shifts, sets, real_t, _plain(figures), members)


def _member_x_adv(
    bundle: Bundle, pert: Perturbation, Xte: np.ndarray, rows: np.ndarray
) -> list[np.ndarray]:
    """Each generator's own x_adv = x + P_i of a seed ensemble's ``rows`` (none for one):
    from the members' P the perturbation kept, else (data beyond its memory cap) by running
    the members on these rows only."""
    if bundle.n_generators == 1:
        return []
    P_members = pert.members_of(rows)
    if P_members is None:
        _, _, P_members = ensemble_perturbed(bundle, Xte[rows])
    return [np.clip(Xte[rows] + P_i, 0.0, 1.0) for P_i in P_members]


def _realism_over_members(figures: dict, members, classifiers, real_t, target) -> None:
    """A seed ensemble's realism figures, in place: "perturbed" becomes the median over its
    generators' own x_adv, and "ensemble_mean" keeps x + mean P.

    x + mean P averages the members' moves, so it is less varied than real cells and reads
    as less real than any one generator (energy distance +0.07 on the demo, median over the
    classes; bench/ENSEMBLE_NOTES.md section 2), while pooling the members' x_adv biases the
    V-statistic the other way: the median over members is what one generator would score.
    """
    ed = figures["energy_distance"]
    ed["ensemble_mean"] = ed["perturbed"]
    ed["perturbed"] = float(np.median([energy_distance(X, real_t) for X in members]))
    for name, model in classifiers.items():
        shares = figures["independent_classifiers"][name]
        shares["target_share_ensemble_mean"] = shares["target_share_perturbed"]
        each = [target_share(model.predict(X), target) for X in members]
        shares["target_share_perturbed"] = float(np.median(each))
    figures["samples"]["generators"] = len(members)


def heldout_figures(bundle: Bundle, Xtr, ytr, Xte, yte, samples=None, **kwargs) -> dict:
    """The figures of :func:`heldout_arrays` alone (plain JSON types, NaN as None)."""
    n_threads = torch.get_num_threads()
    try:
        with _small_blas(Xtr):
            return heldout_arrays(bundle, Xtr, ytr, Xte, yte, samples, **kwargs).figures
    finally:
        torch.set_num_threads(n_threads)


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    adata: ad.AnnData,
    bundle: Bundle,
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
    adata
        The bundle's dataset (see :func:`tspg.datasets.load_bundle_dataset`): every sample
        of the split, the bundle's genes, labels in ``obs[label_key]``.
    bundle
        A loaded bundle; ``bundle.split`` names the training and held-out samples.
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
    - ``samples``: numbers of training, held-out, held-out target and source samples
    - ``target_model``: held-out accuracy, the target's recall and precision, and what
      guessing reaches (:func:`target_model_figures`), and the median logit margin of the
      source samples over the target (:func:`target_margin`)
    - ``samples`` also holds ``train_total`` / ``heldout_total``: the sizes of the splits
      (larger than the numbers used when the splits were subsampled)
    - ``perturbation_accuracy``: overall, non_target, by_source (n, accuracy)
    - ``movement``: mean |P| of the sources, how far they are from the target mean, and
      the share whose call changed (:func:`movement_figures`)
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
      (target vs rest, all source classes together)
    - ``by_source``: per source class of the held-out split, TSPG's top-k genes of that
      class beside differential expression of the target against that class alone and its
      mean shift (:func:`tspg.baselines.source_comparison`): ``sources`` (one record per
      class: n, perturbation accuracy, overlaps, TSPG-only and baseline-only counts, flags;
      ``status`` says when a class has too few held-out samples) and ``genes`` (one record
      per gene of those lists)
    - ``stability``: how the generators of a seed ensemble agree on their top-k genes over
      the held-out source samples (:func:`tspg.verdict.stability_figures`)
    - ``verdict``: :func:`tspg.verdict.grade` of these figures (ok / caution / fail)
    - ``params``: k, ks, seed, layer, label key; ``seconds``: wall time
    """
    start = time.perf_counter()
    n_threads = (
        torch.get_num_threads()
    )  # scikit-learn's thread pools change torch's; restored below
    try:
        return _evaluate(
            adata,
            bundle,
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


def _evaluate(adata, bundle, *, layer, label_key, k, ks, seed, start, caps) -> dict:
    label_key = label_key or bundle.label_key
    target = bundle.target
    Xtr, ytr, _ = split_arrays(
        adata,
        bundle,
        layer=layer,
        label_key=label_key,
        part="train",
        max_samples=caps[0],
        seed=seed,
    )
    Xte, yte, te_ids = split_arrays(
        adata, bundle, layer=layer, label_key=label_key, part="test", max_samples=caps[1], seed=seed
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
        raise UserError(
            f"data: label {unknown[0]!r} is not one of the bundle's classes; is {label_key!r} the right label column?"
        )
    if not (yte != target).any():
        raise UserError("the held-out split has no source (non-target) samples to perturb")
    with _small_blas(Xtr):
        held = heldout_arrays(bundle, Xtr, ytr, Xte, yte, te_ids, seed=seed)
        base = fit_baselines(adata, bundle, layer=layer, label_key=label_key)
        result = _evaluate_arrays(bundle, held, base, Xtr, ytr, k=k, ks=ks, seed=seed)
    from .verdict import grade, stability_figures

    src = yte != target
    kept = held.perturbation.members_of(src)  # the members' P, when the perturbation kept it
    result["stability"] = stability_figures(
        bundle,
        Xte[src],
        k=k,
        members_mean_P=None if kept is None else kept.mean(1, dtype=np.float64),
    )
    result["verdict"] = grade(
        heldout=held.figures,
        stability=result["stability"],
        config=bundle.manifest.get("config"),
        target=target,
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


def _evaluate_arrays(bundle, held: HeldOut, base, Xtr, ytr, *, k, ks, seed) -> dict:
    target = bundle.target
    pert, Xte, yte, sets, real_t = (
        held.perturbation,
        held.Xte,
        held.yte,
        held.sets,
        held.real_target,
    )
    fig = held.figures
    non = yte != target
    references = {**sets, "training_target": Xtr[ytr == target]}

    P_src = pert.P[non]
    P_ms = sets["mean_shift"] - Xte[non]  # the change made, as P is
    overlap_df = selection_overlap(P_src, Xte[non], yte[non], bundle.genes, base, ks=ks)
    top_k = consensus_top(P_src, bundle.genes, k=k)
    de_lists = de_ranked(base.de)
    up_k = top_k["up"]
    unique = unique_top_genes(P_src, yte[non], bundle.genes, k=k, seed=seed)
    by_source = source_comparison(
        P_src,
        Xte[non],
        yte[non],
        bundle.genes,
        base,
        target=target,
        k=k,
        pred_after=pert.pred_after[non],
        members=pert.members_of(non),
    )

    return {
        "bundle": {
            "name": bundle.name,
            "dataset": bundle.manifest.get("dataset", {}).get("name"),
            "target": target,
            "genes": len(bundle.genes),
            "classes": len(bundle.classes),
        },
        "samples": {
            **{k_: fig["samples"][k_] for k_ in _SAMPLE_KEYS},
            "train_total": len(bundle.split["train"]),
            "heldout_total": len(bundle.split["test"]),
        },
        "target_model": fig["target_model"],
        "perturbation_accuracy": fig["perturbation_accuracy"],
        "movement": fig["movement"],
        "independent_classifiers": fig["independent_classifiers"],
        "energy_distance": {
            **fig["energy_distance"],
            "training_target": energy_distance(references["training_target"], real_t),
        },
        "spread_ratio": _spread_ratios(references, held.members, real_t),
        "discriminator": _discriminator_scores(bundle, sets, held.members, real_t),
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
        "by_source": by_source.to_dict(),
    }


def _spread_ratios(references: dict, members: list, real_t: np.ndarray) -> dict:
    """Spread of each set against the real target; for a seed ensemble "perturbed" is the
    median over its generators' own x_adv, "ensemble_mean" x + mean P (as in
    :func:`_realism_over_members`)."""
    out = {s: spread_ratio(X, real_t) for s, X in references.items()}
    if members:
        out["ensemble_mean"] = out["perturbed"]
        out["perturbed"] = float(np.median([spread_ratio(X, real_t) for X in members]))
    return out


def _discriminator_scores(bundle: Bundle, sets: dict, members: list, real_t) -> dict:
    """Mean D(x) of each set; for a seed ensemble, each generator's x_adv is scored by its
    own discriminator and "perturbed" is their median ("ensemble_mean": x + mean P by the
    first generator's discriminator; "real_target" likewise)."""
    out = {
        "real_target": _mean(discriminate(real_t, bundle)),
        **{s: _mean(discriminate(X, bundle)) for s, X in sets.items()},
    }
    if members:
        out["ensemble_mean"] = out["perturbed"]
        each = [_mean(discriminate(X, bundle, member=i)) for i, X in enumerate(members)]
        out["perturbed"] = float(np.median(each))
    return out


def evaluation_table(result: dict) -> pd.DataFrame:
    """:func:`evaluate`'s result as a long table: ``section``, ``metric``, ``value``.

    Gene lists are left out (they are in ``result["top_genes"]``); the overlap records
    become rows ``<baseline> <direction> top-<k>`` with value ``overlap (Jaccard)``.
    """
    rows = []

    def add(section, metric, value):
        rows.append({"section": section, "metric": metric, "value": value})

    for key in ("samples", "target_model", "movement"):
        for m, v in result.get(key, {}).items():
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
            "top-gene overlap with baselines, all source classes together (target vs rest)",
            f"{OVERLAP_LABELS.get(r['baseline'], r['baseline'])} {r['direction']} top-{r['k']}",
            f"{r['overlap']} ({_fmt(r['jaccard'])})",
        )
    add("run", "seconds", result.get("seconds"))
    return pd.DataFrame(rows, columns=["section", "metric", "value"])


# how the global overlap rows name their baseline
OVERLAP_LABELS = {
    "differential_expression": "differential expression (target vs rest)",
    "mean_shift": "mean shift (each sample's class)",
}

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
