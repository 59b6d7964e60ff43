"""The one ranking of genes behind every top-gene list: the heatmap, the tables, enrichment.

A selection's top genes are ranked by their **mean perturbation P over the samples**
(up: most positive mean P first; down: most negative first); for one sample, that is its
own P. The Perturb page's heatmap and tables, the Enrichment page, ``tspg enrich``,
``tspg evaluate`` and the baselines' overlaps all take their lists from
:func:`rank_genes` (through :func:`tspg.perturbation.consensus_top`), so a change of the
ranking (e.g. a seed ensemble's per-gene support) is made here, once.

Each ranked gene also carries ``n_top``: in how many samples it is among that sample's
own top ``k`` (a different list, shown as "how often" on the Genes page:
:func:`tspg.perturbation.consensus`). For a seed ensemble, each gene also carries its
**support**: in how many of the N generators' own mean-P top ``k`` (over the same samples)
it is (:func:`member_support`); a gene with full support (N of N) is kept by a rerun 98% of
the time on the demo, one below it 58-76% (bench/ENSEMBLE_NOTES.md, 1.4). This module
imports neither torch nor streamlit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .errors import UserError

__all__ = [
    "DIRECTIONS",
    "RANKED_BY",
    "member_agreement",
    "member_support",
    "rank_genes",
    "support_text",
]

DIRECTIONS = ("up", "down")
# how the UI names the ranking (column headers, captions, the enrichment's "which list")
RANKED_BY = "mean P"


def _member_means(members, n_genes: int) -> np.ndarray:
    """Members' mean P per gene (N x genes) from their P (N x samples x genes) or their means."""
    m = np.asarray(members)
    if m.ndim == 3:
        m = m.mean(1, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != n_genes:
        raise ValueError(
            f"members have shape {np.shape(members)}, expected N x [samples x] {n_genes}"
        )
    return m


def _top_sets(means: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per direction, a boolean members x genes mask of each member's own top ``k`` by mean P."""
    out = {}
    for d, sign in (("up", -1.0), ("down", 1.0)):
        own = np.argsort(sign * means, axis=1, kind="stable")[:, :k]
        mask = np.zeros(means.shape, dtype=bool)
        np.put_along_axis(mask, own, True, axis=1)
        out[d] = mask
    return out


def member_support(members, *, k: int = 20) -> dict[str, np.ndarray]:
    """Per direction, each gene's support: in how many members' own top ``k`` by mean P it is.

    Parameters
    ----------
    members
        The members' P over the same samples (N x samples x genes), or each member's mean
        P per gene over them (N x genes): what a chunked perturbation keeps as running sums.
    k
        The size of each member's own list.

    Returns
    -------
    ``{"up": int array (genes,), "down": ...}``, values 0..N.
    """
    means = _member_means(members, np.shape(members)[-1])
    k = min(int(k), means.shape[1])
    return {d: mask.sum(0).astype(int) for d, mask in _top_sets(means, k).items()}


def member_agreement(members, *, k: int = 20) -> dict:
    """How much the members' own top-``k`` lists (by mean P) agree, per direction.

    Returns ``{"n_members", "k", "shared_up", "shared_down"}`` (mean over member pairs of the
    genes two members' lists share) and ``full_support_up`` / ``full_support_down`` (genes
    in every member's list). The figures of the verdict's stability check.
    """
    means = _member_means(members, np.shape(members)[-1])
    n = len(means)
    k = min(int(k), means.shape[1])
    out: dict = {"n_members": n, "k": k}
    for d, mask in _top_sets(means, k).items():
        pairs = [int((mask[a] & mask[b]).sum()) for a in range(n) for b in range(a + 1, n)]
        out[f"shared_{d}"] = float(np.mean(pairs)) if pairs else float(k)
        out[f"full_support_{d}"] = int((mask.sum(0) == n).sum())
    return out


def support_text(support, n_members) -> list[str]:
    """Support as the tables show it: ``"2/3"`` (``n_members`` one number or one per gene)."""
    s = np.asarray(support).astype(int).reshape(-1)
    n = np.broadcast_to(np.asarray(n_members).astype(int), s.shape)
    return [f"{a}/{b}" for a, b in zip(s.tolist(), n.tolist(), strict=True)]


def rank_genes(P, genes: Sequence[str], *, k: int | None = 20, members=None) -> pd.DataFrame:
    """The top ``k`` genes per direction by mean P over the samples (rows) of ``P``.

    Parameters
    ----------
    P
        Perturbations, samples x genes (one sample may be 1-d).
    genes
        Gene names, one per column of ``P``.
    k
        Genes per direction (at most the number of genes). None: every gene once, those
        with mean P >= 0 as up and the others as down.
    members
        For a seed ensemble: the members' P over the same samples (N x samples x genes), or
        their mean P per gene over them (N x genes); ``P`` is then their mean. Adds the
        columns ``support`` and ``n_members``.

    Returns
    -------
    DataFrame, up genes first, then down, each in rank order: ``direction``, ``rank``
    (1 = strongest), ``gene``, ``mean_P`` (over the samples), ``n_top`` (samples that have
    the gene among their own top ``k`` of that direction), ``frequency`` (``n_top`` /
    samples), with ``members`` also ``support`` (in how many members' own top ``k`` by mean
    P the gene is, :func:`member_support`) and ``n_members``. Ties go to the earlier gene.
    """
    P = np.asarray(P)
    if P.ndim == 1:
        P = P[None, :]
    if P.ndim != 2 or P.shape[1] != len(genes):
        raise ValueError(f"P has shape {P.shape}, expected samples x {len(genes)} genes")
    if len(P) == 0:
        raise UserError("no samples selected: ranking genes needs at least one sample")
    n = P.shape[1]
    mean_P = P.mean(0, dtype=np.float64)
    up_order = np.argsort(-mean_P, kind="stable")
    down_order = np.argsort(mean_P, kind="stable")
    if k is None:
        up_idx = up_order[mean_P[up_order] >= 0]
        down_idx = down_order[mean_P[down_order] < 0]
        k_support = max(len(up_idx), len(down_idx), 1)
    else:
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        k_support = min(int(k), n)
        up_idx, down_idx = up_order[:k_support], down_order[:k_support]
    names = np.asarray(genes, dtype=object)
    support = None
    if members is not None:
        if np.ndim(members) == 3 and np.shape(members)[1] != len(P):
            raise ValueError(f"members hold {np.shape(members)[1]} samples, P {len(P)}")
        support = member_support(members, k=20 if k is None else k)
        n_members = len(members)
    frames = []
    for d, idx, sign in (("up", up_idx, -1.0), ("down", down_idx, 1.0)):
        own = np.argsort(sign * P, axis=1, kind="stable")[:, :k_support]  # each sample's top k
        n_top = np.bincount(own.reshape(-1), minlength=n)[idx]
        frame = pd.DataFrame(
            {
                "direction": d,
                "rank": np.arange(1, len(idx) + 1),
                "gene": names[idx],
                "mean_P": mean_P[idx],
                "n_top": n_top.astype(int),
                "frequency": n_top / len(P),
            }
        )
        if support is not None:
            frame["support"] = support[d][idx]
            frame["n_members"] = n_members
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
