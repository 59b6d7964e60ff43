"""The one ranking of genes behind every top-gene list: the heatmap, the tables, enrichment.

A selection's top genes are ranked by their **mean perturbation P over the samples**
(up: most positive mean P first; down: most negative first); for one sample, that is its
own P. The Perturb page's heatmap and tables, the Enrichment page, ``tspg enrich``,
``tspg evaluate`` and the baselines' overlaps all take their lists from
:func:`rank_genes` (through :func:`tspg.perturbation.consensus_top`), so a change of the
ranking (e.g. a seed ensemble's per-gene support) is made here, once.

Each ranked gene also carries its support: in how many samples it is among that sample's
own top ``k`` (a different list, shown as "how often" on the Genes page:
:func:`tspg.perturbation.consensus`). This module imports neither torch nor streamlit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .errors import UserError

__all__ = ["DIRECTIONS", "RANKED_BY", "rank_genes"]

DIRECTIONS = ("up", "down")
# how the UI names the ranking (column headers, captions, the enrichment's "which list")
RANKED_BY = "mean P"


def rank_genes(P, genes: Sequence[str], *, k: int | None = 20) -> pd.DataFrame:
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

    Returns
    -------
    DataFrame, up genes first, then down, each in rank order: ``direction``, ``rank``
    (1 = strongest), ``gene``, ``mean_P`` (over the samples), ``n_top`` (samples that have
    the gene among their own top ``k`` of that direction), ``frequency`` (``n_top`` /
    samples). Ties go to the earlier gene.
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
    frames = []
    for d, idx, sign in (("up", up_idx, -1.0), ("down", down_idx, 1.0)):
        own = np.argsort(sign * P, axis=1, kind="stable")[:, :k_support]  # each sample's top k
        n_top = np.bincount(own.reshape(-1), minlength=n)[idx]
        frames.append(
            pd.DataFrame(
                {
                    "direction": d,
                    "rank": np.arange(1, len(idx) + 1),
                    "gene": names[idx],
                    "mean_P": mean_P[idx],
                    "n_top": n_top.astype(int),
                    "frequency": n_top / len(P),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
