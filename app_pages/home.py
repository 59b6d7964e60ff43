"""Home: what TSPG does, the chosen bundle's summary, and training the demo when there is none."""

from __future__ import annotations

import shlex

import pandas as pd
import streamlit as st

from tspg.app import loaders as L
from tspg.app import render as R
from tspg.app import state as S
from tspg.app.views import models_arg
from tspg.bundle import save_bundle
from tspg.config import config_argv
from tspg.datasets import DEMO_LABEL_KEY, DEMO_NAME, DEMO_TARGET
from tspg.pipeline import train

st.title("TSPG Explorer")
st.markdown(
    "A **transcriptome state perturbation generator** (TSPG; Targonski et al., 2019) learns, for one "
    "target class, the smallest change P to a sample's gene expression that makes a classifier call it "
    "that class.  \nThe genes with the largest positive and negative P are the genes that define the "
    "target state.  \nPick a trained generator and the data to perturb in the sidebar, then explore the "
    "pages: perturb samples live, see them on the t-SNE map, and profile their top genes."
)


def train_demo(config) -> None:
    """Train the demo generator with a progress bar, save it, and rerun."""
    import torch

    from tspg.training import use_threads

    app_threads = torch.get_num_threads()  # the app's own (tspg.app.loaders), restored below
    use_threads()  # training's default (tspg.training.default_threads)
    total = config.target_epochs + config.epochs
    done = {"n": 0}
    with st.status("Training the demo generator…", expanded=True) as status:
        bar = st.progress(0.0, text="loading the demo data")

        def progress(stage: str, step: int, n: int, losses: dict) -> None:
            done["n"] += 1
            shown = ", ".join(f"{k} {v:.3g}" for k, v in losses.items() if k != "total" and v)
            bar.progress(min(done["n"] / total, 1.0), text=f"{stage}: epoch {step}/{n}  {shown}")

        with R.guard("Training the demo generator failed"):
            try:
                bundle = train(
                    L.demo_adata(),
                    label_key=DEMO_LABEL_KEY,
                    target=DEMO_TARGET,
                    config=config,
                    dataset=DEMO_NAME,
                    progress=progress,
                )
            finally:
                torch.set_num_threads(app_threads)
            path = save_bundle(bundle, L.models_root(), overwrite=True)
        status.update(label=f"Trained {bundle.name} ({path})", state="complete")
    st.session_state[S.BUNDLE] = bundle.name
    st.rerun()


TRAIN = "train_demo_requested"
bundle_name = st.session_state.get(S.BUNDLE)
if not bundle_name:
    with R.guard("The demo's training settings are wrong"):
        cfg = L.demo_config()
    st.subheader("No trained generator yet")
    st.write(
        f"The models folder `{L.models_root()}` holds no readable bundle. Train the demo generator: "
        f"scanpy's pbmc68k_reduced (700 blood cells, 765 genes, 10 cell types), target *CD14+ Monocyte*, "
        f"{cfg.target_epochs} target-model epochs and {cfg.epochs} generator epochs"
        + (
            f", {cfg.seeds} generators (a seed ensemble: their mean perturbation, and per gene "
            "in how many of them it is a top gene)."
            if cfg.seeds > 1
            else "."
        )
    )
    st.button(
        "Train the demo generator",
        type="primary",
        key="train_demo",
        icon=":material/model_training:",
        on_click=S.set_state,
        args=(TRAIN, True),
    )
    if st.session_state.pop(TRAIN, False):
        train_demo(cfg)
    R.reproduce(
        {
            "models folder": str(L.models_root()),
            "epochs": cfg.epochs,
            "target_epochs": cfg.target_epochs,
            "seeds": cfg.seeds,
        },
        shlex.join(["tspg-train", "--demo", *config_argv(cfg), "--out", str(L.models_root())]),
    )
    S.stop()

with R.guard("Loading the bundle failed"):
    bundle = L.current_bundle()
summary = bundle.summary()


def share(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


st.subheader(f"Bundle {bundle.name}")
st.caption(
    f"dataset {summary['dataset']} · gene set {summary['gene set']} · recipe {summary['recipe']} · created {summary['created']}"
)
c = st.columns([1, 1, 2, 1.4, 1.4])
c[0].metric("Classes", summary["classes"])
c[1].metric("Genes", summary["genes"])
c[2].metric("Target", summary["target"])
c[3].metric(
    "Target-model accuracy",
    share(summary["target-model accuracy"]),
    help="held-out split",
)
c[4].metric(
    "Perturbation accuracy",
    share(summary["perturbation accuracy"]),
    help="share of held-out samples of the other classes that the target model calls the target after perturbation",
)

R.show_verdict(bundle.manifest.get("verdict"), what="this bundle")

with R.guard("The chosen data cannot be used"):
    data = L.current_data(bundle)
    match = L.gene_match(bundle, data)
labels = data.labels(bundle.label_key)
st.write(
    f"**Data to perturb:** {data.label}: {data.adata.n_obs} samples x {data.adata.n_vars} genes; "
    + (
        f"all {len(bundle.genes)} of the bundle's genes found."
        if match.exact
        else f"{match.summary()}."
    )
)
R.show_gene_match(bundle, data, match)
if labels is None:
    st.warning(
        f"{data.label} has no {bundle.label_key!r} column in obs: samples can be picked by id or at random, not by class."
    )
else:
    counts = pd.Series(labels).value_counts().sort_index()
    st.caption("Classes: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))

R.reproduce(
    {"bundle": bundle.name, "models folder": str(L.models_root()), "data": data.label},
    f"tspg list {models_arg(L.models_root())}\n{bundle.train_command(out=L.models_root())}",
)
