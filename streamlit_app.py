"""TSPG Explorer dashboard: ``streamlit run streamlit_app.py`` (or ``tspg app``).

A router: the pages are listed explicitly for ``st.navigation``; the sidebar holds the
bundle and data pickers shared by every page (their values live in ``st.session_state``).

The pages live in ``app_pages/``, not ``pages/``: Streamlit decides once per process
whether an app uses its legacy multipage mode by whether a folder named ``pages`` lies
beside the main script (``PagesManager.uses_pages_directory``; AppTest decides it anew on
every run). In that mode a first request for a page URL, and every AppTest run of a page,
executes the page file alone, without this router and its sidebar. Any other folder name
leaves ``st.navigation`` in charge, as Streamlit's documentation of ``st.Page`` shows.
"""

from __future__ import annotations

import streamlit as st

from tspg.app import loaders as L
from tspg.app import state as S
from tspg.app.views import bundle_label, is_demo, own_dataset_hint

st.set_page_config(page_title="TSPG Explorer", page_icon=":material/scatter_plot:", layout="wide")
S.init_state()

PAGES = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/models.py", title="Models", icon=":material/inventory_2:"),
    st.Page("app_pages/perturb.py", title="Perturb", icon=":material/tune:"),
    st.Page("app_pages/map.py", title="Map", icon=":material/scatter_plot:"),
    st.Page("app_pages/genes.py", title="Genes", icon=":material/genetics:"),
    st.Page("app_pages/enrichment.py", title="Enrichment", icon=":material/hub:"),
]
page = st.navigation(PAGES)


def sidebar() -> None:
    entries = L.bundle_entries()
    names = L.readable_names(entries)
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
            format_func=lambda n: bundle_label(n, manifests[n]),
            help=f"Generators found in {L.models_root()} (set TSPG_MODELS_DIR to use another folder): target · dataset · gene set · name.",
        )
        st.radio(
            "Data to perturb", list(S.DATA_CHOICES), key=S.DATA, format_func=S.DATA_CHOICES.get
        )
        source, manifest = st.session_state[S.DATA], manifests[st.session_state[S.BUNDLE]]
        own_elsewhere = source == "bundle" and not is_demo(manifest)
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


sidebar()
page.run()
