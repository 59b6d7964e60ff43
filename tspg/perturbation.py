"""Perturbing data with a bundle, and reading the perturbation: top genes and consensus.

x -> x_adv = clip(x + G(x), 0, 1), and the perturbation P = x_adv - x: the change the
generator actually makes, so x_adv = x + P (up to float rounding). Where x + G(x) would leave [0, 1], P
is the part of G(x) that takes effect (as the reference implementation reports it); a gene
at 0 that G pushes further down has P = 0, not a large negative value that changes nothing.
All three live in the bundle's scaled space ([0, 1] per gene, scaled with the minimum and
range stored in the bundle).

Top genes of a sample: its ``k`` genes with the most positive P ("up") and the ``k``
genes with the most negative P ("down"). Ties are broken by the bundle's gene order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .errors import UserError, user_file
from .nets import evaluating
from .ranking import rank_genes

if TYPE_CHECKING:
    from .bundle import Bundle

logger = logging.getLogger(__name__)

__all__ = [
    "DIRECTIONS",
    "Perturbation",
    "TopGenes",
    "class_probabilities",
    "consensus",
    "consensus_top",
    "discriminate",
    "generate_perturbed",
    "perturb",
    "perturb_adata",
    "perturb_scaled",
    "top_genes",
    "top_genes_df",
    "unique_top_genes",
]

DIRECTIONS = ("up", "down")
_CHUNK = 2048  # rows per forward pass: bounds the activations' memory, costs nothing in speed


# ----------------------------------------------------------------------------- forward passes


def _forward(module: torch.nn.Module, X: np.ndarray, fn=None) -> np.ndarray:
    """``fn(module, x)`` (default ``module(x)``) over row chunks, in eval and inference mode."""
    fn = fn or (lambda m, x: m(x))
    X = np.ascontiguousarray(X, dtype=np.float32)
    with evaluating(module), torch.inference_mode():
        out = [
            fn(module, torch.from_numpy(X[i : i + _CHUNK])).numpy()
            for i in range(0, len(X), _CHUNK)
        ]
    return out[0] if len(out) == 1 else np.concatenate(out)


def require_finite(
    a: np.ndarray,
    what: str,
    samples=None,
    why: str = "its weights are damaged or the data lie far outside their range",
) -> None:
    """UserError when ``a`` (samples x ...) holds NaN or infinity: ``what`` gave it, for how
    many samples, the first one named (by ``samples``, else by row number), and ``why``.

    The common case costs one float64 sum and no array as large as ``a``.
    """
    if a.size == 0 or np.isfinite(a.sum(dtype=np.float64)):
        return
    bad = np.array([not np.isfinite(row).all() for row in a.reshape(len(a), -1)])
    if not bad.any():  # the sum overflowed, the values are fine
        return
    i = int(np.argmax(bad))
    first = repr(str(samples[i])) if samples is not None else f"row {i + 1}"
    raise UserError(
        f"{what} gave NaN or infinite values for {int(bad.sum())} of {len(a)} sample(s) "
        f"(first: {first}): {why}"
    )


def generate_perturbed(
    G: torch.nn.Module, Xs: np.ndarray, *, what: str = "the generator", samples=None
) -> tuple[np.ndarray, np.ndarray]:
    """P = x_adv - x and x_adv = clip(x + G(x), 0, 1) for scaled, gene-aligned ``Xs``.

    One forward pass in inference mode (no autograd bookkeeping) on float32, C-contiguous
    data; x + G(x) is computed and clipped in G's output buffer, and the results are handed
    to numpy without a copy. A non-finite x_adv is a UserError naming ``what`` and the
    first sample (of ``samples``, else by row number).
    """
    Xs = np.ascontiguousarray(Xs, dtype=np.float32)
    Ps, advs = [], []
    with evaluating(G), torch.inference_mode():
        for i in range(0, len(Xs), _CHUNK):
            x = torch.from_numpy(Xs[i : i + _CHUNK])
            x_adv = G(x).add_(x).clamp_(0.0, 1.0)  # clamp keeps NaN: checked below
            Ps.append(torch.sub(x_adv, x).numpy())
            advs.append(x_adv.numpy())
    if not Ps:
        return np.zeros_like(Xs), np.zeros_like(Xs)
    P, x_adv = (Ps[0], advs[0]) if len(Ps) == 1 else (np.concatenate(Ps), np.concatenate(advs))
    require_finite(x_adv, what, samples)
    return P, x_adv


def class_probabilities(
    f: torch.nn.Module, Xs: np.ndarray, *, what: str = "the target model", samples=None
) -> np.ndarray:
    """Softmax probabilities (samples, classes) of the target model for scaled ``Xs`` (one row
    at least); non-finite ones are a UserError naming ``what`` and the first sample."""
    proba = _forward(f, Xs, lambda m, x: torch.softmax(m(x), 1))
    require_finite(proba, what, samples)
    return proba


def discriminate(Xs: np.ndarray, bundle: Bundle) -> np.ndarray:
    """The discriminator's score D(x) in (0, 1) per sample (1 = looks like real target data)."""
    if len(Xs) == 0:
        return np.zeros(0, np.float32)
    return _forward(bundle.discriminator, Xs)


# ----------------------------------------------------------------------------- perturbation


@dataclass
class Perturbation:
    """x, P, x_adv (samples x genes, scaled) and the target model's view before and after.

    ``proba_before`` / ``proba_after`` are the target model's class probabilities (samples x
    classes); (samples x 0) when it was not run (``perturb_scaled(..., predict=False)``),
    and then every reading of the predictions raises a ValueError.
    ``labels`` holds each sample's class when the data had the bundle's label column.
    """

    samples: list[str]
    genes: list[str]
    classes: list[str]
    target: str
    x: np.ndarray
    P: np.ndarray
    x_adv: np.ndarray
    proba_before: np.ndarray  # (samples, classes)
    proba_after: np.ndarray
    labels: np.ndarray | None = field(default=None)

    @property
    def predicted(self) -> bool:
        """Whether the target model's probabilities were computed."""
        return self.proba_before.shape[1] == len(self.classes) == self.proba_after.shape[1]

    def _check_predicted(self) -> None:
        if not self.predicted:
            raise ValueError(
                "the target model's predictions were not computed for this perturbation "
                "(perturb_scaled(..., predict=False)); perturb again with predict=True"
            )

    @property
    def pred_before(self) -> np.ndarray:
        """The target model's class for each x (raises ValueError without predictions)."""
        self._check_predicted()
        return np.asarray(self.classes, dtype=object)[self.proba_before.argmax(1)]

    @property
    def pred_after(self) -> np.ndarray:
        """The target model's class for each x_adv (raises ValueError without predictions)."""
        self._check_predicted()
        return np.asarray(self.classes, dtype=object)[self.proba_after.argmax(1)]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, index) -> Perturbation:
        """The samples at ``index`` (positions, a boolean mask, or sample ids)."""
        idx = np.asarray(index)
        if idx.dtype.kind in "OUS":
            pos = {s: i for i, s in enumerate(self.samples)}
            missing = [s for s in idx.tolist() if s not in pos]
            if missing:
                raise UserError(
                    f"sample(s) not in the perturbed data: {', '.join(map(str, missing[:5]))}"
                )
            idx = np.array([pos[s] for s in idx.tolist()], dtype=int)
        elif idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(int).reshape(-1)
        return Perturbation(
            [self.samples[i] for i in idx],
            self.genes,
            self.classes,
            self.target,
            self.x[idx],
            self.P[idx],
            self.x_adv[idx],
            self.proba_before[idx],
            self.proba_after[idx],
            None if self.labels is None else self.labels[idx],
        )

    def source_rows(self) -> np.ndarray:
        """Boolean mask of the source samples: those whose label is not the target.

        Every sample when the labels are unknown, or when all of them are of the target
        class (a selection of target samples is still shown as it is).
        """
        if self.labels is None:
            return np.ones(len(self), bool)
        rows = np.asarray(self.labels).astype(str) != self.target
        return rows if rows.any() else np.ones(len(self), bool)

    def predictions_df(self) -> pd.DataFrame:
        """One row per sample (index ``sample``): the target model's view before and after.

        Columns: ``label`` (when known), ``pred_before``, ``prob_before`` (probability of
        the predicted class), ``pred_after``, ``prob_after``, ``prob_target_before``,
        ``prob_target_after`` (probability of the target class). Raises ValueError when the
        predictions were not computed.
        """
        self._check_predicted()
        t = self.classes.index(self.target)
        df = pd.DataFrame(
            {
                "pred_before": self.pred_before,
                "prob_before": self.proba_before.max(1, initial=0.0),
                "pred_after": self.pred_after,
                "prob_after": self.proba_after.max(1, initial=0.0),
                "prob_target_before": self.proba_before[:, t],
                "prob_target_after": self.proba_after[:, t],
            },
            index=pd.Index(self.samples, name="sample"),
        )
        if self.labels is not None:
            df.insert(0, "label", self.labels)
        return df

    def to_csv(self, folder: str | Path, *, k: int = 20) -> list[Path]:
        """Write the perturbation as flat files into ``folder`` (created if needed).

        ``perturbation.csv`` (P) and ``perturbed.csv`` (x_adv): samples x genes;
        ``predictions.csv``: :meth:`predictions_df`; ``top_genes.csv``: :func:`top_genes_df`
        with ``k`` genes per direction; ``consensus.csv``: :func:`consensus` of the source
        samples (:meth:`source_rows`). Returns the paths written; UserError naming the
        folder or file that cannot be written.
        """
        out = Path(folder)
        index = pd.Index(self.samples, name="sample")
        frames = {
            "perturbation.csv": (pd.DataFrame(self.P, index=index, columns=self.genes), True),
            "perturbed.csv": (pd.DataFrame(self.x_adv, index=index, columns=self.genes), True),
            "predictions.csv": (self.predictions_df(), True),
            "top_genes.csv": (top_genes_df(self, k=k), False),
            "consensus.csv": (consensus(self.P[self.source_rows()], self.genes, k=k), False),
        }
        with user_file(out, "create the folder"):
            out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, (frame, index_col) in frames.items():
            with user_file(out / name, "write"):
                frame.to_csv(out / name, index=index_col, float_format="%.6g")
            paths.append(out / name)
        return paths


def perturb_scaled(
    Xs: np.ndarray,
    bundle: Bundle,
    *,
    samples: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    predict: bool = True,
) -> Perturbation:
    """Perturb already-scaled data whose columns are the bundle's genes.

    Parameters
    ----------
    Xs
        Samples x the bundle's genes, in the bundle's scaled space (:meth:`Bundle.scale`).
    bundle
        A loaded bundle.
    samples
        Sample ids (default ``0, 1, ...``).
    labels
        Each sample's class, when known.
    predict
        Run the target model on x and x_adv. Without, ``proba_*`` are empty (n, 0) arrays
        and reading the predictions (``pred_*``, ``predictions_df``) raises a ValueError.
    """
    Xs = np.ascontiguousarray(Xs, dtype=np.float32)
    if Xs.ndim != 2 or Xs.shape[1] != len(bundle.genes):
        raise ValueError(
            f"expected a samples x {len(bundle.genes)} genes matrix, got shape {Xs.shape}"
        )
    samples = [str(s) for s in samples] if samples is not None else [str(i) for i in range(len(Xs))]
    # a NaN anywhere is an error naming the bundle, never "100% called the target" (the
    # argmax of NaN probabilities is class 0)
    require_finite(
        Xs,
        f"scaling the data for bundle {bundle.name!r}",
        samples,
        "the bundle's scaler is damaged or the data hold values too large",
    )
    P, x_adv = generate_perturbed(
        bundle.generator, Xs, what=f"the generator of bundle {bundle.name!r}", samples=samples
    )
    if predict:
        before = bundle.predict_proba(Xs, samples=samples)
        after = bundle.predict_proba(x_adv, samples=samples)
    else:
        before = after = np.zeros((len(Xs), 0), np.float32)
    return Perturbation(
        samples,
        list(bundle.genes),
        list(bundle.classes),
        bundle.target,
        Xs,
        P,
        x_adv,
        before,
        after,
        None if labels is None else np.asarray(labels, dtype=object),
    )


def perturb_adata(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    source: str = "data",
) -> Perturbation:
    """Perturb every sample of ``adata``: genes matched by name, scaled with the bundle's
    scaler (:meth:`tspg.bundle.Bundle.scale`); the result as a :class:`Perturbation`.

    :func:`perturb` writes the same into AnnData slots.

    Parameters
    ----------
    adata
        Samples x genes, raw values.
    bundle
        A loaded bundle.
    layer
        Read ``adata.layers[layer]`` instead of ``X``.
    label_key
        Column of ``obs`` with each sample's class (default: the bundle's label key, when
        present).
    source
        How error messages name the data.
    """
    if label_key is not None and label_key not in adata.obs:
        raise UserError(
            f"{source}: no column {label_key!r} in obs; columns are {list(adata.obs.columns)}"
        )
    Xs = bundle.scale(adata, layer=layer, source=source)
    key = label_key or (bundle.label_key if bundle.label_key in adata.obs else None)
    labels = adata.obs[key].astype(str).to_numpy() if key else None
    return perturb_scaled(Xs, bundle, samples=adata.obs_names, labels=labels)


def perturb(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    k: int = 20,
    key_added: str = "tspg",
    source: str = "data",
    copy: bool = False,
) -> ad.AnnData | None:
    """Perturb every sample of ``adata`` towards the bundle's target class.

    Genes are matched by name. In place (``copy=False``) needs ``adata`` to hold exactly the
    bundle's genes in its order; ``copy=True`` returns a new AnnData restricted to them.

    Parameters
    ----------
    adata
        Samples x genes, raw values (scaled here with the bundle's scaler).
    bundle
        A loaded bundle.
    layer
        Read the expression from ``adata.layers[layer]`` instead of ``X``.
    label_key
        Column of ``obs`` with each sample's class (default: the bundle's label key, when
        present); samples of the target class are left out of the consensus.
    k
        Top genes per direction.
    key_added
        Prefix of the slots written.
    source
        Name of the data in error messages, e.g. its file name.
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    With ``copy=True`` a new AnnData, else None. Either way it holds:

    - ``layers[f"{key_added}_x"]``: the scaled input x
    - ``layers[f"{key_added}_perturbation"]``: P
    - ``layers[f"{key_added}_perturbed"]``: x_adv
    - ``obs[f"{key_added}_pred_before"]``, ``obs[f"{key_added}_pred_after"]``: the target
      model's class for x and x_adv (categorical, the bundle's classes)
    - ``obs[f"{key_added}_prob_pred_before"]``, ``obs[f"{key_added}_prob_pred_after"]``:
      the probability of that predicted class
    - ``obs[f"{key_added}_prob_target_before"]``, ``obs[f"{key_added}_prob_target_after"]``:
      the probability of the target class
    - ``uns[key_added]["params"]``: ``bundle`` (name), ``target``, ``layer`` (``"X"`` when
      None), ``k``
    - ``uns[key_added]["top_genes"]``: ``up`` / ``down`` (samples x k gene names, rank order)
      and ``up_P`` / ``down_P`` (their P)
    - ``uns[key_added]["consensus"]``: the columns of :func:`consensus` (``gene``,
      ``direction``, ``count``, ``frequency``, ``mean_P``) over the samples whose label is
      not the target (all samples when labels are unknown or all of the target), as arrays
    """
    if not copy and list(adata.var_names) != list(bundle.genes):
        raise UserError(
            f"{source}: in-place perturbation needs exactly the bundle's genes in order; use copy=True"
        )
    result = perturb_adata(adata, bundle, layer=layer, label_key=label_key, source=source)
    out = adata[:, bundle.genes].copy() if copy else adata
    out.layers[f"{key_added}_x"] = result.x
    out.layers[f"{key_added}_perturbation"] = result.P
    out.layers[f"{key_added}_perturbed"] = result.x_adv
    pred = result.predictions_df()
    for col in ("pred_before", "pred_after"):
        out.obs[f"{key_added}_{col}"] = pd.Categorical(
            pred[col].to_numpy(), categories=bundle.classes
        )
    for col in ("prob_before", "prob_after"):
        out.obs[f"{key_added}_prob_pred_{col.removeprefix('prob_')}"] = pred[col].to_numpy()
    for col in ("prob_target_before", "prob_target_after"):
        out.obs[f"{key_added}_{col}"] = pred[col].to_numpy()
    top = top_genes(result.P, bundle.genes, k=k)
    cons = consensus(result.P[result.source_rows()], bundle.genes, k=k)
    out.uns[key_added] = {
        "params": {
            "bundle": bundle.name,
            "target": bundle.target,
            "layer": layer or "X",
            "k": int(top.k),
        },
        "top_genes": {
            "up": top.up.astype(str),
            "down": top.down.astype(str),
            "up_P": top.up_P,
            "down_P": top.down_P,
        },
        "consensus": {
            c: (cons[c].to_numpy().astype(str) if cons[c].dtype == object else cons[c].to_numpy())
            for c in cons.columns
        },
    }
    return out if copy else None


# ----------------------------------------------------------------------------- top genes


@dataclass(frozen=True)
class TopGenes:
    """Per sample the ``k`` genes with the most positive (up) and most negative (down) P.

    Arrays are (samples, k), rank 1 first: gene names, gene positions and P values.
    """

    up: np.ndarray
    down: np.ndarray
    up_index: np.ndarray
    down_index: np.ndarray
    up_P: np.ndarray
    down_P: np.ndarray

    @property
    def k(self) -> int:
        return self.up.shape[1]


def _check_P(P: np.ndarray, genes: Sequence[str], k: int) -> tuple[np.ndarray, int]:
    P = np.asarray(P)
    if P.ndim == 1:
        P = P[None, :]
    if P.ndim != 2 or P.shape[1] != len(genes):
        raise ValueError(f"P has shape {P.shape}, expected samples x {len(genes)} genes")
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    return P, min(int(k), P.shape[1])


def top_genes(P: np.ndarray, genes: Sequence[str], k: int = 20) -> TopGenes:
    """The ``k`` most positive (up) and ``k`` most negative (down) genes of each sample.

    Parameters
    ----------
    P
        Perturbations, samples x genes (a single sample may be 1-d).
    genes
        Gene names, one per column of ``P``.
    k
        Genes per direction (at most the number of genes).

    Returns
    -------
    TopGenes with (samples, k) arrays in rank order; ties go to the earlier gene.
    """
    P, k = _check_P(P, genes, k)
    names = np.asarray(genes, dtype=object)
    up = np.argsort(-P, axis=1, kind="stable")[:, :k]
    down = np.argsort(P, axis=1, kind="stable")[:, :k]
    return TopGenes(
        names[up],
        names[down],
        up,
        down,
        np.take_along_axis(P, up, 1),
        np.take_along_axis(P, down, 1),
    )


def top_genes_df(perturbation: Perturbation, k: int = 20) -> pd.DataFrame:
    """Tidy top genes: one row per (sample, direction, rank), samples in their order, up first.

    Columns: ``sample``, ``direction`` (up/down), ``rank`` (1 = strongest), ``gene``, ``P``.
    """
    top = top_genes(perturbation.P, perturbation.genes, k=k)
    n, k = top.up.shape
    return pd.DataFrame(
        {
            "sample": np.repeat(np.asarray(perturbation.samples, dtype=object), 2 * k),
            "direction": np.tile(np.repeat(np.array(DIRECTIONS, dtype=object), k), n),
            "rank": np.tile(np.concatenate([np.arange(1, k + 1)] * 2), n),
            "gene": np.concatenate([top.up, top.down], axis=1).reshape(-1),
            "P": np.concatenate([top.up_P, top.down_P], axis=1).reshape(-1).astype(float),
        }
    )


def consensus(P: np.ndarray, genes: Sequence[str], k: int = 20) -> pd.DataFrame:
    """How often each gene is among the samples' top ``k``, per direction.

    Returns
    -------
    DataFrame with one row per (gene, direction) that is in at least one sample's top-k list:
    ``gene``, ``direction``, ``count`` (samples whose top-k list holds the gene),
    ``frequency`` (count / number of samples), ``mean_P`` (mean P of the gene over all the
    samples given). Sorted up first, then by count (descending), then by ``mean_P`` (most
    extreme first), then gene order.
    """
    P, k = _check_P(P, genes, k)
    if len(P) == 0:
        raise UserError("no samples selected: the consensus needs at least one sample")
    top = top_genes(P, genes, k=k)
    mean_P = P.mean(0, dtype=np.float64)
    names = np.asarray(genes, dtype=object)
    frames = []
    for d, sign in (("up", -1.0), ("down", 1.0)):
        count = np.bincount(getattr(top, f"{d}_index").reshape(-1), minlength=len(genes))
        idx = np.flatnonzero(count)
        idx = idx[np.lexsort((idx, sign * mean_P[idx], -count[idx]))]
        frames.append(
            pd.DataFrame(
                {
                    "gene": names[idx],
                    "direction": d,
                    "count": count[idx].astype(int),
                    "frequency": count[idx] / len(P),
                    "mean_P": mean_P[idx],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def consensus_top(P: np.ndarray, genes: Sequence[str], k: int = 20) -> dict[str, list[str]]:
    """The top-k list per direction of the samples ``P``: ``{"up": [...k genes], "down": [...]}``,
    ranked by mean P (:func:`tspg.ranking.rank_genes`, the one ranking of every top-gene list)."""
    df = rank_genes(P, genes, k=k)
    return {d: df.loc[df["direction"] == d, "gene"].tolist() for d in DIRECTIONS}


def unique_top_genes(
    P: np.ndarray,
    labels: Sequence[str],
    genes: Sequence[str],
    k: int = 20,
    seed: int = 0,
    *,
    exclude: str | None = None,
) -> dict:
    """The paper's consistency measure: pick one random sample per source class and count
    the unique genes in the union of their top-k up lists and of their down lists.

    Small numbers mean the generator moves every source class with the same genes (paper,
    GTEx: 85 up and 642 down of 4,386 genes over 53 tissues, k = 20).

    Parameters
    ----------
    labels
        Class of each row of ``P``; classes are visited in sorted order.
    seed
        Seed of the random choice of one sample per class.
    exclude
        A class to leave out (usually the target).

    Returns
    -------
    ``{"up": int, "down": int, "n_classes": int, "k": int, "samples": [row positions]}``
    """
    P, k = _check_P(P, genes, k)
    labels = np.asarray(labels, dtype=object).astype(str)
    if len(labels) != len(P):
        raise ValueError(f"{len(labels)} labels for {len(P)} samples")
    rng = np.random.default_rng(seed)
    picks = [
        int(rng.choice(np.flatnonzero(labels == c)))
        for c in sorted(set(labels.tolist()))
        if c != exclude
    ]
    if not picks:
        raise UserError("no source class to sample from")
    top = top_genes(P[picks], genes, k=k)
    return {
        "up": int(len(np.unique(top.up_index))),
        "down": int(len(np.unique(top.down_index))),
        "n_classes": len(picks),
        "k": k,
        "samples": picks,
    }
