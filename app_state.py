"""Dashboard glue: session-state keys, cached loaders and small rendering helpers.

The only module besides ``streamlit_app.py`` and ``pages/`` that imports streamlit. Pages
read widgets, call ``tspg`` through the loaders here, and render; no science lives here.

Caching: bundles, datasets, the scaled expression matrix and t-SNE maps are
``st.cache_resource`` (loaded once, read-only, never copied); perturbations, placements and
other results are ``st.cache_data``. Both are keyed by plain strings (bundle path and
modification time, data key, sample ids); the objects themselves are ``_``-prefixed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

logger = logging.getLogger("tspg.app")

# ----------------------------------------------------------------------------- session keys

BUNDLE = "bundle"  # name of the chosen bundle (sidebar)
DATA = "data_source"  # "bundle", "demo" or "upload" (sidebar)
UPLOAD = "upload"  # the uploaded .h5ad (sidebar)
DEMO_EPOCHS = "demo_epochs"  # generator epochs of the Home page's demo training (tests set it)

SEL_MODE = "sel_mode"  # "class", "id" or "random"
SEL_CLASSES = "sel_classes"
SEL_IDS = "sel_ids"
SEL_N = "sel_n"
SEL_SEED = "sel_seed"
SEL_HELDOUT = "sel_heldout"  # held-out samples only (bundle's own dataset)
SEL_NONTARGET = "sel_nontarget"  # leave the target class out of random picks
HEAT_VIEW = "heat_view"  # "mean" or "sample"
HEAT_SAMPLE = "heat_sample"
TOP_K = "top_k"
MAP_CLASSES = "map_classes"  # the map's classes besides the target (Map page)
MAP_AUTO = "map_classes_auto"  # the default last put in MAP_CLASSES: until changed, it follows the selection
MAP_SEED = "map_seed"
MAP_JOINT = "map_joint_for"  # (map key, samples) the joint map was asked for
GENE = "gene"
ENR_WHAT = "enr_what"  # "consensus" or a sample id
ENR_DIRECTION = "enr_direction"
ENR_LIBRARIES = "enr_libraries"
ENR_BACKEND = "enr_backend"
ENR_THRESHOLD = "enr_threshold"
ENR_GMTS = "enr_gmts"  # the offline GMT files to use (paths)
ENR_GMTS_OFFERED = (
    "enr_gmts_offered"  # every GMT file offered so far: a file offered anew starts selected
)

# Page widgets whose value must survive a change of page (Streamlit forgets the value of a
# widget that is not drawn in a run; re-assigning it keeps it).
PERSIST = (
    SEL_MODE,
    SEL_CLASSES,
    SEL_IDS,
    SEL_N,
    SEL_SEED,
    SEL_HELDOUT,
    SEL_NONTARGET,
    HEAT_VIEW,
    HEAT_SAMPLE,
    TOP_K,
    MAP_CLASSES,
    MAP_SEED,
    GENE,
    ENR_WHAT,
    ENR_DIRECTION,
    ENR_LIBRARIES,
    ENR_BACKEND,
    ENR_THRESHOLD,
    ENR_GMTS,
)
DEFAULTS = {
    DATA: "bundle",
    SEL_MODE: "random",
    SEL_N: 20,
    SEL_SEED: 0,
    SEL_HELDOUT: True,
    SEL_NONTARGET: True,
    HEAT_VIEW: "mean",
    TOP_K: 20,
    MAP_SEED: 0,
    ENR_WHAT: "consensus",
    ENR_DIRECTION: "both",
    ENR_BACKEND: "auto",
    ENR_THRESHOLD: 1e-4,
}
DATA_CHOICES = {
    "bundle": "The bundle's own dataset",
    "demo": "Demo: pbmc68k_reduced",
    "upload": "Upload a .h5ad file",
}
SELECTION_MODES = {"random": "N at random", "class": "By source class", "id": "By sample id"}
MAX_UPLOAD_MB = 200
ENRICHMENT_THRESHOLDS = (
    1e-6,
    1e-5,
    1e-4,
    1e-3,
    0.01,
    0.05,
    0.1,
)  # q below which a term is "significant"; 1e-4 as in the paper


def init_state() -> None:
    """Defaults for the shared keys, and keep page widgets' values across pages."""
    ss = st.session_state
    for key, value in DEFAULTS.items():
        ss.setdefault(key, value)
    for key in PERSIST:
        if key in ss:
            ss[key] = ss[key]


def ensure_router() -> None:
    """Call first in every page: run the page through ``streamlit_app.py``.

    With a ``pages/`` folder next to the main script, Streamlit starts in its legacy
    multipage mode until ``st.navigation`` has run once; a first run that asks for a page
    URL (and every AppTest run) then executes the page file alone, without the router's
    sidebar. Turn the legacy mode off and rerun through the router.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def page_start(title: str):
    """Every analysis page's start: the router, the title, the sidebar's bundle and data.

    Stops the page with a message when there is no bundle or the data cannot be used.
    """
    ensure_router()
    st.title(title)
    with guard("Loading the bundle failed"):
        bundle = current_bundle()
    if bundle is None:
        st.info("No trained generator yet: train the demo on the Home page.")
        st.stop()
    with guard("The chosen data cannot be used"):
        data = current_data(bundle)
        check_genes(bundle, data)
    return bundle, data


def page_perturbation(bundle, data):
    """The Perturb page's sample selection and its perturbation (stops the page when it is empty)."""
    with guard("Selecting samples failed"):
        sel = selection(bundle, data)
    if not sel.samples:
        st.warning("No samples selected: pick some on the Perturb page.")
        st.stop()
    with guard("Perturbation failed"):
        pert = perturbation(bundle, data, sel.samples)
    return sel, pert


def set_state(key: str, value) -> None:
    """A button's ``on_click``: record the click in session state (it survives any rerun)."""
    st.session_state[key] = value


# ----------------------------------------------------------------------------- errors


class Waiting(ValueError):
    """Not an error: the page waits for the user (e.g. to upload a file)."""


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Run a backend step; on failure show ``st.error`` with the reason and stop the page."""
    try:
        yield
    except Waiting as msg:
        st.info(str(msg))
        st.stop()
    except Exception as err:  # a backend error becomes a message, never a traceback
        logger.warning("%s: %s", what, err, exc_info=not isinstance(err, ValueError))
        st.error(f"{what}: {err}")
        st.stop()


# ----------------------------------------------------------------------------- bundles


def models_root() -> Path:
    """The models folder (``$TSPG_MODELS_DIR`` or ``./models``), absolute."""
    from tspg.bundle import models_dir

    return models_dir().resolve()


def bundle_entries():
    """Every folder of the models folder, readable or not (not cached: cheap, and must see new bundles)."""
    from tspg.bundle import list_bundles

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
    from tspg.bundle import load_bundle

    return load_bundle(path)


def get_bundle(name: str):
    """Load bundle ``name`` from the models folder (cached; reloaded when its manifest changes)."""
    from tspg.bundle import resolve_bundle

    path = resolve_bundle(name, models_root())
    return _load_bundle(str(path), _mtime(path))


def current_bundle():
    """The bundle chosen in the sidebar, or None when the models folder has none."""
    name = st.session_state.get(BUNDLE)
    return get_bundle(name) if name else None


def bundle_key(bundle) -> str:
    """A string naming a bundle's exact state, for cache keys."""
    return f"{bundle.path}@{_mtime(Path(bundle.path)) if bundle.path else 0}"


def compatible_bundles(bundle, entries=None) -> list[str]:
    """Readable bundles with the same genes, classes and label key as ``bundle`` (itself included)."""
    entries = bundle_entries() if entries is None else entries
    out = []
    for e in entries:
        m = e.manifest
        if (
            e.error is None
            and m["genes"] == bundle.genes
            and m["classes"] == bundle.classes
            and m["label_key"] == bundle.label_key
        ):
            out.append(e.name)
    return out or [bundle.name]


def demo_config(epochs: int | None = None):
    """The demo run's config: the default recipe, with generator epochs from the session or
    ``$TSPG_DEMO_EPOCHS`` (and target-model epochs no more than those)."""
    from tspg.config import TrainConfig

    raw = epochs or st.session_state.get(DEMO_EPOCHS) or os.environ.get("TSPG_DEMO_EPOCHS")
    if not raw:
        return TrainConfig.for_recipe("tspg+")
    try:
        epochs = int(raw)
    except ValueError:
        raise ValueError(f"TSPG_DEMO_EPOCHS={raw!r} is not a whole number of epochs") from None
    if epochs < 1:
        raise ValueError(f"TSPG_DEMO_EPOCHS={raw!r}: the demo needs at least 1 epoch")
    base = TrainConfig.for_recipe("tspg+")
    return TrainConfig.for_recipe(
        "tspg+", epochs=epochs, target_epochs=min(base.target_epochs, epochs)
    )


def train_command(manifest: dict) -> str:
    """The ``tspg-train`` command that rebuilds a bundle (options that differ from its recipe)."""
    from tspg.cli import config_options
    from tspg.config import TrainConfig
    from tspg.datasets import DEMO_NAME

    cfg = manifest["config"]
    base = TrainConfig.for_recipe(cfg.get("recipe", "tspg+")).to_dict()
    data = (
        "--demo"
        if manifest["dataset"]["name"] == DEMO_NAME
        else f"{manifest['dataset']['name']}.h5ad --label-key {shlex.quote(manifest['label_key'])}"
    )
    parts = [f"tspg-train {data}", f"--target {shlex.quote(manifest['target'])}"]
    if cfg.get("recipe", "tspg+") != "tspg+":
        parts.append(f"--recipe {cfg['recipe']}")
    for k, v in cfg.items():
        if k in config_options() and base.get(k) != v:  # the hyper-parameters tspg-train takes
            parts.append(f"--{k.replace('_', '-')} {v}")
    parts.append(f"--name {shlex.quote(manifest['name'])} --out {shlex.quote(str(models_root()))}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    """The data to perturb: an AnnData (read-only), a cache key and a label for the UI."""

    adata: object
    key: str
    label: str
    own: bool  # the bundle's own dataset: its split applies

    def labels(self, label_key: str) -> np.ndarray | None:
        obs = self.adata.obs
        return obs[label_key].astype(str).to_numpy() if label_key in obs else None


@st.cache_resource(show_spinner="Loading the demo data…")
def demo_adata():
    from tspg.datasets import demo

    return demo()


def read_upload(name: str, data: bytes):
    """An uploaded file -> AnnData through ``tspg.data.read_gem`` (only .h5ad, at most ``MAX_UPLOAD_MB``)."""
    from tspg.data import read_gem

    if not name.lower().endswith(".h5ad"):
        raise ValueError(
            f"{name}: upload a .h5ad file (AnnData); other formats can be converted with `tspg import`"
        )
    if len(data) > MAX_UPLOAD_MB * 2**20:
        raise ValueError(f"{name}: {len(data) / 2**20:.0f} MB is over the {MAX_UPLOAD_MB} MB limit")
    with tempfile.TemporaryDirectory(prefix="tspg-upload-") as tmp:
        path = Path(tmp) / "upload.h5ad"
        path.write_bytes(data)
        adata = read_gem(path)
    adata.uns["tspg_import"]["source"] = name
    return adata


@st.cache_resource(show_spinner="Reading the uploaded file…", max_entries=2)
def _upload_adata(file_id: str, name: str, _upload):
    return read_upload(name, _upload.getvalue())  # the bytes are copied once, not on every rerun


def current_data(bundle) -> Data:
    """The data chosen in the sidebar, for ``bundle``; ValueError with the reason if unusable.

    "The bundle's own dataset" is the demo for a demo bundle; any other bundle's dataset is
    not stored with it, so it is an upload whose values, genes and samples match the
    fingerprint in the manifest. Any upload that matches counts as the bundle's own data
    (its split applies), whichever choice it was uploaded under.
    """
    source = st.session_state.get(DATA, "bundle")
    if source == "demo":
        return Data(demo_adata(), "demo", "demo (pbmc68k_reduced)", own=is_demo(bundle.manifest))
    if source == "bundle" and is_demo(bundle.manifest):
        return Data(demo_adata(), "demo", "pbmc68k_reduced (the bundle's dataset)", own=True)
    up = st.session_state.get(UPLOAD)
    if up is None:
        raise Waiting(
            own_dataset_hint(bundle.manifest)
            if source == "bundle"
            else "Choose a .h5ad file to perturb in the sidebar."
        )
    adata = _upload_adata(up.file_id, up.name, up)
    key = f"upload:{up.file_id}"
    expected = bundle.manifest["dataset"].get("fingerprint")
    own = bool(expected) and _fingerprint(bundle_key(bundle), key, bundle, adata) == expected
    data = Data(
        adata, key, f"upload {up.name}" + (" (the bundle's dataset)" if own else ""), own=own
    )
    if source == "bundle" and not own:
        check_genes(bundle, data)
        name = bundle.manifest["dataset"]["name"]
        raise ValueError(
            f"{up.name} is not {name}, the dataset {bundle.name!r} was trained on (its values, genes or samples differ); "
            "choose 'Upload a .h5ad file' to perturb it as other data"
        )
    return data


def own_dataset_hint(manifest: dict) -> str:
    """Where to find a bundle's own dataset (for a bundle that is not the demo's)."""
    ds = manifest["dataset"]
    n = f" ({ds['n_samples']} samples)" if ds.get("n_samples") else ""
    return (
        f"{manifest['name']} was trained on {ds['name']}{n}, which is not stored with the bundle: upload that .h5ad file "
        "in the sidebar to perturb its held-out samples (it is recognised by its fingerprint), or choose other data."
    )


@st.cache_data(show_spinner="Checking the data against the bundle's dataset…", max_entries=16)
def _fingerprint(bkey: str, dkey: str, _bundle, _adata) -> str | None:
    """``tspg.data.fingerprint`` of the data's expression of the bundle's genes, as training
    computed it (None when some of the genes are missing)."""
    from tspg.data import align_genes, fingerprint

    if not pd.Index(_bundle.genes).isin(_adata.var_names).all():
        return None
    return fingerprint(align_genes(_adata, _bundle.genes), _bundle.genes, list(_adata.obs_names))


def own_data(bundle, data: Data) -> Data:
    """The bundle's own dataset: ``data`` when it is, the demo for a demo bundle, else ValueError."""
    if data.own:
        return data
    if is_demo(bundle.manifest):
        return Data(demo_adata(), "demo", "pbmc68k_reduced (the bundle's dataset)", own=True)
    raise ValueError(own_dataset_hint(bundle.manifest))


def is_demo(manifest: dict) -> bool:
    """Whether a bundle was trained on the demo data (the only dataset tspg can find itself)."""
    from tspg.datasets import DEMO_NAME

    return manifest["dataset"]["name"] == DEMO_NAME


def check_genes(bundle, data: Data) -> None:
    """ValueError naming the missing genes when ``data`` lacks some of the bundle's genes."""
    from tspg.data import align_genes

    missing = pd.Index(bundle.genes).difference(data.adata.var_names)
    if len(missing):
        align_genes(data.adata[:0], bundle.genes, source=data.label)  # raises with the names


# ----------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    samples: tuple[str, ...]
    description: str
    params: dict


def sample_pool(bundle, data: Data) -> list[str]:
    """Samples to choose from: the held-out split when asked and the data are the bundle's own."""
    names = list(map(str, data.adata.obs_names))
    if data.own and st.session_state.get(SEL_HELDOUT, True):
        test = set(bundle.split.get("test", []))
        held = [s for s in names if s in test]
        if held:
            return held
    return names


def selection(bundle, data: Data) -> Selection:
    """The samples picked on the Perturb page (defaults when it was never opened)."""
    ss = st.session_state
    mode = ss.get(SEL_MODE, "random")
    pool = sample_pool(bundle, data)
    labels = data.labels(bundle.label_key)
    label_of = (
        dict(zip(map(str, data.adata.obs_names), labels, strict=True)) if labels is not None else {}
    )
    if mode == "class":
        if labels is None:
            raise ValueError(
                f"{data.label}: no {bundle.label_key!r} column in obs, so samples cannot be picked by class; pick them by id or at random"
            )
        classes = list(ss.get(SEL_CLASSES) or default_classes(bundle, labels))
        picked = [s for s in pool if label_of[s] in set(classes)]
        params = {"mode": "class", "classes": classes}
        desc = f"{len(picked)} samples of {', '.join(classes)}"
    elif mode == "id":
        known = set(map(str, data.adata.obs_names))
        picked = [s for s in dict.fromkeys(ss.get(SEL_IDS) or []) if s in known]
        params = {"mode": "id", "ids": picked}
        desc = f"{len(picked)} samples by id"
    else:
        n, seed = int(ss.get(SEL_N, 20)), int(ss.get(SEL_SEED, 0))
        candidates = [
            s
            for s in pool
            if not (ss.get(SEL_NONTARGET, True) and label_of.get(s) == bundle.target)
        ]
        rng = np.random.default_rng(seed)
        idx = (
            np.sort(rng.choice(len(candidates), size=min(n, len(candidates)), replace=False))
            if candidates
            else []
        )
        picked = [candidates[i] for i in idx]
        params = {"mode": "random", "n": n, "seed": seed}
        desc = f"{len(picked)} random samples, seed {seed}"
    params["heldout_only"] = bool(data.own and ss.get(SEL_HELDOUT, True))
    if data.own and ss.get(SEL_HELDOUT, True):
        desc += ", held-out split"
    return Selection(tuple(picked), desc, params)


def default_classes(bundle, labels) -> list[str]:
    present = set(labels.tolist()) if labels is not None else set()
    non_target = [c for c in bundle.classes if c in present and c != bundle.target]
    return non_target[:1]


# ----------------------------------------------------------------------------- perturbation


@st.cache_data(show_spinner="Perturbing…", max_entries=32)
def _perturbation(bkey: str, dkey: str, samples: tuple[str, ...], _bundle, _adata):
    from tspg.perturbation import perturb_adata

    return perturb_adata(_bundle, _adata[list(samples)], source="data")


def perturbation(bundle, data: Data, samples):
    """``perturb_adata`` of the chosen samples (cached by bundle, data and sample ids)."""
    if not len(samples):
        raise ValueError("no samples selected: pick at least one on the Perturb page")
    return _perturbation(bundle_key(bundle), data.key, tuple(samples), bundle, data.adata)


@st.cache_data(show_spinner=False, max_entries=8)
def _perturbed_h5ad(bkey: str, dkey: str, samples: tuple[str, ...], _bundle, _adata) -> bytes:
    from tspg.perturbation import perturb

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
def scaled_expression(bkey: str, dkey: str, _bundle, _adata) -> np.ndarray:
    """The whole dataset's expression of the bundle's genes, scaled with its scaler (read-only:
    a resource, so a large matrix is not copied on every rerun)."""
    from tspg.data import align_genes

    return _bundle.scaler.transform(
        align_genes(_adata, _bundle.genes, source="data"), genes=_bundle.genes
    )


# ----------------------------------------------------------------------------- rendering


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "chart"


def show_chart(chart, name: str, *, key: str | None = None, on_select=None, selection_mode=None):
    """``st.altair_chart`` plus SVG and PNG downloads (rendered only when clicked)."""
    from tspg import charts

    kw = {"on_select": on_select, "selection_mode": selection_mode} if on_select else {}
    # Streamlit fits a chart into its given height (axes included) unless told to pad: small
    # charts (a few bars, a short heatmap) would be squashed. Drawn at the builder's size.
    result = st.altair_chart(chart.properties(autosize="pad"), width="content", key=key, **kw)
    fname = _slug(name)
    row = st.container(horizontal=True)
    row.download_button(
        "SVG",
        lambda: charts.chart_to_svg(chart),
        file_name=f"{fname}.svg",
        mime="image/svg+xml",
        key=f"svg-{key or fname}",
        on_click="ignore",
        icon=":material/download:",
    )
    row.download_button(
        "PNG",
        lambda: charts.chart_to_png(chart),
        file_name=f"{fname}.png",
        mime="image/png",
        key=f"png-{key or fname}",
        on_click="ignore",
        icon=":material/download:",
    )
    return result


@st.cache_data(show_spinner=False, max_entries=64)
def _csv(df: pd.DataFrame, index: bool) -> bytes:
    return df.to_csv(index=index).encode()


def show_table(
    df: pd.DataFrame, name: str, *, key: str | None = None, index: bool = True, **kw
) -> None:
    """``st.dataframe`` plus a CSV download."""
    st.dataframe(df, **kw)
    st.download_button(
        "CSV",
        _csv(df, index),
        file_name=f"{_slug(name)}.csv",
        mime="text/csv",
        key=f"csv-{key or _slug(name)}",
        on_click="ignore",
        icon=":material/download:",
    )


def reproduce(params: dict, command: str, *, python: str | None = None) -> None:
    """The page's parameters and the equivalent command, in a closed expander (long lists of
    samples or genes start folded; long commands wrap)."""
    with st.expander("Parameters and the equivalent command"):
        st.json(params, expanded=1)
        st.code(command, language="bash", wrap_lines=True)
        if python:
            st.code(python, language="python", wrap_lines=True)


def command(*parts: str) -> str:
    """A command line from its parts, empty parts (an omitted DATA) left out."""
    return " ".join(p for p in parts if p)


def data_arg(bundle, data: Data, *, optional: bool) -> str:
    """The DATA argument of a ``tspg`` command for ``data`` ("" where the command finds it itself)."""
    if data.key == "demo" or (data.own and is_demo(bundle.manifest)):
        return "" if optional else "demo.h5ad"
    if data.key.startswith("upload:"):
        return shlex.quote(str(data.adata.uns.get("tspg_import", {}).get("source", "upload.h5ad")))
    return shlex.quote(f"{bundle.manifest['dataset']['name']}.h5ad")


def models_arg() -> str:
    return f"--models {shlex.quote(str(models_root()))}"


def fingerprint(*parts) -> str:
    """A short hash of plain values (cache keys of maps)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def scaler_key(bundle) -> str:
    """Names the bundle's gene set and scaling (bundles that share them share a map)."""
    s = bundle.manifest["scaler"]
    return fingerprint(
        tuple(bundle.genes), tuple(np.round(s["minimum"], 6)), tuple(np.round(s["range"], 6))
    )


def frame_csv(make: Callable[[], pd.DataFrame], *, index: bool = True) -> Callable[[], bytes]:
    """A callable for a deferred CSV download of the frame ``make()`` builds."""
    return lambda: make().to_csv(index=index).encode()


@st.cache_data(show_spinner=False, max_entries=8)
def _target_mean(bkey: str, dkey: str, _bundle, _adata) -> np.ndarray | None:
    from tspg.baselines import training_target_mean

    return training_target_mean(_bundle, _adata)


def target_mean(bundle, data: Data) -> np.ndarray | None:
    """The target class's mean (scaled) over the bundle's training split: stored in the bundle,
    or (older bundles) computed from its own dataset; None when neither is available."""
    if bundle.target_mean is not None:
        return bundle.target_mean
    try:
        own = own_data(bundle, data)
        return _target_mean(bundle_key(bundle), own.key, bundle, own.adata)
    except ValueError as err:
        logger.info("no target mean for %s: %s", bundle.name, err)
        return None


def heatmap_frame(bundle, data: Data, pert, *, n_genes: int) -> pd.DataFrame:
    """``charts.heatmap_frame`` for one sample, or for the selection's mean x, P and x_adv."""
    from tspg import charts

    tm = target_mean(bundle, data)
    tm = np.full(len(pert.genes), np.nan) if tm is None else tm
    return charts.heatmap_frame(
        pert.genes, pert.x.mean(0), pert.P.mean(0), pert.x_adv.mean(0), tm, n_genes=n_genes
    )


# ----------------------------------------------------------------------------- t-SNE map


def map_class_options(bundle, labels) -> list[str]:
    """Every class of the data but the target, the most frequent first."""
    from tspg.embedding import map_classes

    return map_classes(labels, target=bundle.target, max_classes=None)[1:]


def map_classes_default(bundle, labels, sources) -> list[str]:
    """The map's default classes besides the target: the source classes of the selection
    (``sources``: its samples' classes; the most represented first), then the most frequent
    others, nine at most; in order of frequency, so that the same classes give the same map."""
    from tspg.embedding import MAP_MAX_CLASSES

    options = map_class_options(bundle, labels)
    picked = (
        [c for c in pd.Series(sources).value_counts().index if c in set(options)]
        if sources is not None
        else []
    )
    picked = list(dict.fromkeys([*picked, *options]))[: MAP_MAX_CLASSES - 1]
    return [c for c in options if c in set(picked)]


def map_classes(bundle, labels, sources) -> list[str]:
    """The map's classes: the target, then the classes chosen on the Map page, or (until the
    user changes them) :func:`map_classes_default`."""
    from tspg.embedding import MAP_MAX_CLASSES

    ss = st.session_state
    options = map_class_options(bundle, labels)
    picked = set(ss.get(MAP_CLASSES) or [])
    chosen = [c for c in options if c in picked][
        : MAP_MAX_CLASSES - 1
    ]  # in the options' order: one map per set
    if not chosen or chosen == ss.get(MAP_AUTO):
        chosen = map_classes_default(bundle, labels, sources)
    return [bundle.target, *chosen]


@st.cache_resource(
    show_spinner="Fitting the t-SNE reference map (once per dataset, gene set, classes and seed)…",
    max_entries=8,
)
def _reference_map(dkey: str, skey: str, classes: tuple[str, ...], seed: int, _bundle, _data):
    from tspg.embedding import fit_class_map

    Xs = scaled_expression(bundle_key(_bundle), _data.key, _bundle, _data.adata)
    names = np.asarray(_data.adata.obs_names).astype(str)
    return fit_class_map(
        Xs,
        _data.labels(_bundle.label_key),
        names,
        classes=list(classes),
        target=_bundle.target,
        seed=seed,
    )


def reference_map(bundle, data: Data, classes, seed: int):
    """(ReferenceMap, row indices of its samples); cached per dataset, gene set and scaling, classes, seed."""
    if data.labels(bundle.label_key) is None:
        raise ValueError(
            f"{data.label} has no {bundle.label_key!r} column in obs: the map colours real samples by class"
        )
    return _reference_map(data.key, scaler_key(bundle), tuple(classes), int(seed), bundle, data)


def map_key(bundle, data: Data, classes, seed: int) -> str:
    return fingerprint(data.key, scaler_key(bundle), tuple(classes), int(seed))


@st.cache_data(show_spinner="Placing the perturbed samples on the map…", max_entries=32)
def _placed(mkey: str, bkey: str, samples: tuple[str, ...], _ref, _x_adv) -> np.ndarray:
    from tspg.embedding import place

    return place(_ref, _x_adv)


def placed(ref, mkey: str, bundle, pert) -> np.ndarray:
    """Map coordinates of the perturbed samples, placed on the fixed reference map."""
    return _placed(mkey, bundle_key(bundle), tuple(pert.samples), ref, pert.x_adv)


@st.cache_data(show_spinner="Recomputing the joint t-SNE map…", max_entries=4)
def _joint(mkey: str, bkey: str, samples: tuple[str, ...], seed: int, _X_real, _x_adv):
    from tspg.embedding import fit_joint_map

    return fit_joint_map(_X_real, _x_adv, seed=seed)


def joint(ref_idx, mkey: str, bundle, data: Data, pert, seed: int):
    """(real coords, perturbed coords) of one t-SNE fit on both (the "Recompute joint map" button)."""
    Xs = scaled_expression(bundle_key(bundle), data.key, bundle, data.adata)
    return _joint(mkey, bundle_key(bundle), tuple(pert.samples), int(seed), Xs[ref_idx], pert.x_adv)


@st.cache_resource(show_spinner=False, max_entries=4)
def _real_pred(bkey: str, dkey: str, _bundle, _adata) -> np.ndarray:
    from tspg.perturbation import class_probabilities

    Xs = scaled_expression(bkey, dkey, _bundle, _adata)
    return np.asarray(_bundle.classes, dtype=object)[
        class_probabilities(_bundle.target_model, Xs).argmax(1)
    ]


def real_predictions(bundle, data: Data) -> np.ndarray:
    """The target model's class for every sample of the data (unperturbed)."""
    return _real_pred(bundle_key(bundle), data.key, bundle, data.adata)


# ----------------------------------------------------------------------------- genes and enrichment


def offline_gmt_files(bundle) -> list[str]:
    """The offline backend's GMT files for ``bundle`` (``tspg.enrichment.offline_gmt_files``: the
    bundled blood-cell markers, the bundle's gene-set file if it is still there, every GMT in
    ``$TSPG_GMT_DIR``)."""
    from tspg.enrichment import offline_gmt_files as files

    return [str(p) for p in files(bundle)]


# A fallback (Enrichr unreachable) is kept for a few minutes only, so the online result
# shows once Enrichr answers again; online results stay in tspg.enrichment's disk cache.
@st.cache_data(show_spinner="Running the enrichment…", max_entries=32, ttl=300)
def enrichment(
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
    from tspg.enrichment import enrich_directions

    df = enrich_directions(
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
def _baselines(bkey: str, dkey: str, _bundle, _adata):
    from tspg.baselines import fit_baselines

    return fit_baselines(_bundle, _adata)


def baselines(bundle, data: Data):
    """Mean shifts and differential expression on the bundle's training split (its own dataset;
    ValueError when it is not available)."""
    own = own_data(bundle, data)
    return _baselines(bundle_key(bundle), own.key, bundle, own.adata)


def selection_overlap(base, pert, ks) -> pd.DataFrame:
    """``tspg.baselines.selection_overlap`` of a perturbation's samples (as ``tspg evaluate`` does
    for the held-out split), baseline names written for reading."""
    from tspg.baselines import selection_overlap as overlap

    out = overlap(pert.P, pert.x, pert.labels, pert.genes, base, ks=ks)
    out["baseline"] = out["baseline"].str.replace("_", " ")
    return out


def gene_frames(
    bundle, data: Data, pert, ref, ref_idx, mkey: str, gene: str
) -> dict[str, pd.DataFrame]:
    """One gene's scaled expression for ``charts.gene_map_chart`` (``"map"``: the map frame with
    ``value``) and ``charts.gene_distribution_chart`` (``"distribution"``: every real sample by
    class, and the perturbed samples by source class)."""
    from tspg.charts import gene_distribution_frame
    from tspg.embedding import map_frame

    j = bundle.genes.index(gene)
    Xs = scaled_expression(bundle_key(bundle), data.key, bundle, data.adata)
    frame = map_frame(
        ref, placed(ref, mkey, bundle, pert), new_samples=pert.samples, new_source=pert.labels
    )
    frame["value"] = np.concatenate([Xs[ref_idx, j], pert.x_adv[:, j]])
    dist = gene_distribution_frame(
        data.labels(bundle.label_key), Xs[:, j], pert.labels, pert.x_adv[:, j]
    )
    return {"map": frame, "distribution": dist}
