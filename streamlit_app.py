"""TSPG Explorer dashboard: ``streamlit run streamlit_app.py`` (or ``tspg app``).

A router: the pages are listed explicitly for ``st.navigation``; the sidebar holds the
bundle and data pickers shared by every page (their values live in ``st.session_state``).
The view (bundle, data, selection, page options) is kept in the URL's query parameters:
read once per session, written after every run (:mod:`tspg.app.state`).

The pages live in ``app_pages/``, not ``pages/``: Streamlit decides once per process
whether an app uses its legacy multipage mode by whether a folder named ``pages`` lies
beside the main script (``PagesManager.uses_pages_directory``; AppTest decides it anew on
every run). In that mode a first request for a page URL, and every AppTest run of a page,
executes the page file alone, without this router and its sidebar. Any other folder name
leaves ``st.navigation`` in charge, as Streamlit's documentation of ``st.Page`` shows.
"""

from __future__ import annotations

import sys

import streamlit as st

from tspg.app import state as S

st.set_page_config(
    page_title="TSPG Explorer",
    page_icon=":material/scatter_plot:",
    layout="wide",
    initial_sidebar_state=360,  # px: room for a bundle's name at 1280 x 800
)

if "tspg.app.loaders" not in sys.modules:  # the first run of this server process: torch & co.
    boot = st.empty()
    with boot.container():
        st.title("TSPG Explorer")
        with st.spinner("Starting TSPG Explorer: loading torch, scanpy and the models…"):
            from tspg.app import loaders as L
    boot.empty()
from tspg.app import loaders as L  # noqa: E402
from tspg.app import render as R  # noqa: E402
from tspg.app.views import (  # noqa: E402
    bundle_label,
    data_choices,
    own_dataset_hint,
    verdict_level,
)

S.init_state()

PAGES = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/models.py", title="Models", icon=":material/inventory_2:"),
    st.Page("app_pages/perturb.py", title="Perturb", icon=":material/tune:"),
    st.Page("app_pages/map.py", title="Map", icon=":material/scatter_plot:"),
    st.Page("app_pages/genes.py", title="Genes", icon=":material/genetics:"),
    st.Page("app_pages/enrichment.py", title="Enrichment", icon=":material/hub:"),
    st.Page("app_pages/sweep.py", title="Sweep", icon=":material/grid_on:"),
]
page = st.navigation(PAGES)


def sidebar(entries, names) -> None:
    with st.sidebar:
        st.header("Model and data")
        if not names:
            st.session_state.pop(S.BUNDLE, None)
            st.info(
                f"No trained bundle in `{L.models_root()}` yet. Train the demo on the Home page."
            )
            return
        if st.session_state.get(S.BUNDLE) not in names:
            st.session_state[S.BUNDLE] = names[0]
        manifests = {e.name: e.manifest for e in entries if e.error is None}
        st.selectbox(
            "Bundle",
            names,
            key=S.BUNDLE,
            help=f"Generators found in {L.models_root()} (set TSPG_MODELS_DIR to use another folder).",
        )
        manifest = manifests[st.session_state[S.BUNDLE]]
        level = verdict_level(manifest)
        if level:
            color, icon = R.LEVEL_STYLE[level]
            st.badge(f"verdict: {level}", icon=icon, color=color)
        st.caption(bundle_label(manifest))
        choices = data_choices(manifest)
        if st.session_state.get(S.DATA) not in choices:
            st.session_state[S.DATA] = "bundle"  # the demo bundle's own dataset is the demo
        st.radio("Data to perturb", list(choices), key=S.DATA, format_func=choices.get)
        source = st.session_state[S.DATA]
        own_elsewhere = source == "bundle" and "demo" in choices
        if (
            own_elsewhere and st.session_state.get(S.UPLOAD) is None
        ):  # only the demo's data ship with tspg
            st.info(own_dataset_hint(manifest))
        if source == "upload" or own_elsewhere:
            st.file_uploader(
                f".h5ad file (at most {S.MAX_UPLOAD_MB} MB)",
                key=S.UPLOAD,
                max_upload_size=S.MAX_UPLOAD_MB,
                help="An AnnData file with the bundle's genes (matched by name) and, for picking samples by class, its label column in obs. "
                "The file the bundle was trained on is recognised by its fingerprint: its held-out split then applies.",
            )
        n_bad = len(entries) - len(names)
        if n_bad:
            st.caption(f"{n_bad} unreadable bundle(s): see the Models page.")


entries = L.bundle_entries()
names = L.readable_names(entries)
S.read_url(names)
st.session_state[S.NOTES_BOX] = st.container()  # what of a link could not be used, at the top
sidebar(entries, names)
page.run()
S.finish()  # pages that stop early finish through S.stop()
