"""The t-SNE map of the paper's Fig. 2 (left): real samples by class, perturbed samples placed on it.

A *reference map* is fit once on real samples (openTSNE, Barnes-Hut or FFT gradients, PCA
initialisation, seeded); new points (perturbed samples of a selection) are then *placed*
on it as openTSNE's ``transform`` does: only the new points are optimised and
the reference never moves. Before t-SNE the data are reduced to at most ``n_pcs`` principal components
(fit on the reference samples only); the same projection is applied to new points.

Typical use::

    result = perturbation_map(adata, bundle)  # the held-out non-target samples on a map
    result.frame  # x, y, sample, class, predicted, kind (real / perturbed)

or step by step (the dashboard caches each step)::

    ref, rows = class_map(adata, bundle)  # select_map_samples + fit_reference_map
    pert = perturb_adata(adata[ids], bundle)
    frame = perturbation_map_frame(ref, pert, real_pred=bundle.predict(Xs[rows]))

The openTSNE embedding object is kept in memory only; pickling a :class:`ReferenceMap`
drops it, and :func:`place` then says so. On disk a map is plain arrays in an ``.npz``
(:func:`save_reference_map`, never pickled) and its embedding is rebuilt when it is read
(:func:`load_reference_map`); ``class_map(..., cache_dir=map_cache_dir())`` keeps every map
it fits there, keyed by the values, samples, classes and settings it was fit on, so the
dashboard's first Map after a restart reads the map instead of fitting it again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from .errors import UserError
from .perturbation import Perturbation, perturb_adata

if TYPE_CHECKING:
    from .bundle import Bundle, SampleChoice

logger = logging.getLogger(__name__)

__all__ = [
    "MAP_MAX_CLASSES",
    "MAP_MAX_PER_CLASS",
    "PerturbationMap",
    "ReferenceMap",
    "class_map",
    "fit_class_map",
    "fit_joint_map",
    "fit_reference_map",
    "load_reference_map",
    "map_cache_dir",
    "map_cache_key",
    "map_classes",
    "map_frame",
    "perturbation_map",
    "perturbation_map_frame",
    "place",
    "place_moves",
    "save_reference_map",
    "select_map_samples",
]

# Threads: openTSNE's OpenMP threads spin while they wait. On a busy machine (a shared
# 2-core server) that made 2-thread fits 3-30x slower than 1-thread ones, so the default is
# one thread. ``OMP_WAIT_POLICY=PASSIVE`` in the environment *before Python starts* removes
# the spinning (setting it from Python is too late once scikit-learn, which ships the same
# libgomp, has been imported); then ``n_jobs=2`` helps on an idle machine.
DEFAULT_N_JOBS = 1

GradientMethod = Literal["fft", "bh"]

# Placement (as openTSNE's ``transform``). On the demo map (1,000 samples) 50 iterations
# end within 0.01 (map units, span ~100) of where 250 do, at ~0.1 s CPU for 100 points.
PLACE_DEFAULTS: dict[str, Any] = {
    "perplexity": 5,
    "k": 15,
    "n_iter": 50,
    "learning_rate": 0.1,
    "early_exaggeration_iter": 0,
}


@dataclass(frozen=True, eq=False)
class PCAProjection:
    """Centre, then project onto principal axes (fit with a plain, deterministic SVD)."""

    mean: np.ndarray  # (n_genes,)
    components: np.ndarray  # (n_pcs, n_genes)

    @classmethod
    def fit(cls, X: np.ndarray, n_components: int) -> PCAProjection:
        X = np.asarray(X, dtype=np.float64)
        mean = X.mean(0)
        _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
        vt = vt[:n_components]
        # a fixed sign per axis (largest loading positive), so a refit gives the same map
        signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
        signs[signs == 0] = 1.0
        return cls(mean, vt * signs[:, None])

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean) @ self.components.T

    @property
    def n_components(self) -> int:
        return self.components.shape[0]


@dataclass(eq=False)
class ReferenceMap:
    """A fitted t-SNE map of real samples.

    Attributes
    ----------
    coords
        (n, 2) map coordinates of the reference samples.
    samples, labels
        Sample names and class labels, in the order of ``coords``.
    seed
        Random state of the fit.
    params
        The t-SNE and PCA settings used (plain values, JSON-friendly).
    pca
        The projection applied before t-SNE (None when the data were used as given).
    embedding
        The openTSNE ``TSNEEmbedding`` needed by :func:`place`; in memory only, never pickled.
    """

    coords: np.ndarray
    samples: list[str]
    labels: list[str]
    seed: int = 0
    params: dict = field(default_factory=dict)
    pca: PCAProjection | None = None
    embedding: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["embedding"] = None  # openTSNE objects hold the affinity matrix and a kNN index
        return state

    def project(self, X: np.ndarray) -> np.ndarray:
        """Data -> the space t-SNE sees (PCA, if any), as C-contiguous float64."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"expected a samples x genes matrix, got shape {X.shape}")
        n_in = self.params.get("n_genes")
        if n_in is not None and X.shape[1] != n_in:
            raise ValueError(f"the map was fit on {n_in} genes, the new samples have {X.shape[1]}")
        Z = self.pca.transform(X) if self.pca is not None else X
        return np.ascontiguousarray(Z)


MAP_MAX_CLASSES = 10  # the paper's map shows 10 classes
MAP_MAX_PER_CLASS = 300  # real samples per class on a map (seeded subsample beyond that)
MAP_MAX_PLACED = 2_000  # perturbed samples placed on a map by default (seeded subsample beyond)


def map_classes(
    labels, *, classes=None, max_classes: int | None = MAP_MAX_CLASSES, target: str | None = None
) -> list[str]:
    """The classes a map shows, in order: the target first, then ``classes`` (default: the
    most frequent classes of ``labels``), at most ``max_classes``.

    ValueError naming a class (or the target) that has no sample in ``labels``.
    """
    labels = np.asarray(labels).astype(str)
    present = pd.Series(labels).value_counts(sort=True)  # most frequent first; ties by first seen
    if classes is None:
        order = list(present.index)
    else:
        order = [str(c) for c in classes]
        unknown = [c for c in order if c not in present.index]
        if unknown:
            raise UserError(f"class(es) not in the data: {', '.join(unknown[:5])}")
    if target is not None:
        target = str(target)
        if target not in present.index:
            raise UserError(f"target class {target!r} is not in the data")
        order = [target] + [c for c in order if c != target]
    if max_classes is not None and max_classes < 1:
        raise UserError("max_classes must be at least 1")
    return list(dict.fromkeys(order))[: max_classes or None]


def select_map_samples(
    labels,
    *,
    classes=None,
    max_classes: int | None = MAP_MAX_CLASSES,
    max_per_class: int | None = None,
    target: str | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices of the real samples to show on the map.

    Parameters
    ----------
    labels
        Class label per sample (array-like of strings).
    classes
        Classes to keep, in this order; default: the most frequent ones.
    max_classes
        At most this many classes (the paper's map shows 10).
    max_per_class
        Keep at most this many samples per class (seeded subsample); None keeps all.
    target
        The target class; it is always kept and comes first among the classes.
    seed
        Random seed of the subsampling.

    Returns
    -------
    Sorted integer indices into ``labels``.
    """
    labels = np.asarray(labels).astype(str)
    order = map_classes(labels, classes=classes, max_classes=max_classes, target=target)
    rng = np.random.default_rng(seed)
    keep = []
    for c in order:
        idx = np.flatnonzero(labels == c)
        if max_per_class is not None and len(idx) > max_per_class:
            idx = rng.choice(idx, size=max_per_class, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=int)


def fit_class_map(
    X,
    labels,
    samples,
    *,
    classes=None,
    target: str | None = None,
    max_classes: int | None = MAP_MAX_CLASSES,
    max_per_class: int | None = MAP_MAX_PER_CLASS,
    seed: int = 0,
    **tsne,
) -> tuple[ReferenceMap, np.ndarray]:
    """The reference map of some classes' real samples: :func:`select_map_samples`, then
    :func:`fit_reference_map` on those rows (``tsne``: its other options), both seeded with ``seed``.

    Returns
    -------
    ``(map, rows)``: the :class:`ReferenceMap` and the row indices of its samples in ``X``.
    """
    labels = np.asarray(labels).astype(str)
    samples = np.asarray(samples).astype(str)
    if not (len(labels) == len(samples) == len(X)):
        raise ValueError(
            f"{len(X)} samples in X, but {len(samples)} names and {len(labels)} labels"
        )
    idx = select_map_samples(
        labels,
        classes=classes,
        max_classes=max_classes,
        max_per_class=max_per_class,
        target=target,
        seed=seed,
    )
    ref = fit_reference_map(
        np.asarray(X)[idx], samples=samples[idx], labels=labels[idx], seed=seed, **tsne
    )
    return ref, idx


def _tsne(seed: int, perplexity: float, n_jobs: int, n_iter: int, n: int, method: str):
    from openTSNE import TSNE

    # openTSNE needs 3 * perplexity < n: lower it for very small maps
    perplexity = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        n_iter=n_iter,
        initialization="pca",
        negative_gradient_method=method,
        n_jobs=n_jobs,
        random_state=seed,
        verbose=False,
    )
    return tsne, perplexity


def _check_X(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a samples x genes matrix, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: contains missing or infinite values")
    return X


def fit_reference_map(
    X,
    *,
    samples,
    labels,
    seed: int = 0,
    perplexity: float = 30,
    n_jobs: int = DEFAULT_N_JOBS,
    n_pcs: int | None = 50,
    n_iter: int = 500,
    negative_gradient_method: GradientMethod = "bh",
) -> ReferenceMap:
    """Fit the t-SNE reference map of real samples.

    Parameters
    ----------
    X
        Samples x genes (e.g. the bundle-scaled expression).
    samples, labels
        Sample names and class labels, one per row of ``X``.
    seed
        Random state of openTSNE; the same seed gives the same map.
    perplexity
        t-SNE perplexity (lowered automatically for very few samples).
    n_jobs
        Threads for openTSNE (default 1; see ``DEFAULT_N_JOBS`` for why).
    n_pcs
        Reduce to this many principal components first (None: use ``X`` as given).
    n_iter
        Optimisation iterations after the 250 early-exaggeration ones.
    negative_gradient_method
        ``"bh"`` (Barnes-Hut, the default) or ``"fft"`` (interpolation). Measured on the
        demo (1,000 samples, 50 PCs, one thread): 4 s CPU with Barnes-Hut, 13 s with FFT,
        same 5-NN label recovery; FFT's cost is set by the map's extent (its grid), not by
        the number of points, and pays off only above ~10,000 samples.

    Returns
    -------
    A :class:`ReferenceMap`; ``params`` records every setting.
    """
    X = _check_X(X)
    samples = [str(s) for s in samples]
    labels = [str(c) for c in labels]
    if not (len(samples) == len(labels) == len(X)):
        raise ValueError(
            f"{len(X)} samples in X, but {len(samples)} names and {len(labels)} labels"
        )
    if len(X) < 5:
        raise UserError(f"a t-SNE map needs at least 5 samples, got {len(X)}")
    pca = None
    if n_pcs is not None and min(X.shape) > n_pcs:
        pca = PCAProjection.fit(X, n_pcs)
    Z = pca.transform(X) if pca is not None else X
    tsne, perp = _tsne(seed, perplexity, n_jobs, n_iter, len(X), negative_gradient_method)
    emb = tsne.fit(np.ascontiguousarray(Z))
    # openTSNE's transform centres the reference embedding in place; centre it now, so that
    # placing points never shifts the map away from ``coords``
    emb -= (emb.max(axis=0) + emb.min(axis=0)) / 2
    params = {
        "method": "openTSNE",
        "perplexity": perp,
        "n_iter": n_iter,
        "negative_gradient_method": negative_gradient_method,
        "initialization": "pca",
        "n_pcs": pca.n_components if pca is not None else None,
        "n_genes": X.shape[1],
        "n_jobs": n_jobs,
    }
    return ReferenceMap(
        np.asarray(emb, dtype=np.float64).copy(), samples, labels, seed, params, pca, emb
    )


def place(
    ref: ReferenceMap,
    X_new,
    *,
    n_iter: int | None = None,
    perplexity: float | None = None,
    k: int | None = None,
    n_jobs: int = 1,
) -> np.ndarray:
    """Place new samples on an existing map without moving it (as openTSNE's ``transform``).

    Each new point starts at the median of its ``k`` nearest reference points and is then
    optimised against the fixed reference with perplexity 5 for 50 iterations
    (``PLACE_DEFAULTS``; about 0.1 s for 100 points on a 1,000-sample map). The result is
    deterministic. One thread by default: the work is small, and OpenMP threads on a
    busy machine cost more than they save.

    Returns
    -------
    (m, 2) coordinates, in the frame of ``ref.coords``.
    """
    if ref.embedding is None:
        raise ValueError("this map has no t-SNE embedding in memory (it was pickled); fit it again")
    Z = ref.project(_check_X(X_new, "new samples"))
    if len(Z) == 0:
        return np.zeros((0, 2))
    opts = dict(PLACE_DEFAULTS)
    opts.update(
        {
            key: v
            for key, v in {"n_iter": n_iter, "perplexity": perplexity, "k": k}.items()
            if v is not None
        }
    )
    k_eff = int(min(opts["k"], len(ref) - 1))
    perp = float(min(opts["perplexity"], max(1.0, (k_eff - 1) / 3.0)))
    partial = ref.embedding.prepare_partial(Z, initialization="median", k=k_eff, perplexity=perp)
    if opts["early_exaggeration_iter"]:
        partial.optimize(
            n_iter=opts["early_exaggeration_iter"],
            learning_rate=opts["learning_rate"],
            exaggeration=4,
            momentum=0.8,
            max_grad_norm=0.25,
            inplace=True,
            n_jobs=n_jobs,
        )
    if opts["n_iter"]:
        partial.optimize(
            n_iter=opts["n_iter"],
            learning_rate=opts["learning_rate"],
            exaggeration=1.5,
            momentum=0.8,
            max_grad_norm=0.25,
            inplace=True,
            n_jobs=n_jobs,
        )
    return np.asarray(partial, dtype=np.float64).copy()


def fit_joint_map(
    X_real,
    X_new,
    *,
    seed: int = 0,
    perplexity: float = 30,
    n_jobs: int = DEFAULT_N_JOBS,
    n_pcs: int | None = 50,
    n_iter: int = 500,
    negative_gradient_method: GradientMethod = "bh",
) -> tuple[np.ndarray, np.ndarray]:
    """One t-SNE of real and new samples together (the app's "recompute joint map").

    The PCA is fit on the real samples only, so perturbed samples do not tilt the axes.

    Returns
    -------
    ``(coords_real, coords_new)``: (n, 2) and (m, 2).
    """
    X_real = _check_X(X_real, "real samples")
    X_new = _check_X(X_new, "new samples")
    if X_real.shape[1] != X_new.shape[1]:
        raise ValueError(f"real samples have {X_real.shape[1]} genes, new samples {X_new.shape[1]}")
    if n_pcs is not None and min(X_real.shape) > n_pcs:
        pca = PCAProjection.fit(X_real, n_pcs)
        Z = np.vstack([pca.transform(X_real), pca.transform(X_new)])
    else:
        Z = np.vstack([X_real, X_new])
    if len(Z) < 5:
        raise UserError(f"a t-SNE map needs at least 5 samples, got {len(Z)}")
    tsne, _ = _tsne(seed, perplexity, n_jobs, n_iter, len(Z), negative_gradient_method)
    coords = np.asarray(tsne.fit(np.ascontiguousarray(Z)), dtype=np.float64)
    n = len(X_real)
    return coords[:n].copy(), coords[n:].copy()


def _column(values, n: int, name: str, fill=None) -> list:
    if values is None:
        return [fill] * n
    values = [None if v is None else str(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} points")
    return values


def map_frame(
    ref: ReferenceMap,
    new_coords=None,
    *,
    new_samples=None,
    new_source=None,
    new_pred=None,
    real_pred=None,
    new_before=None,
) -> pd.DataFrame:
    """Tidy frame of the map: one row per point.

    Parameters
    ----------
    ref
        The reference map (real samples).
    new_coords
        (m, 2) placed coordinates of perturbed samples (from :func:`place`), or None.
    new_samples
        Names of the perturbed samples (default ``perturbed-0``, ...).
    new_source
        Source class of each perturbed sample (its real class); goes to ``class``.
    new_pred
        Target model's prediction for each perturbed sample.
    real_pred
        Target model's prediction for each real sample.
    new_before
        (m, 2) coordinates of the perturbed samples *before* perturbation (x placed on the
        same map), or None; adds columns ``x_before`` and ``y_before`` (NaN for real rows).

    Returns
    -------
    DataFrame with columns ``x``, ``y``, ``sample``, ``class``, ``predicted``, ``kind``
    (``"real"`` or ``"perturbed"``), and ``x_before``, ``y_before`` when ``new_before`` is
    given; real rows first, in the map's order.
    """
    n = len(ref)
    real = pd.DataFrame(
        {
            "x": ref.coords[:, 0],
            "y": ref.coords[:, 1],
            "sample": list(ref.samples),
            "class": list(ref.labels),
            "predicted": _column(real_pred, n, "real_pred"),
            "kind": "real",
        }
    )
    if new_coords is None:
        return real
    new_coords = np.asarray(new_coords, dtype=np.float64).reshape(-1, 2)
    m = len(new_coords)
    names = (
        [f"perturbed-{i}" for i in range(m)]
        if new_samples is None
        else _column(new_samples, m, "new_samples")
    )
    new = pd.DataFrame(
        {
            "x": new_coords[:, 0],
            "y": new_coords[:, 1],
            "sample": names,
            "class": _column(new_source, m, "new_source"),
            "predicted": _column(new_pred, m, "new_pred"),
            "kind": "perturbed",
        }
    )
    if new_before is not None:
        before = np.asarray(new_before, dtype=np.float64).reshape(-1, 2)
        if len(before) != m:
            raise ValueError(f"new_before: {len(before)} positions for {m} points")
        new["x_before"], new["y_before"] = before[:, 0], before[:, 1]
        real["x_before"] = real["y_before"] = np.nan
    return pd.concat([real, new], ignore_index=True)


# ----------------------------------------------------------------------------- a bundle's map


def class_map(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    label_key: str | None = None,
    classes=None,
    max_per_class: int | None = MAP_MAX_PER_CLASS,
    seed: int = 0,
    Xs: np.ndarray | None = None,
    source: str = "data",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[ReferenceMap, np.ndarray]:
    """The reference map of ``adata``'s real samples, in the bundle's scaled space.

    Parameters
    ----------
    adata
        Real samples with their class in ``obs[label_key]``.
    bundle
        Its genes and scaler place the samples; its target class is always on the map.
    label_key
        Column of ``obs`` with the classes (default: the bundle's).
    classes
        Classes besides the target (default: the most frequent, :data:`MAP_MAX_CLASSES` in all).
    max_per_class
        At most this many samples per class (seeded subsample).
    seed
        Seed of the subsample and of the t-SNE fit.
    Xs
        ``bundle.scale(adata)`` when already computed (the dashboard caches it).
    source
        How error messages name the data.
    cache_dir
        A folder of fitted maps (e.g. :func:`map_cache_dir`): a map fit before on the same
        values, samples, classes and settings is read from there instead of fit again, and
        a new fit is written there (:func:`save_reference_map`; never pickled).

    Returns
    -------
    ``(map, rows)``, as :func:`fit_class_map`.
    """
    key = label_key or bundle.label_key
    if key not in adata.obs:
        raise UserError(
            f"{source}: no label column {key!r} in obs; the map colours real samples by class (give the label column)"
        )
    labels = adata.obs[key].astype(str).to_numpy()
    samples = np.asarray(adata.obs_names).astype(str)
    rows = select_map_samples(
        labels,
        classes=classes,
        max_classes=None if classes else MAP_MAX_CLASSES,
        max_per_class=max_per_class,
        target=bundle.target,
        seed=seed,
    )
    # only the map's own samples are read and scaled (never the whole GEM)
    X = bundle.scale(adata, rows=rows, source=source) if Xs is None else np.asarray(Xs)[rows]
    path = None
    if cache_dir is not None:
        name = map_cache_key(X, labels[rows], samples[rows], seed=seed)
        path = Path(cache_dir) / f"{name}.npz"
        cached = _read_cached_map(path, samples[rows])
        if cached is not None:
            return cached, rows
    ref = fit_reference_map(X, samples=samples[rows], labels=labels[rows], seed=seed)
    if path is not None:
        try:
            save_reference_map(ref, path, rows=rows, Z=ref.project(X))
        except OSError as err:  # a read-only cache folder costs a refit next time, nothing more
            logger.warning("could not keep the t-SNE map in %s: %s", path.parent, err)
    return ref, rows


# ----------------------------------------------------------------------------- maps on disk

MAP_CACHE_VERSION = 1


def map_cache_dir() -> Path:
    """Where fitted maps are kept: ``$TSPG_CACHE_DIR/maps``, or ``~/.cache/tspg/maps``."""
    root = os.environ.get("TSPG_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "tspg") / "maps"


def map_cache_key(Xs, labels, samples, **options) -> str:
    """A hash naming a fitted map: the values of its samples (in a bundle's scaled space, so
    the data, the gene set and the scaler), the samples and their classes, the map's
    options (its seed), the t-SNE settings and the cache format."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(Xs), dtype=np.float32).tobytes())
    h.update(repr(np.asarray(Xs).shape).encode())
    for part in (labels, samples):
        h.update("\n".join(map(str, part)).encode() + b"\0")
    fit = inspect.signature(fit_reference_map).parameters  # the settings class_map fits with
    tsne = {k: p.default for k, p in fit.items() if p.default is not inspect.Parameter.empty}
    tsne.update(version=MAP_CACHE_VERSION, openTSNE=_opentsne_version())
    opts = {
        k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in options.items()
    }
    h.update(json.dumps({"options": opts, "tsne": tsne}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _opentsne_version() -> str:
    from importlib.metadata import version

    return version("openTSNE")


def save_reference_map(ref: ReferenceMap, path, *, rows=None, Z=None) -> Path:
    """Write a map as one ``.npz`` of plain arrays (no pickle) through a temporary file.

    ``Z``: the reference samples in the space t-SNE saw (``ref.project`` of their data),
    needed to place new points on the map once it is read back; ``rows``: the samples' rows
    in the data (kept with the map).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": MAP_CACHE_VERSION, "seed": int(ref.seed), "params": ref.params}
    arrays = {
        "coords": np.asarray(ref.coords, dtype=np.float64),
        "samples": np.asarray(ref.samples, dtype=str),
        "labels": np.asarray(ref.labels, dtype=str),
        "rows": np.asarray([] if rows is None else rows, dtype=np.int64),
        "Z": np.asarray([] if Z is None else Z, dtype=np.float64),
        "pca_mean": np.asarray([] if ref.pca is None else ref.pca.mean, dtype=np.float64),
        "pca_components": np.asarray(
            [] if ref.pca is None else ref.pca.components, dtype=np.float64
        ),
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_reference_map(path) -> tuple[ReferenceMap, np.ndarray]:
    """Read a map written by :func:`save_reference_map` (``allow_pickle=False``); its t-SNE
    embedding is rebuilt from the stored reference data, so :func:`place` works on it
    exactly as on the map just fit. Returns ``(map, rows)``; ValueError when the file is not
    such a map."""
    with np.load(path, allow_pickle=False) as npz:
        try:
            meta = json.loads(npz["meta"].tobytes().decode())
            coords, Z = npz["coords"], npz["Z"]
            samples, labels = npz["samples"].tolist(), npz["labels"].tolist()
            rows, mean, comps = npz["rows"], npz["pca_mean"], npz["pca_components"]
        except KeyError as err:
            raise ValueError(f"{path}: not a saved t-SNE map ({err} missing)") from None
    if meta.get("version") != MAP_CACHE_VERSION:
        raise ValueError(f"{path}: a map of format {meta.get('version')}, not {MAP_CACHE_VERSION}")
    if Z.ndim != 2 or len(Z) != len(coords) or coords.shape[1:] != (2,):
        raise ValueError(f"{path}: the stored map's arrays do not agree")
    params, seed = meta["params"], int(meta["seed"])
    pca = PCAProjection(mean, comps) if comps.size else None
    emb = _restore_embedding(Z, coords, params, seed)
    return ReferenceMap(coords.copy(), samples, labels, seed, params, pca, emb), rows


@contextmanager
def _quiet(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _restore_embedding(Z: np.ndarray, coords: np.ndarray, params: dict, seed: int):
    """The openTSNE embedding of a fitted map from its reference data ``Z`` and ``coords``:
    the affinities are computed as the fit computed them (same neighbour search, perplexity
    and seed), the positions are the fitted ones."""
    tsne, _ = _tsne(
        seed,
        params["perplexity"],
        params.get("n_jobs", DEFAULT_N_JOBS),
        params["n_iter"],
        len(Z),
        params["negative_gradient_method"],
    )
    with _quiet("openTSNE"):  # it warns that given positions are not a fresh initialisation
        return tsne.prepare_initial(np.ascontiguousarray(Z), initialization=coords)


def _read_cached_map(path: Path, samples) -> ReferenceMap | None:
    """A cached map of ``samples`` (in this order), or None when there is none or it cannot
    be used (logged; the map is then fit again)."""
    if not path.is_file():
        return None
    try:
        ref, _ = load_reference_map(path)
        if ref.samples != [str(s) for s in samples]:
            raise ValueError("its samples are not the data's")
    except (OSError, ValueError, KeyError) as err:
        logger.warning("ignoring the cached t-SNE map %s: %s", path, err)
        return None
    logger.info("t-SNE map read from %s", path)
    return ref


def perturbation_map_frame(
    ref: ReferenceMap, pert: Perturbation, *, coords=None, real_pred=None, before=None
) -> pd.DataFrame:
    """:func:`map_frame` of a reference map with a perturbation's x_adv on it.

    ``coords``: the perturbed samples' coordinates (default: :func:`place` of x_adv);
    ``real_pred``: the target model's class for each real sample of the map;
    ``before``: the same samples' coordinates before perturbation (:func:`place_moves`),
    for the map's before -> after lines.
    """
    coords = place(ref, pert.x_adv) if coords is None else coords
    return map_frame(
        ref,
        coords,
        new_samples=pert.samples,
        new_source=pert.labels,
        new_pred=pert.pred_after,
        real_pred=real_pred,
        new_before=before,
    )


def place_moves(ref: ReferenceMap, pert: Perturbation) -> tuple[np.ndarray, np.ndarray]:
    """Each perturbed sample's place on the fixed map before (x) and after (x_adv): one
    :func:`place` of both (a placed point moves against the reference only, so placing them
    together gives what placing each alone does).

    Returns
    -------
    ``(before, after)``: two (m, 2) arrays.
    """
    xy = place(ref, np.vstack([pert.x, pert.x_adv]))
    m = len(pert)
    return xy[:m].copy(), xy[m:].copy()


@dataclass
class PerturbationMap:
    """:func:`perturbation_map`'s result: the tidy frame and what it was made of."""

    frame: pd.DataFrame  # x, y, sample, class, predicted, kind
    ref: ReferenceMap
    rows: np.ndarray  # rows of the real samples in the data
    perturbation: Perturbation
    samples: SampleChoice


def perturbation_map(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    samples=None,
    label_key: str | None = None,
    classes=None,
    max_per_class: int | None = MAP_MAX_PER_CLASS,
    max_placed: int | None = None,
    seed: int = 0,
    source: str = "data",
) -> PerturbationMap:
    """The paper's map: real samples of some classes, and perturbed samples placed on it.

    The samples perturbed are ``samples``, or by default the held-out non-target samples
    (:meth:`tspg.bundle.Bundle.source_samples`; at most ``max_placed`` of them, default
    :data:`MAP_MAX_PLACED`, a seeded subsample, unless chosen by id); the map is :func:`class_map`; each real
    sample carries the target model's class (``predicted``), each perturbed one its class
    after perturbation.
    """
    key = label_key or bundle.label_key
    ref, rows = class_map(
        adata,
        bundle,
        label_key=key,
        classes=classes,
        max_per_class=max_per_class,
        seed=seed,
        source=source,
    )
    choice = bundle.source_samples(
        adata,
        samples=samples,
        label_key=key,
        source=source,
        max_samples=MAP_MAX_PLACED if max_placed is None else max_placed,
        seed=seed,
    )
    pert = perturb_adata(adata[choice.ids], bundle, label_key=key, source=source)
    real_pred = bundle.predict(bundle.scale(adata, rows=rows, source=source))
    frame = perturbation_map_frame(ref, pert, real_pred=real_pred)
    return PerturbationMap(frame, ref, rows, pert, choice)
