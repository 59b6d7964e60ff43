"""Cached loaders of the dashboard: bundles, data, perturbations, maps, baselines, enrichment.

Bundles, datasets, the scaled expression matrix and t-SNE maps are ``st.cache_resource``
(loaded once, read-only, never copied); perturbations, placements and other results are
``st.cache_data``. Both are keyed by plain strings (bundle path and modification time,
data key, sample ids); the objects themselves are ``_``-prefixed arguments. The
``current_*`` functions read the sidebar's and the Perturb page's choices from session
state and call the pure functions of :mod:`tspg.app.selection`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
import torch

from .. import baselines as _baselines
from .. import embedding, enrichment, sweep, verdict
from ..bundle import list_bundles, load_bundle, models_dir, resolve_bundle
from ..config import TrainConfig
from ..data import MAX_MISSING_SHARE, GeneMatch, read_gem
from ..datasets import demo
from ..errors import UserError
from ..perturbation import perturb, perturb_adata
from . import state as S
from .selection import Data, Selection, default_classes, select_samples
from .views import cache_key, demo_epochs, is_demo, own_dataset_hint, scaler_key

__all__ = [
    "Waiting",
    "baselines",
    "bundle_entries",
    "bundle_key",
    "current_bundle",
    "current_data",
    "current_selection",
    "demo_adata",
    "demo_config",
    "enrichment_table",
    "gene_match",
    "get_bundle",
    "joint",
    "map_key",
    "models_root",
    "offline_gmt_files",
    "own_data",
    "perturbation",
    "perturbed_h5ad",
    "placed",
    "read_upload",
    "readable_names",
    "real_predictions",
    "reference_map",
    "sample_pool",
    "scaled_expression",
    "selection_verdict",
    "sweep_results",
    "target_mean",
    "usable_match",
]

logger = logging.getLogger("tspg.app")


# One torch thread for the dashboard's forward passes (a selection is tens to thousands of
# samples): measured on a busy 2-core machine, 100 samples took 0.04 s with one thread and
# 0.2-1 s with two (OpenMP threads waiting for a core). $TSPG_APP_THREADS sets another number.
def _app_threads() -> int:
    raw = os.environ.get("TSPG_APP_THREADS") or "1"
    try:
        return max(1, int(raw))
    except ValueError:
        logger.warning("TSPG_APP_THREADS=%r is not a whole number: one thread", raw)
        return 1


torch.set_num_threads(_app_threads())


class Waiting(UserError):
    """Not an error: the page waits for the user (e.g. to upload a file)."""


# ----------------------------------------------------------------------------- bundles


def models_root() -> Path:
    """The models folder (``$TSPG_MODELS_DIR`` or ``./models``), absolute."""
    return models_dir().resolve()


def bundle_entries():
    """Every folder of the models folder, readable or not (not cached: cheap, and must see new bundles)."""
    return list_bundles(models_root())


def readable_names(entries=None) -> list[str]:
    return [e.name for e in (bundle_entries() if entries is None else entries) if e.error is None]


def _mtime(path: Path) -> float:
    try:
        return (path / "manifest.json").stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner="Loading the bundle…", max_entries=16)
def _load_bundle(path: str, mtime: float):
    return load_bundle(path)


def get_bundle(name: str):
    """Load bundle ``name`` from the models folder (cached; reloaded when its manifest changes)."""
    path = resolve_bundle(name, models_root())
    return _load_bundle(str(path), _mtime(path))


def current_bundle():
    """The bundle chosen in the sidebar, or None when the models folder has none."""
    name = st.session_state.get(S.BUNDLE)
    return get_bundle(name) if name else None


def bundle_key(bundle) -> str:
    """A string naming a bundle's exact state, for cache keys."""
    return f"{bundle.path}@{_mtime(Path(bundle.path)) if bundle.path else 0}"


def demo_config() -> TrainConfig:
    """The demo run's config: the default recipe, with generator epochs from the session or
    ``$TSPG_DEMO_EPOCHS`` (and target-model epochs no more than those)."""
    epochs = demo_epochs(st.session_state.get(S.DEMO_EPOCHS) or os.environ.get("TSPG_DEMO_EPOCHS"))
    if epochs is None:
        return TrainConfig.for_recipe("tspg+")
    base = TrainConfig.for_recipe("tspg+")
    return TrainConfig.for_recipe(
        "tspg+", epochs=epochs, target_epochs=min(base.target_epochs, epochs)
    )


# ----------------------------------------------------------------------------- data


@st.cache_resource(show_spinner="Loading the demo data…")
def demo_adata():
    return demo()


def read_upload(name: str, data: bytes):
    """An uploaded file -> AnnData through ``tspg.data.read_gem`` (only .h5ad, at most ``MAX_UPLOAD_MB``)."""
    if not name.lower().endswith(".h5ad"):
        raise UserError(
            f"{name}: upload a .h5ad file (AnnData); other formats can be converted with `tspg import`"
        )
    if len(data) > S.MAX_UPLOAD_MB * 2**20:
        raise UserError(
            f"{name}: {len(data) / 2**20:.0f} MB is over the {S.MAX_UPLOAD_MB} MB limit"
        )
    if not data:
        raise UserError(f"{name}: the file is empty")
    with tempfile.TemporaryDirectory(prefix="tspg-upload-") as tmp:
        path = Path(tmp) / "upload.h5ad"
        path.write_bytes(data)
        try:
            adata = read_gem(path)
        except UserError as err:  # name the user's file, not the server's temporary copy
            raise UserError(str(err).replace(str(path), name)) from None
    adata.uns["tspg_import"]["source"] = name
    return adata


@st.cache_resource(show_spinner="Reading the uploaded file…", max_entries=2)
def _upload_adata(file_id: str, name: str, _upload):
    return read_upload(name, _upload.getvalue())  # the bytes are copied once, not on every rerun


@st.cache_data(show_spinner="Checking the data against the bundle's dataset…", max_entries=16)
def _is_own(bkey: str, dkey: str, _bundle, _adata) -> bool | None:
    return _bundle.is_own_dataset(_adata)


def _demo_data(bundle, label: str) -> Data:
    return Data(demo_adata(), "demo", label, own=is_demo(bundle.manifest))


def current_data(bundle) -> Data:
    """The data chosen in the sidebar, for ``bundle``; UserError with the reason if unusable.

    "The bundle's own dataset" is the demo for a demo bundle; any other bundle's dataset is
    not stored with it, so it is an upload whose values, genes and samples match the
    fingerprint in the manifest (:meth:`tspg.bundle.Bundle.is_own_dataset`). Any upload that
    matches counts as the bundle's own data (its split applies), whichever choice it was
    uploaded under.
    """
    source = st.session_state.get(S.DATA, "bundle")
    if source == "demo":
        return _demo_data(bundle, "demo (pbmc68k_reduced)")
    if source == "bundle" and is_demo(bundle.manifest):
        return _demo_data(bundle, "pbmc68k_reduced (the bundle's dataset)")
    up = st.session_state.get(S.UPLOAD)
    if up is None:
        raise Waiting(
            own_dataset_hint(bundle.manifest)
            if source == "bundle"
            else "Choose a .h5ad file to perturb in the sidebar."
        )
    adata = _upload_adata(up.file_id, up.name, up)
    key = f"upload:{up.file_id}"
    own = bool(_is_own(bundle_key(bundle), key, bundle, adata))
    data = Data(adata, key, f"upload {up.name}" + (" (the bundle's dataset)" if own else ""), own)
    if source == "bundle" and not own:
        usable_match(bundle, data)
        name = bundle.manifest["dataset"]["name"]
        raise UserError(
            f"{up.name} is not {name}, the dataset {bundle.name!r} was trained on (its values, genes or samples differ); "
            "choose 'Upload a .h5ad file' to perturb it as other data"
        )
    return data


def own_data(bundle, data: Data) -> Data:
    """The bundle's own dataset: ``data`` when it is, the demo for a demo bundle, else UserError."""
    if data.own:
        return data
    if is_demo(bundle.manifest):
        return _demo_data(bundle, "pbmc68k_reduced (the bundle's dataset)")
    raise UserError(own_dataset_hint(bundle.manifest))


@st.cache_resource(show_spinner="Matching the data's genes to the bundle's…", max_entries=16)
def _gene_match(bkey: str, dkey: str, source: str, _bundle, _adata) -> GeneMatch:
    return _bundle.match_genes(_adata, max_missing=1.0, source=source)


def gene_match(bundle, data: Data) -> GeneMatch:
    """How the bundle's genes were found in ``data`` (:meth:`tspg.bundle.Bundle.match_genes`:
    exactly, ignoring case, or by a ``var`` column of symbols), however many are missing;
    UserError when none is there. Whether the data can be used: :func:`usable_match`."""
    return _gene_match(bundle_key(bundle), data.key, data.label, bundle, data.adata)


def usable_match(bundle, data: Data) -> GeneMatch:
    """:func:`gene_match`, or UserError (one line, with the number missing) when more than
    :data:`tspg.data.MAX_MISSING_SHARE` of the bundle's genes are missing (fewer are filled)."""
    match = gene_match(bundle, data)
    if match.missing_share > MAX_MISSING_SHARE:
        raise UserError(
            f"{data.label}: {match.n_missing} of the model's {match.n_genes} genes are missing "
            f"({100 * match.missing_share:.0f}%; at most {100 * MAX_MISSING_SHARE:g}% can be filled in): "
            f"{', '.join(match.missing[:5])}{' …' if match.n_missing > 5 else ''}"
        )
    return match


# ----------------------------------------------------------------------------- selection


def sample_pool(bundle, data: Data) -> list[str]:
    """Samples to choose from: the held-out split when asked and the data are the bundle's own."""
    heldout = data.own and st.session_state.get(S.SEL_HELDOUT, True)
    return bundle.sample_pool(data.adata, heldout=heldout)


def current_selection(bundle, data: Data) -> Selection:
    """The samples picked on the Perturb page (its defaults when it was never opened)."""
    ss = st.session_state
    labels = data.labels(bundle.label_key)
    names = list(map(str, data.adata.obs_names))
    return select_samples(
        sample_pool(bundle, data),
        None if labels is None else dict(zip(names, labels, strict=True)),
        target=bundle.target,
        mode=ss.get(S.SEL_MODE, "random"),
        classes=list(
            default_classes(bundle.classes, labels, bundle.target)
            if ss.get(S.SEL_CLASSES) is None  # never picked (a cleared pick stays empty)
            else ss[S.SEL_CLASSES]
        ),
        ids=list(ss.get(S.SEL_IDS) or []),
        known=names,
        n=int(ss.get(S.SEL_N, 20)),
        seed=int(ss.get(S.SEL_SEED, 0)),
        leave_out_target=bool(ss.get(S.SEL_NONTARGET, True)),
        heldout=bool(data.own and ss.get(S.SEL_HELDOUT, True)),
        source=data.label,
    )


# ----------------------------------------------------------------------------- perturbation


@st.cache_data(show_spinner="Perturbing…", max_entries=32)
def _perturbation(bkey: str, dkey: str, samples: tuple[str, ...], _bundle, _adata, source: str):
    return perturb_adata(_adata[list(samples)], _bundle, source=source)


def perturbation(bundle, data: Data, samples):
    """``perturb_adata`` of the chosen samples (cached by bundle, data and sample ids)."""
    if not len(samples):
        raise UserError("no samples selected: pick at least one on the Perturb page")
    return _perturbation(
        bundle_key(bundle), data.key, tuple(samples), bundle, data.adata, data.label
    )


@st.cache_data(show_spinner=False, max_entries=8)
def _perturbed_h5ad(bkey: str, dkey: str, samples: tuple[str, ...], _bundle, _adata) -> bytes:
    out = perturb(_adata[list(samples)], _bundle, copy=True)
    with tempfile.TemporaryDirectory(prefix="tspg-h5ad-") as tmp:
        path = Path(tmp) / "perturbed.h5ad"
        out.write_h5ad(path)
        return path.read_bytes()


def perturbed_h5ad(bundle, data: Data, samples) -> Callable[[], bytes]:
    """A callable (for a deferred download) giving ``perturb(..., copy=True)`` as .h5ad bytes."""
    bkey, dkey, samples = bundle_key(bundle), data.key, tuple(samples)
    return lambda: _perturbed_h5ad(bkey, dkey, samples, bundle, data.adata)


@st.cache_resource(show_spinner="Scaling the data…", max_entries=4)
def _scaled(bkey: str, dkey: str, _bundle, _adata, _match) -> np.ndarray:
    return _bundle.scale(_adata, match=_match)


def scaled_expression(bundle, data: Data) -> np.ndarray:
    """The whole dataset in the bundle's space (:meth:`tspg.bundle.Bundle.scale`, its genes
    found by :func:`usable_match`, missing ones filled; read-only: a resource, so a large
    matrix is not copied on every rerun)."""
    return _scaled(bundle_key(bundle), data.key, bundle, data.adata, usable_match(bundle, data))


@st.cache_resource(show_spinner=False, max_entries=4)
def _real_pred(bkey: str, dkey: str, _bundle, _data) -> np.ndarray:
    return _bundle.predict(scaled_expression(_bundle, _data))


def real_predictions(bundle, data: Data) -> np.ndarray:
    """The target model's class for every sample of the data (unperturbed)."""
    return _real_pred(bundle_key(bundle), data.key, bundle, data)


@st.cache_data(show_spinner=False, max_entries=8)
def _target_mean(bkey: str, dkey: str, _bundle, _adata) -> np.ndarray | None:
    return _baselines.training_target_mean(_adata, _bundle)


def target_mean(bundle, data: Data) -> np.ndarray | None:
    """The target class's mean (scaled) over the bundle's training split: stored in the bundle,
    or (older bundles) computed from its own dataset; None when neither is available."""
    if bundle.target_mean is not None:
        return bundle.target_mean
    try:
        own = own_data(bundle, data)
        return _target_mean(bundle_key(bundle), own.key, bundle, own.adata)
    except UserError as err:
        logger.info("no target mean for %s: %s", bundle.name, err)
        return None


@st.cache_data(show_spinner="Grading the selection…", max_entries=32)
def _selection_verdict(bkey: str, dkey: str, samples: tuple[str, ...], _bundle, _pert) -> dict:
    return verdict.selection_verdict(_bundle, _pert)


def selection_verdict(bundle, data: Data, pert) -> dict:
    """:func:`tspg.verdict.selection_verdict` of a perturbed selection: the bundle's stored
    checks beside this selection's (moved, data fit)."""
    return _selection_verdict(bundle_key(bundle), data.key, tuple(pert.samples), bundle, pert)


# ----------------------------------------------------------------------------- t-SNE map


@st.cache_resource(
    show_spinner="The t-SNE reference map (fit once per dataset, gene set, classes and seed, then kept on disk)…",
    max_entries=8,
)
def _reference_map(dkey: str, skey: str, classes: tuple[str, ...], seed: int, _bundle, _data):
    Xs = scaled_expression(_bundle, _data)
    return embedding.class_map(
        _data.adata,
        _bundle,
        classes=list(classes),
        seed=seed,
        Xs=Xs,
        source=_data.label,
        cache_dir=embedding.map_cache_dir(),
    )


def reference_map(bundle, data: Data, classes, seed: int):
    """(ReferenceMap, row indices of its samples); cached per dataset, gene set and scaling,
    classes, seed (:func:`tspg.embedding.class_map`), in memory and on disk
    (:func:`tspg.embedding.map_cache_dir`: a restart reads the map instead of fitting it)."""
    return _reference_map(data.key, scaler_key(bundle), tuple(classes), int(seed), bundle, data)


def map_key(bundle, data: Data, classes, seed: int) -> str:
    return cache_key(data.key, scaler_key(bundle), tuple(classes), int(seed))


@st.cache_resource(max_entries=8)
def _before_places(mkey: str, bkey: str) -> dict[str, np.ndarray]:
    """Samples' places before perturbation on one map, by sample id (they do not depend on
    the selection: each is placed once, whichever selections it is in)."""
    return {}


@st.cache_data(show_spinner="Placing the selected samples on the map…", max_entries=32)
def _placed_after(mkey: str, bkey: str, samples: tuple[str, ...], _ref, _x_adv) -> np.ndarray:
    return embedding.place(_ref, _x_adv)


def placed(ref, mkey: str, bundle, pert) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of the selected samples before and after perturbation, both placed
    on the fixed reference map (as :func:`tspg.embedding.place_moves`: a placed point moves
    against the map only, so each sample's place before is computed once and kept)."""
    bkey = bundle_key(bundle)
    store = _before_places(mkey, bkey)
    missing = [i for i, s in enumerate(pert.samples) if s not in store]
    if missing:
        xy = embedding.place(ref, pert.x[missing])
        store.update({pert.samples[i]: xy[j] for j, i in enumerate(missing)})
    before = np.array([store[s] for s in pert.samples]).reshape(-1, 2)
    after = _placed_after(mkey, bkey, tuple(pert.samples), ref, pert.x_adv)
    return before, after


@st.cache_data(show_spinner="Recomputing the joint t-SNE map…", max_entries=4)
def _joint(mkey: str, bkey: str, samples: tuple[str, ...], seed: int, _X_real, _x_adv):
    return embedding.fit_joint_map(_X_real, _x_adv, seed=seed)


def joint(ref_idx, mkey: str, bundle, data: Data, pert, seed: int):
    """(real coords, perturbed coords) of one t-SNE fit on both (the "Recompute joint map" button)."""
    Xs = scaled_expression(bundle, data)
    return _joint(mkey, bundle_key(bundle), tuple(pert.samples), int(seed), Xs[ref_idx], pert.x_adv)


# ----------------------------------------------------------------------------- sweeps


def _results_stamp(folder: Path) -> float:
    stamps = []
    for name in (sweep.RESULTS_CSV, sweep.RESULTS_PARQUET):
        try:
            stamps.append((folder / name).stat().st_mtime)
        except OSError:
            pass
    return max(stamps, default=0.0)


@st.cache_data(show_spinner="Reading the sweep's results…", max_entries=4)
def _sweep_results(folder: str, stamp: float) -> pd.DataFrame:
    return sweep.read_results(folder)


def sweep_results() -> pd.DataFrame:
    """The sweep results table in the models folder (:func:`tspg.sweep.read_results`; read
    again when it changes); FileNotFoundError when there is none."""
    root = models_root()
    return _sweep_results(str(root), _results_stamp(root))


# ----------------------------------------------------------------------------- genes and enrichment


def offline_gmt_files(bundle) -> list[str]:
    """The offline backend's GMT files for ``bundle`` (``tspg.enrichment.offline_gmt_files``: the
    bundled blood-cell markers, the bundle's gene-set file if it is still there, every GMT in
    ``$TSPG_GMT_DIR``)."""
    return [str(p) for p in enrichment.offline_gmt_files(bundle)]


# A fallback (Enrichr unreachable) is kept for a few minutes only, so the online result
# shows once Enrichr answers again; online results stay in tspg.enrichment's disk cache.
@st.cache_data(show_spinner="Running the enrichment…", max_entries=32, ttl=300)
def enrichment_table(
    up: tuple[str, ...],
    down: tuple[str, ...],
    background: tuple[str, ...],
    libraries: tuple[str, ...],
    backend: str,
    gmt_files: tuple[str, ...],
    threshold: float,
) -> tuple[pd.DataFrame, dict]:
    """``enrich_directions`` against exactly ``gmt_files`` offline: the stacked table and its
    attrs (messages, backend, from_cache)."""
    df = enrichment.enrich_directions(
        list(up) or None,
        list(down) or None,
        background=list(background),
        libraries=list(libraries),
        backend=backend,
        gmt_files=list(gmt_files),
        threshold=threshold,
    )
    return df, dict(df.attrs)


@st.cache_resource(
    show_spinner="Fitting the mean-shift and differential-expression baselines…", max_entries=4
)
def _fit_baselines(bkey: str, dkey: str, _bundle, _adata):
    return _baselines.fit_baselines(_adata, _bundle)


def baselines(bundle, data: Data):
    """Mean shifts and differential expression on the bundle's training split (its own dataset;
    UserError when it is not available)."""
    own = own_data(bundle, data)
    return _fit_baselines(bundle_key(bundle), own.key, bundle, own.adata)
