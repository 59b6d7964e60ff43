"""Perturbing data with a bundle, and reading the perturbation: top genes and consensus.

x -> x_adv = clip(x + G(x), 0, 1), and the perturbation P = x_adv - x: the change the
generator actually makes, so x_adv = x + P (up to float rounding). Where x + G(x) would leave [0, 1], P
is the part of G(x) that takes effect (as the reference implementation reports it); a gene
at 0 that G pushes further down has P = 0, not a large negative value that changes nothing.
All three live in the bundle's scaled space ([0, 1] per gene, scaled with the minimum and
range stored in the bundle).

Top genes of a sample: its ``k`` genes with the most positive P ("up") and the ``k``
genes with the most negative P ("down"). Ties are broken by the bundle's gene order.

A seed ensemble's P is its members' mean P (x_adv the mean of their x_adv). Each member is
run once per chunk of samples: its P is kept (``Perturbation.P_members``) while the
members' arrays fit in :data:`MEMBER_BYTES`; beyond that only what the support needs is
kept (per-member running sums of P, per-sample support of the top genes).
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
import scipy.sparse as sp
import torch

from .data import (
    MAX_MISSING_SHARE,
    GeneMatch,
    ScalingReport,
    is_backed,
    is_sparse,
    vstack_csr,
)
from .errors import UserError, user_file
from .nets import evaluating
from .ranking import member_support, rank_genes

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
    "ensemble_perturbed",
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
_CHUNK_BYTES = 64 * 2**20  # data perturbed a chunk of samples at a time: x of a chunk ~ this
MEMBER_BYTES = 512 * 2**20  # an ensemble's members' P (N x samples x genes) kept up to this


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


def ensemble_perturbed(
    bundle: Bundle, Xs: np.ndarray, *, samples=None, keep_members: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """P, x_adv and the members' P (N x samples x genes; None for one generator or without
    ``keep_members``) of ``bundle`` for scaled ``Xs``, running each member once.

    For one generator this is :func:`generate_perturbed`. For a seed ensemble x_adv is the
    mean of the members' x_adv and P = x_adv - x, their mean P (what ``bundle.generator``,
    a :class:`~tspg.nets.GeneratorEnsemble`, gives too).
    """
    members = bundle.members
    if len(members) == 1:
        P, x_adv = generate_perturbed(
            members[0], Xs, what=f"the generator of bundle {bundle.name!r}", samples=samples
        )
        return P, x_adv, None
    Xs = np.ascontiguousarray(Xs, dtype=np.float32)
    total = np.zeros(Xs.shape, dtype=np.float32)
    kept = np.empty((len(members), *Xs.shape), np.float32) if keep_members else None
    for i, G in enumerate(members):
        what = f"generator {i} (seed {bundle.member_seeds[i]}) of bundle {bundle.name!r}"
        P_i, adv_i = generate_perturbed(G, Xs, what=what, samples=samples)
        total += adv_i
        if kept is not None:
            kept[i] = P_i
    x_adv = total / np.float32(len(members))
    return x_adv - Xs, x_adv, kept


def _fits_members(n_members: int, n: int, g: int) -> bool:
    return n_members > 1 and 4 * n_members * n * g <= MEMBER_BYTES


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
    ``gene_match`` (:class:`tspg.data.GeneMatch`) and ``scaling``
    (:class:`tspg.data.ScalingReport`) say how well new data fit the bundle (set by
    :func:`perturb_adata`): genes missing, matched ignoring case or by a ``var`` column, and
    the share of values outside the training range. For a seed ensemble of
    ``n_generators``, ``P`` is the members' mean P and ``P_members`` each member's P
    (N x samples x genes) when it fits in :data:`MEMBER_BYTES` (else None: no support).
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
    # how the data fit the bundle (tspg.verdict.data_fit_figures), when read from raw data
    data_fit: dict | None = field(default=None)
    gene_match: GeneMatch | None = field(default=None)  # how the data's genes were matched
    scaling: ScalingReport | None = field(default=None)  # how the data fit the training range
    P_members: np.ndarray | None = field(default=None)  # (members, samples, genes), ensembles
    n_generators: int = 1

    def members_of(self, rows=None) -> np.ndarray | None:
        """The members' P of ``rows`` (default all; a mask or positions), or None."""
        if self.P_members is None:
            return None
        return self.P_members if rows is None else self.P_members[:, rows]

    def ranking(self, rows=None, *, k: int | None = 20) -> pd.DataFrame:
        """:func:`tspg.ranking.rank_genes` of ``rows`` (default: :meth:`source_rows`), with
        the support of each gene when the members' P is kept."""
        rows = self.source_rows() if rows is None else rows
        return rank_genes(self.P[rows], self.genes, k=k, members=self.members_of(rows))

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
            data_fit=self.data_fit,
            gene_match=self.gene_match,
            scaling=self.scaling,
            P_members=None if self.P_members is None else self.P_members[:, idx],
            n_generators=self.n_generators,
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
            "consensus.csv": (
                consensus(
                    self.P[self.source_rows()],
                    self.genes,
                    k=k,
                    members=self.members_of(self.source_rows()),
                ),
                False,
            ),
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
    members: bool | None = None,
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
    members
        Keep a seed ensemble's members' P (``P_members``); None: when it fits in
        :data:`MEMBER_BYTES`.
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
    n_gen = bundle.n_generators
    keep = _fits_members(n_gen, *Xs.shape) if members is None else bool(members) and n_gen > 1
    P, x_adv, P_members = ensemble_perturbed(bundle, Xs, samples=samples, keep_members=keep)
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
        P_members=P_members,
        n_generators=n_gen,
    )


class _Perturber:
    """Perturbing data with a bundle a chunk of samples at a time: genes matched once, then
    per chunk the raw values of the bundle's genes, x, P, x_adv and the target model's
    probabilities before and after. ``scaling`` is complete after the last chunk, and so
    are the sums behind the selection's movement figures (:meth:`data_fit`, :meth:`movement`)."""

    def __init__(
        self,
        adata: ad.AnnData,
        bundle: Bundle,
        *,
        layer: str | None,
        label_key: str | None,
        source: str,
        max_missing: float,
        var_column: str | None = None,
    ):
        if layer is not None and layer not in adata.layers:
            raise UserError(
                f"{source}: no layer {layer!r}; layers are {list(adata.layers) or 'none'}"
            )
        if label_key is not None and label_key not in adata.obs:
            raise UserError(
                f"{source}: no column {label_key!r} in obs; columns are {list(adata.obs.columns)}"
            )
        self.bundle, self.adata, self.layer, self.source = bundle, adata, layer, source
        self.match = bundle.match_genes(
            adata, max_missing=max_missing, var_column=var_column, source=source
        )
        key = label_key or (bundle.label_key if bundle.label_key in adata.obs else None)
        self.labels = (
            np.asarray(adata.obs[key].astype(str).to_numpy(), dtype=object) if key else None
        )
        self.scaling: ScalingReport | None = None

    def chunks(self):
        """(rows, X, x, P, x_adv, proba_before, proba_after, P_members) per chunk of rows, in
        order; ``P_members`` (members x chunk x genes) for a seed ensemble, else None."""
        bundle, adata, g = self.bundle, self.adata, len(self.bundle.genes)
        n = adata.n_obs
        step = max(1, _CHUNK_BYTES // (4 * max(g, 1) * bundle.n_generators))
        for a in range(0, n, step):
            rows = slice(a, min(a + step, n))
            ids = [str(s) for s in adata.obs_names[rows]]
            X = bundle.aligned(
                adata,
                layer=self.layer,
                source=self.source,
                rows=np.arange(rows.start, rows.stop),
                match=self.match,
            )
            x, report = bundle.scaler.transform_report(
                X, genes=bundle.genes, source=self.source, warn=False
            )
            self.scaling = report if self.scaling is None else self.scaling.merge(report)
            # a NaN anywhere is an error naming the bundle, never "100% called the target"
            require_finite(
                x,
                f"scaling the data for bundle {bundle.name!r}",
                ids,
                "the bundle's scaler is damaged or the data hold values too large",
            )
            P, x_adv, P_members = ensemble_perturbed(bundle, x, samples=ids)
            before = bundle.predict_proba(x, samples=ids)
            after = bundle.predict_proba(x_adv, samples=ids)
            yield rows, X, x, P, x_adv, before, after, P_members
        if self.scaling is not None:
            self.scaling.warn(self.source)

    def data_fit(self) -> dict:
        """The verdict's data-fit figures (:func:`tspg.verdict.data_fit_figures`) of the data."""
        from .verdict import data_fit_figures

        s = self.scaling
        return data_fit_figures(
            n_genes=len(self.bundle.genes),
            n_samples=self.adata.n_obs,
            outside_share=s.outside_share if s else 0.0,
            n_missing=self.match.n_missing,
            n_case_matched=len(self.match.case_matched),
            worst_gene=s.most_affected_gene if s else None,
            worst_gene_share=s.most_affected_share if s else None,
        )


def perturb_adata(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    source: str = "data",
    max_missing: float = MAX_MISSING_SHARE,
    var_column: str | None = None,
) -> Perturbation:
    """Perturb every sample of ``adata``: genes matched by name, scaled with the bundle's
    scaler (:meth:`tspg.bundle.Bundle.scale`); the result as a :class:`Perturbation`.

    Genes are matched by :func:`tspg.data.match_genes`: exactly, then ignoring case, then
    by the symbols of a ``var`` column when ``var_names`` are ids (``var_column``, else
    one of :data:`tspg.data.SYMBOL_COLUMNS`). Up to ``max_missing`` of the bundle's genes
    may be missing (default :data:`tspg.data.MAX_MISSING_SHARE`; 0 refuses any): they are
    filled by :func:`tspg.data.missing_gene_fill` (the training mean). The result's
    ``gene_match`` and ``scaling`` report all of it.

    Labels are read from ``obs[label_key]`` (default: the bundle's label key, when present).
    The data are read, scaled and perturbed a chunk of samples at a time: only the
    bundle's genes of these samples are ever dense.
    """
    p = _Perturber(
        adata,
        bundle,
        layer=layer,
        label_key=label_key,
        source=source,
        max_missing=max_missing,
        var_column=var_column,
    )
    n, g, c = adata.n_obs, len(bundle.genes), len(bundle.classes)
    x, P, x_adv = (np.empty((n, g), dtype=np.float32) for _ in range(3))
    before, after = (np.empty((n, c), dtype=np.float32) for _ in range(2))
    n_gen = bundle.n_generators
    P_members = np.empty((n_gen, n, g), np.float32) if _fits_members(n_gen, n, g) else None
    for rows, _, *parts, P_chunk in p.chunks():
        for out, part in zip((x, P, x_adv, before, after), parts, strict=True):
            out[rows] = part
        if P_members is not None:
            P_members[:, rows] = P_chunk
    return Perturbation(
        [str(s) for s in adata.obs_names],
        list(bundle.genes),
        list(bundle.classes),
        bundle.target,
        x,
        P,
        x_adv,
        before,
        after,
        p.labels,
        p.data_fit(),
        p.match,
        p.scaling,
        P_members=P_members,
        n_generators=n_gen,
    )


def perturb(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    k: int = 20,
    key_added: str = "tspg",
    source: str = "data",
    max_missing: float = MAX_MISSING_SHARE,
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
    max_missing
        Share of the bundle's genes that may be missing (filled, see :func:`perturb_adata`).
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
      None), ``k``, ``n_generators`` and ``member_seeds`` (the seed of each generator)
    - ``uns[key_added]["top_genes"]``: ``up`` / ``down`` (samples x k gene names, rank order)
      and ``up_P`` / ``down_P`` (their P); for a seed ensemble also ``up_support`` /
      ``down_support`` (samples x k: in how many members' own top k of that sample the
      gene is)
    - ``uns[key_added]["gene_match"]``, ``uns[key_added]["scaling"]``: how the data's genes
      were found and filled (:class:`tspg.data.GeneMatch`) and how many values fell outside
      the training range (:class:`tspg.data.ScalingReport`), as plain dicts
    - with ``copy=True``, ``var[f"{key_added}_data_name"]``: each gene's name in the data
      ("" when missing and filled)
    - ``uns[key_added]["consensus"]``: the columns of :func:`consensus` (``gene``,
      ``direction``, ``count``, ``frequency``, ``mean_P``; for a seed ensemble ``support``
      and ``n_members``) over the samples whose label is not the target (all samples when
      labels are unknown or all of the target), as arrays
    - ``uns[key_added]["verdict"]``: :func:`tspg.verdict.selection_verdict`: the bundle's
      stored verdict plus how these samples moved and how the data fit the bundle
    """
    if not copy and list(adata.var_names) != list(bundle.genes):
        raise UserError(
            f"{source}: in-place perturbation needs exactly the bundle's genes in order; use copy=True"
        )
    p = _Perturber(
        adata, bundle, layer=layer, label_key=label_key, source=source, max_missing=max_missing
    )
    out = _perturb_into(
        _MemorySink(adata, bundle, key_added, keep_X=copy), p, k=k, key_added=key_added
    )
    if copy:
        return out
    for name, values in out.layers.items():
        adata.layers[name] = values
    for col in out.obs.columns.difference(adata.obs.columns, sort=False):
        adata.obs[col] = out.obs[col]
    adata.uns[key_added] = out.uns[key_added]
    return None


def write_perturbed(
    adata: ad.AnnData,
    bundle: Bundle,
    path: str | Path,
    *,
    layer: str | None = None,
    label_key: str | None = None,
    k: int = 20,
    key_added: str = "tspg",
    source: str = "data",
    max_missing: float = MAX_MISSING_SHARE,
) -> ad.AnnData:
    """``perturb(adata, bundle, copy=True)`` written to ``path`` (.h5ad) a chunk of samples
    at a time: memory holds one chunk, never the result's matrices (X, x, P, x_adv).

    The file holds what :func:`perturb` returns. It is written to a temporary file and
    renamed into place, so a failure leaves no half file. Returns the result's ``obs`` and
    ``uns`` as an AnnData without matrices (for a summary).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: cannot write, {path.parent} is not a folder")
    p = _Perturber(
        adata, bundle, layer=layer, label_key=label_key, source=source, max_missing=max_missing
    )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _FileSink(tmp, adata, bundle, p.match, key_added) as sink:
            summary = _perturb_into(sink, p, k=k, key_added=key_added)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


LAYERS = ("x", "perturbation", "perturbed")  # the layers perturb() writes, after key_added


def _var(adata: ad.AnnData, bundle: Bundle, match: GeneMatch, key_added: str) -> pd.DataFrame:
    names = [adata.var_names[j] if j >= 0 else "" for j in match.index]
    return pd.DataFrame({f"{key_added}_data_name": names}, index=list(bundle.genes))


def _obsm(adata: ad.AnnData) -> dict | None:
    return None if is_backed(adata) else {k: np.asarray(v) for k, v in adata.obsm.items()}


class _MemorySink:
    """The result in memory: x, P, x_adv, and for a copy X as the data store it (dense, or
    CSR for sparse data)."""

    def __init__(self, adata: ad.AnnData, bundle: Bundle, key_added: str, *, keep_X: bool):
        n, g = adata.n_obs, len(bundle.genes)
        self.adata, self.bundle, self.key, self.keep_X = adata, bundle, key_added, keep_X
        self.layers = {f"{key_added}_{name}": np.empty((n, g), np.float32) for name in LAYERS}
        self.sparse = is_sparse(adata)
        self.blocks: list = []
        self.X = np.empty((n, g), np.float32) if keep_X and not self.sparse else None

    def write(self, rows: slice, X, x, P, x_adv) -> None:
        for name, part in zip(LAYERS, (x, P, x_adv), strict=True):
            self.layers[f"{self.key}_{name}"][rows] = part
        if self.keep_X and self.sparse:
            self.blocks.append(sp.csr_matrix(X))
        elif self.keep_X:
            self.X[rows] = X

    def finish(self, obs: pd.DataFrame, uns: dict, match: GeneMatch) -> ad.AnnData:
        X = vstack_csr(self.blocks, len(self.bundle.genes)) if self.blocks else self.X
        return ad.AnnData(
            X=X,
            obs=obs,
            var=_var(self.adata, self.bundle, match, self.key),
            obsm=_obsm(self.adata) if self.keep_X else None,
            layers=self.layers,
            uns=uns,
        )


class _FileSink:
    """The result written into an .h5ad as it is computed (anndata's on-disk format)."""

    def __init__(self, path: Path, adata: ad.AnnData, bundle: Bundle, match: GeneMatch, key: str):
        import h5py

        self.shape = (adata.n_obs, len(bundle.genes))
        self.sparse, self.X = is_sparse(adata), None
        ad.AnnData(
            obs=adata.obs.copy(), var=_var(adata, bundle, match, key), obsm=_obsm(adata)
        ).write_h5ad(path)
        self.f = h5py.File(path, "a")
        self.layers = [self._dense(f"layers/{key}_{name}") for name in LAYERS]

    def _dense(self, key: str):
        n, g = self.shape
        d = self.f.create_dataset(key, shape=self.shape, dtype=np.float32, chunks=(min(n, 64), g))
        d.attrs["encoding-type"], d.attrs["encoding-version"] = "array", "0.2.0"
        return d

    def write(self, rows: slice, X, x, P, x_adv) -> None:
        from anndata.io import sparse_dataset, write_elem

        for d, part in zip(self.layers, (x, P, x_adv), strict=True):
            d[rows] = part
        if self.sparse and self.X is None:
            write_elem(self.f, "X", sp.csr_matrix(X))
            self.X = sparse_dataset(self.f["X"])
        elif self.sparse:
            self.X.append(sp.csr_matrix(X))
        else:
            if self.X is None:
                self.X = self._dense("X")
            self.X[rows] = X

    def finish(self, obs: pd.DataFrame, uns: dict, match: GeneMatch) -> ad.AnnData:
        from anndata.io import write_elem

        for key, value in (("obs", obs), ("uns", uns)):
            del self.f[key]
            write_elem(self.f, key, value)
        return ad.AnnData(obs=obs, uns=uns)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def _perturb_into(sink, p: _Perturber, *, k: int, key_added: str) -> ad.AnnData:
    """Run the perturber into ``sink``: the layers chunk by chunk, with the predictions, the
    top genes and the consensus over the source samples accumulated on the way; then obs
    and uns as :func:`perturb` documents them."""
    bundle, genes = p.bundle, p.bundle.genes
    n, g = p.adata.n_obs, len(genes)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(int(k), g)
    source = _source_mask(p.labels, bundle.target, n)
    proba = {w: np.empty((n, len(bundle.classes)), np.float32) for w in ("before", "after")}
    top_idx = {d: np.empty((n, k), dtype=np.int64) for d in DIRECTIONS}
    top_P = {d: np.empty((n, k), dtype=np.float32) for d in DIRECTIONS}
    counts = {d: np.zeros(g, dtype=np.int64) for d in DIRECTIONS}
    sum_P = np.zeros(g, dtype=np.float64)
    n_gen = bundle.n_generators
    member_sums = np.zeros((n_gen, g), dtype=np.float64) if n_gen > 1 else None
    support = {d: np.empty((n, k), dtype=np.int16) for d in DIRECTIONS} if n_gen > 1 else None
    target_mean = bundle.target_mean
    moved = {"abs_P": 0.0, "gap": 0.0 if target_mean is not None else None}
    for rows, X, x, P, x_adv, before, after, P_members in p.chunks():
        sink.write(rows, X, x, P, x_adv)
        proba["before"][rows], proba["after"][rows] = before, after
        top = top_genes(P, genes, k=k, members=P_members)
        src = source[rows]
        for d in DIRECTIONS:
            idx = getattr(top, f"{d}_index")
            top_idx[d][rows], top_P[d][rows] = idx, getattr(top, f"{d}_P")
            counts[d] += np.bincount(idx[src].reshape(-1), minlength=g)
            if support is not None:
                support[d][rows] = getattr(top, f"{d}_support")
        sum_P += P[src].sum(0, dtype=np.float64)
        if member_sums is not None:
            member_sums += P_members[:, src].sum(1, dtype=np.float64)
        moved["abs_P"] += float(np.abs(P[src]).sum(dtype=np.float64))
        if target_mean is not None:
            moved["gap"] += float(np.abs(target_mean - x[src]).sum(dtype=np.float64))
    n_src = int(source.sum())
    classes = np.asarray(bundle.classes, dtype=object)
    pred = {w: classes[proba[w].argmax(1)] for w in ("before", "after")}
    member_means = None if member_sums is None else member_sums / max(n_src, 1)
    cons = _consensus_frame(counts, sum_P / max(n_src, 1), n_src, genes, member_means, k)
    names = np.asarray(genes).astype(str)
    top_uns = {
        "up": names[top_idx["up"]],
        "down": names[top_idx["down"]],
        "up_P": top_P["up"],
        "down_P": top_P["down"],
    }
    if support is not None:
        top_uns.update(up_support=support["up"], down_support=support["down"])
    uns = {
        key_added: {
            "params": {
                "bundle": bundle.name,
                "target": bundle.target,
                "layer": p.layer or "X",
                "k": k,
                "n_generators": n_gen,
                "member_seeds": np.asarray(bundle.member_seeds, dtype=np.int64),
            },
            "top_genes": top_uns,
            "consensus": {
                c: (
                    cons[c].to_numpy().astype(str)
                    if cons[c].dtype == object
                    else cons[c].to_numpy()
                )
                for c in cons.columns
            },
            "gene_match": _uns_safe(p.match.to_dict()),
            "scaling": _uns_safe(p.scaling.to_dict()) if p.scaling else {},
            "verdict": _selection_verdict(p, moved, pred, source),
        }
    }
    obs = p.adata.obs.copy()
    t = bundle.classes.index(bundle.target)
    for when in ("before", "after"):
        obs[f"{key_added}_pred_{when}"] = pd.Categorical(pred[when], categories=bundle.classes)
    for when in ("before", "after"):
        obs[f"{key_added}_prob_pred_{when}"] = proba[when].max(1, initial=0.0)
    for when in ("before", "after"):
        obs[f"{key_added}_prob_target_{when}"] = proba[when][:, t]
    return sink.finish(obs, uns, p.match)


def _selection_verdict(p: _Perturber, moved: dict, pred: dict, source: np.ndarray) -> dict:
    """:func:`tspg.verdict.selection_verdict` of data perturbed a chunk at a time: the
    bundle's stored checks, the selection's movement (from sums) and its data fit."""
    from .metrics import movement_from_sums
    from .verdict import grade

    bundle = p.bundle
    n_values = int(source.sum()) * len(bundle.genes)
    selection = movement_from_sums(
        moved["abs_P"],
        moved["gap"],
        n_values,
        pred["before"][source],
        pred["after"][source],
        bundle.target,
    )
    return grade(
        selection=selection,
        data_fit=p.data_fit(),
        stored=bundle.manifest.get("verdict"),
        config=bundle.manifest.get("config"),
        target=bundle.target,
    )


def _source_mask(labels, target: str, n: int) -> np.ndarray:
    """The source samples (label not the target); all when unknown or all of the target."""
    if labels is None:
        return np.ones(n, bool)
    rows = np.asarray(labels).astype(str) != target
    return rows if rows.any() else np.ones(n, bool)


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
    # a seed ensemble's: in how many members' own top k of the sample each gene is
    up_support: np.ndarray | None = None
    down_support: np.ndarray | None = None

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


def top_genes(P: np.ndarray, genes: Sequence[str], k: int = 20, *, members=None) -> TopGenes:
    """The ``k`` most positive (up) and ``k`` most negative (down) genes of each sample.

    Parameters
    ----------
    P
        Perturbations, samples x genes (a single sample may be 1-d).
    genes
        Gene names, one per column of ``P``.
    k
        Genes per direction (at most the number of genes).
    members
        A seed ensemble's members' P of the same samples (N x samples x genes; ``P`` their
        mean): adds ``up_support`` / ``down_support``.

    Returns
    -------
    TopGenes with (samples, k) arrays in rank order; ties go to the earlier gene.
    """
    P, k = _check_P(P, genes, k)
    if members is not None:
        members = np.asarray(members)
        if members.ndim == 2:
            members = members[:, None, :]
        if members.shape[1:] != P.shape:
            raise ValueError(f"members have shape {members.shape}, P {P.shape}")
    names = np.asarray(genes, dtype=object)
    up = np.empty((len(P), k), dtype=np.int64)
    down = np.empty((len(P), k), dtype=np.int64)
    step = max(1, (32 * 2**20) // (8 * max(P.shape[1], 1)))  # rows a sort: bounded memory
    for i in range(0, len(P), step):
        block = P[i : i + step]
        up[i : i + step] = np.argsort(-block, axis=1, kind="stable")[:, :k]
        down[i : i + step] = np.argsort(block, axis=1, kind="stable")[:, :k]
    support = {"up": None, "down": None}
    if members is not None:
        for d, idx, sign in (("up", up, -1.0), ("down", down, 1.0)):
            count = np.zeros(idx.shape, dtype=np.int16)
            for Pm in members:  # a member's own top k of each sample holds the gene?
                own = np.argsort(sign * Pm, axis=1, kind="stable")[:, :k]
                mask = np.zeros(Pm.shape, dtype=bool)
                np.put_along_axis(mask, own, True, axis=1)
                count += np.take_along_axis(mask, idx, 1)
            support[d] = count
    return TopGenes(
        names[up],
        names[down],
        up,
        down,
        np.take_along_axis(P, up, 1),
        np.take_along_axis(P, down, 1),
        support["up"],
        support["down"],
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


def consensus(P: np.ndarray, genes: Sequence[str], k: int = 20, *, members=None) -> pd.DataFrame:
    """How often each gene is among the samples' top ``k``, per direction.

    ``members``: a seed ensemble's members' P of the same samples (N x samples x genes) or
    their mean P per gene (N x genes); adds ``support`` (in how many members' own top ``k``
    by mean P the gene is, :func:`tspg.ranking.member_support`) and ``n_members``.

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
    counts = {
        d: np.bincount(getattr(top, f"{d}_index").reshape(-1), minlength=len(genes))
        for d in DIRECTIONS
    }
    if members is not None and np.ndim(members) == 3:
        members = np.asarray(members).mean(1, dtype=np.float64)
    return _consensus_frame(counts, P.mean(0, dtype=np.float64), len(P), genes, members, k)


def _consensus_frame(
    counts: dict, mean_P: np.ndarray, n: int, genes, member_means=None, k: int = 20
) -> pd.DataFrame:
    """:func:`consensus`'s frame from the top-k counts per direction and the mean P per gene
    (and the members' mean P per gene, N x genes, for the support)."""
    names = np.asarray(genes, dtype=object)
    support = None if member_means is None else member_support(member_means, k=k)
    frames = []
    for d, sign in (("up", -1.0), ("down", 1.0)):
        count = counts[d]
        idx = np.flatnonzero(count)
        idx = idx[np.lexsort((idx, sign * mean_P[idx], -count[idx]))]
        frame = pd.DataFrame(
            {
                "gene": names[idx],
                "direction": d,
                "count": count[idx].astype(int),
                "frequency": count[idx] / n,
                "mean_P": mean_P[idx],
            }
        )
        if support is not None:
            frame["support"] = support[d][idx]
            frame["n_members"] = len(member_means)
        frames.append(frame)
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


def _uns_safe(d: dict) -> dict:
    """A report's dict as h5ad can store it in ``uns`` (no None, lists as string arrays)."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        out[k] = np.asarray(v, dtype=str) if isinstance(v, list) else v
    return out
