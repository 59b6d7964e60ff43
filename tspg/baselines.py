"""Baselines to hold TSPG's perturbations against: mean shift and differential expression.

Both are fit on the bundle's training split, in its scaled space ([0, 1] per gene):

- mean shift: the "class perturbation" mu_target - mu_source of each source class (the
  reference implementation's name); a sample moves by its class's shift,
  x_ms = clip(x + mu_t - mu_source(x), 0, 1). Its top genes are ranked by the change it
  makes, x_ms - x, as TSPG's are ranked by P = x_adv - x.
- differential expression: target class vs the rest (or vs one source class alone),
  Wilcoxon rank-sum test through ``scanpy.tl.rank_genes_groups``.

:func:`gene_overlap` compares ranked gene lists (TSPG's consensus top genes against a
baseline's) at several list lengths k; :func:`selection_overlap` does it for a set of
perturbed samples against both target-vs-rest baselines, and :func:`source_comparison` per
source class against the baselines that know the source: differential expression of the
target against that class alone and that class's mean shift, with the genes only TSPG
ranks high and the reverse (``tspg evaluate`` and the dashboard's Genes page).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from .data import subsample
from .errors import UserError
from .perturbation import consensus_top
from .ranking import rank_genes

if TYPE_CHECKING:
    from .bundle import Bundle

logger = logging.getLogger(__name__)

REST = "rest"  # differential expression of the target against every other sample

__all__ = [
    "GENE_COLUMNS",
    "SOURCE_COLUMNS",
    "Baselines",
    "SourceComparison",
    "baselines_of",
    "class_perturbations",
    "de_ranked",
    "differential_expression",
    "far_rank",
    "fit_baselines",
    "gene_overlap",
    "gene_table",
    "mean_shift_perturb",
    "sample_shifts",
    "per_class_subsample",
    "selection_overlap",
    "source_comparison",
    "source_table",
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
    reference: str = REST,
    method: str = "wilcoxon",
) -> pd.DataFrame:
    """Target class vs the rest (or vs one ``reference`` class), per gene, with
    ``scanpy.tl.rank_genes_groups``.

    ``logfoldchange`` is scanpy's, computed on the values given (scanpy treats them as
    log1p data; on scaled values read it as a direction and rough size only).

    ``reference``: ``"rest"`` (every sample not of ``target``), or a class of ``labels``:
    then only the samples of ``target`` and of that class are used (the target against
    that source class alone).

    Returns
    -------
    DataFrame sorted by ``score`` (descending): ``gene``, ``score`` (the test statistic),
    ``logfoldchange``, ``pval_adj`` (Benjamini-Hochberg), ``direction`` (``up`` when
    ``score`` > 0, else ``down``). Its top rows are the "up" list, its bottom rows (read
    from the end) the "down" list; :func:`de_ranked` returns both.
    """
    import scanpy as sc

    labels = np.asarray(labels, dtype=object).astype(str)
    X = np.asarray(X, dtype=np.float32)
    if reference != REST:
        if reference == target:
            raise UserError(f"differential expression of {target!r} against itself")
        keep = (labels == target) | (labels == reference)
        X, labels = X[keep], labels[keep]
    others = "others" if reference == REST else f"samples of {reference!r}"
    if (labels == target).sum() < 2 or (labels != target).sum() < 2:
        raise UserError(
            f"differential expression needs at least 2 samples of {target!r} and 2 {others}"
        )
    adata = ad.AnnData(
        X=X,
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
    """The baselines of one bundle, fit on its training split (scaled space).

    ``shifts`` and ``de`` are the target-vs-rest baselines; the per-source ones are
    ``shifts`` (each source's own row) and ``de_by_source`` (the target against each source
    class alone; a class with fewer than 2 training samples has none). ``target_mean`` and
    ``target_sd`` (per gene, over the training target samples) say how far a perturbed gene
    is from real target cells.
    """

    shifts: pd.DataFrame  # source class x genes: mu_target - mu_source
    de: pd.DataFrame  # differential_expression(...) of the target vs the rest
    target_mean: np.ndarray | None = None
    target_sd: np.ndarray | None = None
    de_by_source: dict[str, pd.DataFrame] = field(default_factory=dict)
    n_train: dict[str, int] = field(default_factory=dict)  # training samples per class used

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
# Per-source differential expression: at most this many training samples of each class
# (seeded), so a test of the target against a large class stays quick
SOURCE_MAX_PER_CLASS = 2_000


def fit_baselines(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    max_samples: int | None = BASELINE_MAX_SAMPLES,
    max_per_class: int | None = SOURCE_MAX_PER_CLASS,
    sources: bool = True,
    seed: int = 0,
) -> Baselines:
    """Mean shifts and differential expression on the bundle's training split of ``adata``
    (at most ``max_samples`` of it: a seeded, class-stratified subsample).

    With ``sources`` (default), also the target against each source class alone
    (:func:`differential_expression` with ``reference``), on at most ``max_per_class``
    training samples of each class (a seeded subsample), for :func:`source_comparison`.
    """
    Xs, labels, _ = split_arrays(
        adata,
        bundle,
        layer=layer,
        label_key=label_key,
        part="train",
        max_samples=max_samples,
        seed=seed,
    )
    return baselines_of(
        Xs,
        labels,
        bundle.genes,
        bundle.target,
        sources=sources,
        max_per_class=max_per_class,
        seed=seed,
    )


def baselines_of(
    X: np.ndarray,
    labels: Sequence[str],
    genes: Sequence[str],
    target: str,
    *,
    sources: bool = True,
    max_per_class: int | None = SOURCE_MAX_PER_CLASS,
    seed: int = 0,
) -> Baselines:
    """:class:`Baselines` of scaled training data ``X`` (what :func:`fit_baselines` fits on a
    bundle's training split): the mean shifts, the target against the rest, the target's
    mean and sd, and with ``sources`` the target against each class alone on at most
    ``max_per_class`` samples of each class (a seeded choice)."""
    X = np.asarray(X)
    labels = np.asarray(labels, dtype=object).astype(str)
    is_t = labels == target
    base = Baselines(
        class_perturbations(X, labels, target, genes=genes),
        differential_expression(X, labels, genes, target),
        target_mean=X[is_t].mean(0, dtype=np.float64),
        target_sd=X[is_t].std(0, dtype=np.float64),
    )
    if sources:
        start = time.perf_counter()
        keep = per_class_subsample(labels, max_per_class, seed=seed)
        X_c, y_c = X[keep], labels[keep]
        for s in sorted(set(y_c.tolist()) - {target}):
            base.n_train[s] = int((y_c == s).sum())
            if base.n_train[s] >= 2:
                base.de_by_source[s] = differential_expression(X_c, y_c, genes, target, reference=s)
        logger.info(
            "per-source differential expression: %d classes in %.1f s",
            len(base.de_by_source),
            time.perf_counter() - start,
        )
    return base


def per_class_subsample(labels, cap: int | None, *, seed: int = 0) -> np.ndarray:
    """Positions (sorted) of at most ``cap`` samples of each class: a fixed, seeded choice
    within each class larger than ``cap``; every sample of the others (``cap`` None: all)."""
    labels = np.asarray(labels).astype(str)
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=cap, replace=False) if len(idx) > cap else idx)
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


# ----------------------------------------------------------------------------- per source class

# a source class needs at least this many samples of the selection to be compared
SOURCE_MIN_SAMPLES = 2
SOURCE_COLUMNS = [
    "source",
    "n",
    "n_train",
    "accuracy",
    "status",
    "de_up",
    "de_down",
    "ms_up",
    "ms_down",
    "tspg_only_up",
    "tspg_only_down",
    "baseline_only_up",
    "baseline_only_down",
    "against_up",
    "against_down",
    "beyond_up",
    "beyond_down",
]
GENE_COLUMNS = [
    "source",
    "list",
    "direction",
    "gene",
    "tspg_rank",
    "mean_P",
    "n_top",
    "support",
    "n_members",
    "de_score",
    "de_rank",
    "ms_change",
    "ms_rank",
    "shift",
    "x_adv_mean",
    "target_mean",
    "target_sd",
    "tspg_only",
    "baseline_only",
    "against_source",
    "beyond_target",
    "flags",
]
FLAG_WORDS = {
    "tspg_only": "TSPG only",
    "baseline_only": "baselines only",
    "against_source": "against the source's direction",
    "beyond_target": "beyond the target's range",
}


def far_rank(k: int) -> int:
    """A gene "does not rank high" in a list of ``k`` when its rank is beyond this:
    max(50, 2.5 k). The margin keeps genes near the cut-off out of both the TSPG-only and
    the baseline-only lists."""
    return max(50, math.ceil(2.5 * k))


@dataclass
class SourceComparison:
    """TSPG's genes per source class beside the per-source baselines (:func:`source_comparison`).

    ``sources``: one row per source class (:data:`SOURCE_COLUMNS`); ``genes``: one row per
    gene of TSPG's top ``k`` of each source (``list`` = ``"tspg"``) and per gene the two
    baselines rank high and TSPG does not (``list`` = ``"baselines"``), :data:`GENE_COLUMNS`.
    """

    sources: pd.DataFrame
    genes: pd.DataFrame
    k: int
    far: int
    min_samples: int

    def to_dict(self) -> dict:
        """Plain records (NaN as None), for JSON."""
        return {
            "k": self.k,
            "far": self.far,
            "min_samples": self.min_samples,
            "sources": _records(self.sources),
            "genes": _records(self.genes),
        }

    def source(self, name: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
        """One source's row, its TSPG genes and its baseline-only genes."""
        hit = self.sources[self.sources["source"] == name]
        if hit.empty:
            raise UserError(f"no source class {name!r} in this selection")
        g = self.genes[self.genes["source"] == name]
        return (
            hit.iloc[0].to_dict(),
            g[g["list"] == "tspg"].reset_index(drop=True),
            g[g["list"] == "baselines"].reset_index(drop=True),
        )


def _records(df: pd.DataFrame) -> list[dict]:
    out = []
    for rec in df.to_dict(orient="records"):
        out.append(
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in rec.items()
            }
        )
    return out


def _rank_of(order: Sequence[str], index: Mapping[str, int]) -> np.ndarray:
    """Rank (1 = first) of every gene, from genes in rank order."""
    r = np.full(len(index), len(index) + 1, dtype=np.int64)
    r[[index[g] for g in order]] = np.arange(1, len(order) + 1)
    return r


def _full_orders(P: np.ndarray, genes: list[str]) -> dict[str, list[str]]:
    """Every gene in rank order per direction, by :func:`tspg.ranking.rank_genes` (mean P)
    on the mean row: the same order as over the samples, without sorting every sample."""
    ranked = rank_genes(P.mean(0, dtype=np.float64)[None, :], genes, k=len(genes))
    return {d: ranked.loc[ranked["direction"] == d, "gene"].tolist() for d in ("up", "down")}


def source_comparison(
    P: np.ndarray,
    X: np.ndarray,
    labels: Sequence[str],
    genes: Sequence[str],
    baselines: Baselines,
    *,
    target: str,
    k: int = 20,
    pred_after: Sequence[str] | None = None,
    members: np.ndarray | None = None,
    min_samples: int = SOURCE_MIN_SAMPLES,
) -> SourceComparison:
    """TSPG's genes of each source class beside differential expression of the target
    against that class alone and that class's mean shift.

    For each source class s of ``labels`` (not ``target``), over the samples of s:

    - TSPG_s: genes ranked by mean P (:func:`tspg.ranking.rank_genes`);
    - DE_s: the Wilcoxon test of the target against s alone (``baselines.de_by_source``),
      ranked by score (up: highest first; down: lowest first);
    - MS_s: the mean shift mu_t - mu_s, ranked like TSPG by the mean change it makes on the
      same samples, mean clip(x + mu_t - mu_s, 0, 1) - x.

    A gene "ranks high" at rank <= ``k`` and "does not rank high" beyond :func:`far_rank`.
    TSPG-only: top ``k`` in TSPG_s, beyond in both DE_s and MS_s; baseline-only: top ``k``
    in both DE_s and MS_s, beyond in TSPG_s. Flags: "against the source's direction" (the
    sign of mean P is opposite to mu_t - mu_s), "beyond the target's range" (the mean
    x_adv = x + P over the samples is more than one target standard deviation from the
    target mean).

    Parameters
    ----------
    P, X
        Perturbations and scaled expression of the samples (samples x genes).
    labels
        Class of each sample; samples of ``target`` are left out.
    genes
        Gene names of the columns (the columns of ``baselines.shifts``).
    baselines
        :func:`fit_baselines` of the bundle (with ``sources``).
    target
        The bundle's target class.
    k
        Genes per direction.
    pred_after
        The target model's call of each perturbed sample, for the per-source perturbation
        accuracy (NaN without it).
    members
        For a seed ensemble: the members' P over the same samples (N x samples x genes);
        TSPG's genes then carry ``support`` (in how many members' own top ``k`` of the
        class they are, :func:`tspg.ranking.member_support`) and ``n_members``.
    min_samples
        Sources with fewer samples get status ``too few samples`` and no figures.

    Returns
    -------
    :class:`SourceComparison`.
    """
    names = [str(g) for g in genes]
    P = np.asarray(P)
    X = np.asarray(X)
    if P.ndim != 2 or P.shape[1] != len(names) or X.shape != P.shape:
        raise ValueError(
            f"P has shape {P.shape} and X {X.shape}; both must be samples x {len(names)} genes"
        )
    if list(map(str, baselines.shifts.columns)) != names:
        raise ValueError("the baselines' genes are not the genes of P")
    if baselines.target_mean is None or baselines.target_sd is None:
        raise ValueError("the baselines have no target mean and sd (fit_baselines fits them)")
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    labels = np.asarray(labels, dtype=object).astype(str)
    if len(labels) != len(P):
        raise ValueError(f"{len(labels)} labels for {len(P)} samples")
    pred = None if pred_after is None else np.asarray(pred_after, dtype=object).astype(str)
    if members is not None and (np.ndim(members) != 3 or np.shape(members)[1:] != P.shape):
        raise ValueError(f"members have shape {np.shape(members)}, expected N x {P.shape}")
    k = min(int(k), len(names))
    far = far_rank(k)
    index = {g: i for i, g in enumerate(names)}
    mu_t = np.asarray(baselines.target_mean, np.float64)
    sd_t = np.asarray(baselines.target_sd, np.float64)
    rows_out, gene_frames = [], []
    for s in sorted(set(labels.tolist()) - {target}):
        rows = labels == s
        n = int(rows.sum())
        row = dict.fromkeys(SOURCE_COLUMNS)
        row.update(
            source=s,
            n=n,
            n_train=baselines.n_train.get(s, 0),
            accuracy=float(np.mean(pred[rows] == target)) if pred is not None else math.nan,
        )
        rows_out.append(row)
        if n < min_samples:
            row["status"] = f"too few samples ({n} < {min_samples})"
            continue
        if s not in baselines.de_by_source or s not in baselines.shifts.index:
            row["status"] = f"no baseline: {baselines.n_train.get(s, 0)} training samples (needs 2)"
            continue
        row["status"] = "ok"
        Ps, Xs = P[rows].astype(np.float64), X[rows].astype(np.float64)
        shift = baselines.shifts.loc[s].to_numpy(np.float64)
        P_ms = np.clip(Xs + shift, 0.0, 1.0) - Xs
        de = baselines.de_by_source[s]
        score = de.set_index("gene")["score"].reindex(names).to_numpy(np.float64)
        order = {
            "tspg": _full_orders(Ps, names),
            "ms": _full_orders(P_ms, names),
            "de": de_ranked(de),
        }
        m_s = None if members is None else np.asarray(members)[:, rows]
        top = rank_genes(Ps, names, k=k, members=m_s)  # the lists, each gene's n_top, support
        mean_P, ms_change = Ps.mean(0), P_ms.mean(0)
        x_adv_mean = (Xs + Ps).mean(0)
        against = mean_P * shift < 0
        beyond = np.abs(x_adv_mean - mu_t) > sd_t + 1e-9
        for d in ("up", "down"):
            r = {m: _rank_of(order[m][d], index) for m in order}
            in_d = top[top["direction"] == d].set_index("gene")
            n_top = in_d["n_top"].to_dict()
            support = in_d["support"].to_dict() if "support" in in_d else {}
            n_members = len(m_s) if m_s is not None else None
            t_top = [index[g] for g in order["tspg"][d][:k]]
            only_t = [g for g in t_top if r["de"][g] > far and r["ms"][g] > far]
            only_b = [
                index[g]
                for g in order["de"][d][:k]
                if r["ms"][index[g]] <= k and r["tspg"][index[g]] > far
            ]
            row[f"de_{d}"] = len(set(t_top) & {index[g] for g in order["de"][d][:k]})
            row[f"ms_{d}"] = len(set(t_top) & {index[g] for g in order["ms"][d][:k]})
            row[f"tspg_only_{d}"] = len(only_t)
            row[f"baseline_only_{d}"] = len(only_b)
            row[f"against_{d}"] = int(against[t_top].sum())
            row[f"beyond_{d}"] = int(beyond[t_top].sum())
            for which, idx in (("tspg", t_top), ("baselines", only_b)):
                if not idx:
                    continue
                idx = np.asarray(idx)
                frame = pd.DataFrame(
                    {
                        "source": s,
                        "list": which,
                        "direction": d,
                        "gene": [names[i] for i in idx],
                        "tspg_rank": r["tspg"][idx],
                        "mean_P": mean_P[idx],
                        "n_top": [n_top.get(names[i]) for i in idx],
                        "support": [support.get(names[i]) for i in idx],
                        "n_members": [n_members if names[i] in support else None for i in idx],
                        "de_score": score[idx],
                        "de_rank": r["de"][idx],
                        "ms_change": ms_change[idx],
                        "ms_rank": r["ms"][idx],
                        "shift": shift[idx],
                        "x_adv_mean": x_adv_mean[idx],
                        "target_mean": mu_t[idx],
                        "target_sd": sd_t[idx],
                        "tspg_only": np.isin(idx, only_t),
                        "baseline_only": which == "baselines",
                        "against_source": against[idx],
                        "beyond_target": beyond[idx],
                    }
                )
                frame["flags"] = [
                    "; ".join(w for c, w in FLAG_WORDS.items() if rec[c])
                    for rec in frame[list(FLAG_WORDS)].to_dict(orient="records")
                ]
                gene_frames.append(frame)
    genes_df = (
        pd.concat(gene_frames, ignore_index=True)
        if gene_frames
        else pd.DataFrame(columns=GENE_COLUMNS)
    )
    return SourceComparison(
        pd.DataFrame(rows_out, columns=SOURCE_COLUMNS),
        genes_df[GENE_COLUMNS],
        k,
        far,
        min_samples,
    )


def source_table(sources: pd.DataFrame | Sequence[Mapping]) -> pd.DataFrame:
    """The per-source rows (:attr:`SourceComparison.sources`, or its records from JSON) for
    reading: counts of a direction pair as ``up / down``; figures of a source with too few
    samples (or no baseline) left blank, its ``status`` says why."""
    df = pd.DataFrame(list(sources) if not isinstance(sources, pd.DataFrame) else sources)
    if df.empty:
        return pd.DataFrame(columns=list(SOURCE_TABLE_HEADERS.values()))

    def pair(r, name):
        up, down = r[f"{name}_up"], r[f"{name}_down"]
        if up is None or down is None or (isinstance(up, float) and math.isnan(up)):
            return ""
        return f"{int(up)} / {int(down)}"

    out = pd.DataFrame(
        {
            "source": df["source"],
            "n": df["n"].astype(int),
            "accuracy": pd.to_numeric(df["accuracy"], errors="coerce"),
            **{
                label: [pair(r, name) for r in df.to_dict(orient="records")]
                for name, label in SOURCE_TABLE_HEADERS.items()
                if name not in ("source", "n", "accuracy", "status")
            },
            "status": df["status"],
        }
    )
    return out


SOURCE_TABLE_HEADERS = {
    "source": "source",
    "n": "n",
    "accuracy": "accuracy",
    "de": "TSPG∩DE up/down",
    "ms": "TSPG∩MS up/down",
    "tspg_only": "TSPG only up/down",
    "baseline_only": "baselines only up/down",
    "against": "against source up/down",
    "beyond": "beyond target up/down",
    "status": "status",
}

GENE_TABLE_HEADERS = {
    "direction": "direction",
    "gene": "gene",
    "tspg_rank": "TSPG rank",
    "mean_P": "mean P",
    "n_top": "in own top k",
    "support": "support",
    "de_score": "DE score",
    "de_rank": "DE rank",
    "ms_change": "MS change",
    "ms_rank": "MS rank",
    "x_adv_mean": "x_adv mean",
    "target_mean": "target mean",
    "target_sd": "target sd",
    "flags": "flags",
}


def gene_table(genes: pd.DataFrame | Sequence[Mapping]) -> pd.DataFrame:
    """Per-gene records of one source (:meth:`SourceComparison.source`) for reading: the
    columns of :data:`GENE_TABLE_HEADERS`, under those names; ``support`` as ``"2/3"`` (the
    column is left out for one generator)."""
    df = pd.DataFrame(list(genes) if not isinstance(genes, pd.DataFrame) else genes)
    if df.empty:
        return pd.DataFrame(columns=list(GENE_TABLE_HEADERS.values()))
    out = df[list(GENE_TABLE_HEADERS)].astype({"n_top": "Int64"})
    known = out["support"].notna() & df["n_members"].notna()
    out["support"] = [
        f"{int(s)}/{int(n)}" if ok else ""
        for s, n, ok in zip(out["support"], df["n_members"], known, strict=True)
    ]
    if not known.any():  # one generator: no support to show
        out = out.drop(columns="support")
    return out.rename(columns=GENE_TABLE_HEADERS).reset_index(drop=True)
