"""Baselines to hold TSPG's perturbations against: mean shift and differential expression.

Both are fit on the bundle's training split, in its scaled space ([0, 1] per gene):

- mean shift: the "class perturbation" mu_target - mu_source of each source class (the
  reference implementation's name); a sample moves by its class's shift,
  x_ms = clip(x + mu_t - mu_source(x), 0, 1). Its top genes are ranked by the change it
  makes, x_ms - x, as TSPG's are ranked by P = x_adv - x.
- differential expression: target class vs the rest, Wilcoxon rank-sum test through
  ``scanpy.tl.rank_genes_groups``.

:func:`gene_overlap` compares ranked gene lists (TSPG's consensus top genes against a
baseline's) at several list lengths k; :func:`selection_overlap` does it for a set of
perturbed samples against both baselines (``tspg evaluate`` and the dashboard's Genes page).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from .data import subsample
from .errors import UserError
from .perturbation import consensus_top

if TYPE_CHECKING:
    from .bundle import Bundle

logger = logging.getLogger(__name__)

__all__ = [
    "Baselines",
    "class_perturbations",
    "de_ranked",
    "differential_expression",
    "fit_baselines",
    "gene_overlap",
    "mean_shift_perturb",
    "sample_shifts",
    "selection_overlap",
    "split_arrays",
    "training_target_mean",
]


def class_perturbations(
    X: np.ndarray, labels: Sequence[str], target: str, *, genes: Sequence[str] | None = None
) -> pd.DataFrame:
    """mu_target - mu_class for every class of ``labels`` (the target's own row is zero).

    Returns
    -------
    DataFrame, one row per class (sorted), one column per gene (``genes`` or 0..n-1).
    """
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels, dtype=object).astype(str)
    if len(labels) != len(X):
        raise ValueError(f"{len(labels)} labels for {len(X)} samples")
    classes = sorted(set(labels.tolist()))
    if target not in classes:
        raise UserError(
            f"target class {target!r} has no samples here; classes are {', '.join(classes)}"
        )
    means = np.stack([X[labels == c].mean(0) for c in classes])
    shifts = means[classes.index(target)] - means
    columns = list(genes) if genes is not None else None
    return pd.DataFrame(shifts, index=pd.Index(classes, name="source"), columns=columns)


def sample_shifts(labels: Sequence[str], shifts: pd.DataFrame) -> np.ndarray:
    """The mean shift mu_target - mu_source of each sample's class (samples x genes, float64, unclipped)."""
    labels = np.asarray(labels, dtype=object).astype(str)
    unknown = sorted(set(labels.tolist()) - set(shifts.index))
    if unknown:
        raise UserError(f"class {unknown[0]!r} has no mean shift (it has no training samples)")
    return shifts.to_numpy(dtype=np.float64)[shifts.index.get_indexer(labels)]


def mean_shift_perturb(X: np.ndarray, labels: Sequence[str], shifts: pd.DataFrame) -> np.ndarray:
    """x_ms = clip(x + mu_target - mu_source(x), 0, 1), float32, for scaled ``X``."""
    return np.clip(np.asarray(X, np.float64) + sample_shifts(labels, shifts), 0.0, 1.0).astype(
        np.float32
    )


def differential_expression(
    X: np.ndarray,
    labels: Sequence[str],
    genes: Sequence[str],
    target: str,
    *,
    method: str = "wilcoxon",
) -> pd.DataFrame:
    """Target class vs the rest, per gene, with ``scanpy.tl.rank_genes_groups``.

    ``logfoldchange`` is scanpy's, computed on the values given (scanpy treats them as
    log1p data; on scaled values read it as a direction and rough size only).

    Returns
    -------
    DataFrame sorted by ``score`` (descending): ``gene``, ``score`` (the test statistic),
    ``logfoldchange``, ``pval_adj`` (Benjamini-Hochberg), ``direction`` (``up`` when
    ``score`` > 0, else ``down``). Its top rows are the "up" list, its bottom rows (read
    from the end) the "down" list; :func:`de_ranked` returns both.
    """
    import scanpy as sc

    labels = np.asarray(labels, dtype=object).astype(str)
    if (labels == target).sum() < 2 or (labels != target).sum() < 2:
        raise UserError(
            f"differential expression needs at least 2 samples of {target!r} and 2 others"
        )
    adata = ad.AnnData(
        X=np.asarray(X, dtype=np.float32),
        obs=pd.DataFrame(
            {"group": pd.Categorical(np.where(labels == target, "target", "rest"))},
            index=[str(i) for i in range(len(labels))],
        ),
        var=pd.DataFrame(index=[str(g) for g in genes]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's hints about log-transformed input
        sc.tl.rank_genes_groups(
            adata,
            "group",
            groups=["target"],
            reference="rest",
            method=method,
            n_genes=adata.n_vars,
            use_raw=False,
        )
        df = sc.get.rank_genes_groups_df(adata, group="target")
    df = df.rename(
        columns={
            "names": "gene",
            "scores": "score",
            "logfoldchanges": "logfoldchange",
            "pvals_adj": "pval_adj",
        }
    )
    df = df[["gene", "score", "logfoldchange", "pval_adj"]].astype(
        {"gene": str, "score": float, "logfoldchange": float, "pval_adj": float}
    )
    df["direction"] = np.where(df["score"] > 0, "up", "down")
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def de_ranked(de: pd.DataFrame) -> dict[str, list[str]]:
    """Genes ranked per direction: ``up`` by score descending, ``down`` by score ascending."""
    return {"up": de["gene"].tolist(), "down": de["gene"].tolist()[::-1]}


def gene_overlap(
    reference: Mapping[str, Sequence[str]],
    baselines: Mapping[str, Mapping[str, Sequence[str]]],
    ks: Sequence[int] = (10, 20, 50),
) -> pd.DataFrame:
    """Overlap of ranked gene lists at several lengths k.

    Parameters
    ----------
    reference
        Ranked genes per direction, e.g. TSPG's consensus ``{"up": [...], "down": [...]}``.
    baselines
        ``{baseline name: {"up": [...], "down": [...]}}``, each ranked.
    ks
        List lengths: the first k genes of the reference meet the first k of the baseline.

    Returns
    -------
    Tidy DataFrame: ``baseline``, ``direction``, ``k``, ``n_reference``, ``n_baseline`` (genes
    in each list, fewer than k when a list is shorter), ``overlap`` (genes in both),
    ``jaccard`` (overlap / genes in either), ``genes`` (the shared genes, reference order).
    """
    rows = []
    for name, lists in baselines.items():
        for d in ("up", "down"):
            if d not in reference or d not in lists:
                continue
            for k in ks:
                a, b = list(reference[d])[:k], list(lists[d])[:k]
                in_b = set(b)
                shared = [g for g in a if g in in_b]
                union = len(set(a) | set(b))
                rows.append(
                    {
                        "baseline": name,
                        "direction": d,
                        "k": int(k),
                        "n_reference": len(a),
                        "n_baseline": len(b),
                        "overlap": len(shared),
                        "jaccard": len(shared) / union if union else float("nan"),
                        "genes": ",".join(shared),
                    }
                )
    return pd.DataFrame(
        rows,
        columns=[
            "baseline",
            "direction",
            "k",
            "n_reference",
            "n_baseline",
            "overlap",
            "jaccard",
            "genes",
        ],
    )


# ----------------------------------------------------------------------------- for a bundle


@dataclass
class Baselines:
    """The baselines of one bundle, fit on its training split (scaled space)."""

    shifts: pd.DataFrame  # source class x genes: mu_target - mu_source
    de: pd.DataFrame  # differential_expression(...) of the target vs the rest

    def mean_shift(self, Xs: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        return mean_shift_perturb(Xs, labels, self.shifts)


def selection_overlap(
    P: np.ndarray,
    X: np.ndarray,
    labels: Sequence[str] | None,
    genes: Sequence[str],
    baselines: Baselines,
    *,
    ks: Sequence[int] = (10, 20, 50),
) -> pd.DataFrame:
    """Overlap of some samples' consensus top-k genes with both baselines' top-k, per k.

    For each k, TSPG's consensus top-k lists of ``P`` (:func:`tspg.perturbation.consensus_top`)
    meet the first k genes of the differential-expression ranking and the consensus top-k
    of the mean-shift perturbations of the same samples, x_ms - x: both sides ranked the
    same way, by the change each makes.

    Parameters
    ----------
    P, X
        Perturbations and scaled expression of the samples (samples x genes), usually the
        source (non-target) samples.
    labels
        Class of each sample, for its mean shift. Samples of a class without a mean shift
        (no training samples) are left out of the mean-shift lists; with ``labels`` None,
        or no such sample, there is no ``mean_shift`` row.
    genes
        Gene names of the columns (the columns of ``baselines.shifts``).
    baselines
        The bundle's :class:`Baselines`.
    ks
        List lengths.

    Returns
    -------
    :func:`gene_overlap`'s frame, baselines ``differential_expression`` and ``mean_shift``,
    sorted by baseline, direction (up first), k.
    """
    P = np.asarray(P)
    if P.ndim != 2 or P.shape[1] != len(genes) or np.shape(X) != P.shape:
        raise ValueError(
            f"P has shape {P.shape} and X {np.shape(X)}; both must be samples x {len(genes)} genes"
        )
    if list(map(str, baselines.shifts.columns)) != [str(g) for g in genes]:
        raise ValueError("the baselines' genes are not the genes of P")
    lists = {"differential_expression": de_ranked(baselines.de)}
    P_ms = None
    if labels is not None:
        labels = np.asarray(labels, dtype=object).astype(str)
        if len(labels) != len(P):
            raise ValueError(f"{len(labels)} labels for {len(P)} samples")
        known = np.isin(labels, baselines.shifts.index.astype(str))
        if known.any():
            X = np.asarray(X)[known]
            P_ms = baselines.mean_shift(X, labels[known]) - X
    frames = []
    for k in sorted({int(k) for k in ks}):
        if P_ms is not None:
            lists["mean_shift"] = consensus_top(P_ms, genes, k=k)
        frames.append(gene_overlap(consensus_top(P, genes, k=k), lists, ks=[k]))
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(
        ["baseline", "direction", "k"], ascending=[True, False, True], ignore_index=True
    )


def split_arrays(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    part: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scaled expression, labels and sample ids of the bundle's ``train`` or ``test`` split.

    With ``max_samples``, a fixed, seeded, class-stratified subsample of that size when
    the split is larger (:func:`tspg.data.subsample`), in split order. Only the bundle's
    genes of those samples are read (a chunk at a time).
    """
    label_key = label_key or bundle.label_key
    if label_key not in adata.obs:
        raise UserError(
            f"data: no label column {label_key!r} in obs (the bundle's labels); columns are {list(adata.obs.columns)}"
        )
    ids = list(bundle.split[part])
    pos = adata.obs_names.get_indexer(ids)
    if (pos < 0).any():
        missing = [s for s, p in zip(ids, pos, strict=True) if p < 0]
        raise UserError(
            f"data: {len(missing)} sample(s) of the bundle's {part} split are missing (e.g. {missing[0]!r}); is this the data the bundle was trained on?"
        )
    labels = adata.obs[label_key].astype(str).to_numpy()[pos]
    keep = subsample(labels, max_samples, seed=seed)
    if len(keep) < len(pos):
        pos, labels, ids = pos[keep], labels[keep], [ids[i] for i in keep]
    return bundle.scale(adata, layer=layer, rows=pos), labels, ids


def training_target_mean(
    adata: ad.AnnData | None,
    bundle: Bundle,
    *,
    layer: str | None = None,
    label_key: str | None = None,
) -> np.ndarray | None:
    """The target class's mean expression (scaled) over the bundle's training split.

    The value stored in the bundle (:attr:`tspg.bundle.Bundle.target_mean`) when it has one;
    for older bundles, computed from the training split of ``adata`` (the bundle's dataset).

    Returns
    -------
    One value per gene of the bundle (float32), or None for an older bundle without ``adata``.
    """
    stored = bundle.target_mean
    if stored is not None:
        return stored
    if adata is None:
        return None
    Xs, y, _ = split_arrays(adata, bundle, layer=layer, label_key=label_key, part="train")
    if not (y == bundle.target).any():
        raise UserError(f"the training split has no sample of the target class {bundle.target!r}")
    return Xs[y == bundle.target].mean(0, dtype=np.float64).astype(np.float32)


# Baselines on a big training split: a fixed, seeded, class-stratified subsample of this size
BASELINE_MAX_SAMPLES = 20_000


def fit_baselines(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    max_samples: int | None = BASELINE_MAX_SAMPLES,
    seed: int = 0,
) -> Baselines:
    """Mean shifts and differential expression on the bundle's training split of ``adata``
    (at most ``max_samples`` of it: a seeded, class-stratified subsample)."""
    Xs, labels, _ = split_arrays(
        adata,
        bundle,
        layer=layer,
        label_key=label_key,
        part="train",
        max_samples=max_samples,
        seed=seed,
    )
    return Baselines(
        class_perturbations(Xs, labels, bundle.target, genes=bundle.genes),
        differential_expression(Xs, labels, bundle.genes, bundle.target),
    )
