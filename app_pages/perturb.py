"""Perturb: pick samples and a target, perturb them live, and read the result."""

from __future__ import annotations

import shlex

import pandas as pd
import streamlit as st

from tspg import charts
from tspg.app import loaders as L
from tspg.app import render as R
from tspg.app import state as S
from tspg.app.selection import (
    SELECTION_MODES,
    compatible_bundles,
    default_classes,
    present_classes,
)
from tspg.app.views import heatmap_frame, models_arg
from tspg.perturbation import consensus, top_genes_df

bundle, data = R.page_start("Perturb")
labels = data.labels(bundle.label_key)

# ----------------------------------------------------------------------------- target and samples

TARGET_WIDGET = "perturb_target"


def _switch_bundle() -> None:
    st.session_state[S.BUNDLE] = st.session_state[TARGET_WIDGET]


entries = L.bundle_entries()
manifests = {e.name: e.manifest for e in entries if e.error is None}
options = compatible_bundles(bundle, entries)
st.session_state[TARGET_WIDGET] = bundle.name
left, right = st.columns([1, 2])
left.selectbox(
    "Target",
    options,
    key=TARGET_WIDGET,
    on_change=_switch_bundle,
    format_func=lambda n: f"{manifests.get(n, {}).get('target', n)} ({n})",
    help="Generators trained on this gene set and these classes; choosing one switches the bundle.",
)
with right:
    st.radio(
        "Pick samples",
        list(SELECTION_MODES),
        key=S.SEL_MODE,
        format_func=SELECTION_MODES.get,
        horizontal=True,
    )

pool = L.sample_pool(bundle, data)
mode = st.session_state[S.SEL_MODE]
cols = st.columns(3)
if mode == "random":
    st.session_state[S.SEL_N] = max(1, min(int(st.session_state.get(S.SEL_N, 20)), len(pool)))
    cols[0].number_input("N samples", min_value=1, max_value=len(pool), step=1, key=S.SEL_N)
    cols[1].number_input("Seed", min_value=0, step=1, key=S.SEL_SEED)
    if labels is not None:
        cols[2].checkbox(f"Leave out the target class ({bundle.target})", key=S.SEL_NONTARGET)
elif mode == "class":
    if labels is None:
        st.error(
            f"{data.label} has no {bundle.label_key!r} column in obs, so samples cannot be picked by class. Pick them by id or at random."
        )
        st.stop()
    present = present_classes(bundle.classes, labels)
    chosen = [c for c in st.session_state.get(S.SEL_CLASSES) or [] if c in present]
    st.session_state[S.SEL_CLASSES] = chosen or default_classes(
        bundle.classes, labels, bundle.target
    )
    cols[0].multiselect("Source classes", present, key=S.SEL_CLASSES)
else:
    known = set(map(str, data.adata.obs_names))
    st.session_state[S.SEL_IDS] = [s for s in st.session_state.get(S.SEL_IDS) or [] if s in known]
    id_options = list(dict.fromkeys([*st.session_state[S.SEL_IDS], *pool]))
    cols[0].multiselect("Sample ids", id_options, key=S.SEL_IDS, placeholder="type to search")
if data.own:
    st.checkbox("Held-out samples only (never seen in training)", key=S.SEL_HELDOUT)

with R.guard("Selecting samples failed"):
    sel = L.current_selection(bundle, data)
if not sel.samples:
    st.warning("No samples selected.")
    st.stop()
with R.guard("Perturbation failed"):
    pert = L.perturbation(bundle, data, sel.samples)
pred = pert.predictions_df()

# ----------------------------------------------------------------------------- before / after

st.subheader(f"{len(pert)} samples → {bundle.target}")
st.caption(f"{sel.description}; data: {data.label}")
moved = float((pred["pred_after"] == bundle.target).mean())
m = st.columns(4)
m[0].metric("Samples", len(pert))
m[1].metric(
    "Called the target before", f"{float((pred['pred_before'] == bundle.target).mean()):.1%}"
)
m[2].metric("Called the target after", f"{moved:.1%}")
m[3].metric(
    "Mean target probability",
    f"{pred['prob_target_after'].mean():.3f}",
    delta=f"{pred['prob_target_after'].mean() - pred['prob_target_before'].mean():+.3f}",
)
R.show_table(
    pred.round(4),
    f"predictions-{bundle.name}",
    key="predictions",
    width="stretch",
    height=min(38 + 35 * len(pred), 320),
)

# ----------------------------------------------------------------------------- heatmap

st.subheader("Perturbation heatmap")
c1, c2, c3 = st.columns([1.2, 1, 1.8])
c1.radio(
    "Show",
    ["mean", "sample"],
    key=S.HEAT_VIEW,
    format_func={"mean": "Selection mean", "sample": "One sample"}.get,
    horizontal=True,
)
c2.number_input(
    "Genes per direction",
    min_value=1,
    max_value=min(200, len(bundle.genes)),
    step=1,
    key=S.TOP_K,
    help="Top genes up and down, in the heatmap and the tables below (and on the Genes and Enrichment pages).",
)
one = st.session_state[S.HEAT_VIEW] == "sample"
if one:
    if st.session_state.get(S.HEAT_SAMPLE) not in pert.samples:
        st.session_state[S.HEAT_SAMPLE] = pert.samples[0]
    c3.selectbox("Sample", pert.samples, key=S.HEAT_SAMPLE)
shown = pert.subset([st.session_state[S.HEAT_SAMPLE]]) if one else pert
k = int(st.session_state.get(S.TOP_K, 20))
with R.guard("Drawing the heatmap failed"):
    target_mean = L.target_mean(bundle, data)
    frame = heatmap_frame(shown, target_mean, n_genes=k)
    title = f"sample {shown.samples[0]}" if one else f"mean of {len(shown)} samples"
    st.caption(
        f"The {k} genes with the largest positive and the {k} with the largest negative P, sorted by P"
        + ("" if one else " (every column: the mean over the selection)")
        + ". Columns: x, the scaled expression before; P, the perturbation (the change the generator makes); x_adv = x + P, after; "
        "target mean, the target class's mean over the training split."
    )
    R.show_chart(charts.heatmap_chart(frame, title=title), f"heatmap-{bundle.name}", key="heatmap")
    if target_mean is None:
        st.caption(
            "The target mean column is empty: the bundle's training data are not available here."
        )

# ----------------------------------------------------------------------------- top genes

st.subheader(f"Top ±{k} genes")
st.caption(
    f"Sample {shown.samples[0]}: its {k} genes with the largest positive and negative P."
    if one
    else f"Consensus over the {len(shown)} samples: how many samples have each gene among their top {k}, and its mean P."
)
with R.guard("Ranking the genes failed"):
    if one:
        top = top_genes_df(shown, k=k)
        up, down = top[top.direction == "up"], top[top.direction == "down"]
        cols = ["rank", "gene", "P"]
    else:
        top = consensus(shown.P, shown.genes, k=k)
        up, down = top[top.direction == "up"].head(k), top[top.direction == "down"].head(k)
        cols = ["gene", "count", "frequency", "mean_P"]
u, d = st.columns(2)
height = 38 + 35 * min(max(len(up), len(down)), 20)  # up to 20 rows without scrolling
with u:
    st.markdown("**Up** (largest positive P)")
    R.show_table(
        up[cols].reset_index(drop=True),
        f"top-up-{bundle.name}",
        key="top_up",
        index=False,
        hide_index=True,
        height=height,
    )
with d:
    st.markdown("**Down** (largest negative P)")
    R.show_table(
        down[cols].reset_index(drop=True),
        f"top-down-{bundle.name}",
        key="top_down",
        index=False,
        hide_index=True,
        height=height,
    )

# ----------------------------------------------------------------------------- downloads

st.subheader("Downloads")
c = st.columns(3)
c[0].download_button(
    "Perturbed samples (.h5ad)",
    L.perturbed_h5ad(bundle, data, sel.samples),
    file_name=f"{bundle.name}-perturbed.h5ad",
    mime="application/octet-stream",
    on_click="ignore",
    icon=":material/download:",
    key="dl_h5ad",
)
c[1].download_button(
    "P, samples x genes (CSV)",
    R.frame_csv(
        lambda: pd.DataFrame(
            pert.P, index=pd.Index(pert.samples, name="sample"), columns=pert.genes
        )
    ),
    file_name=f"{bundle.name}-P.csv",
    mime="text/csv",
    on_click="ignore",
    icon=":material/download:",
    key="dl_P",
)
c[2].download_button(
    "Top genes of every sample (CSV)",
    R.frame_csv(lambda: top_genes_df(pert, k=k), index=False),
    file_name=f"{bundle.name}-top-genes.csv",
    mime="text/csv",
    on_click="ignore",
    icon=":material/download:",
    key="dl_top",
)

R.reproduce(
    {
        "bundle": bundle.name,
        "target": bundle.target,
        "data": data.label,
        "selection": sel.params,
        "samples": list(sel.samples),
        "k": k,
    },
    f"# the .h5ad download above holds the selected samples' expression (X); perturb it again with\n"
    f"tspg perturb {shlex.quote(bundle.name)} {bundle.name}-perturbed.h5ad -o perturbed.h5ad --k {k} {models_arg(L.models_root())}",
    python=(
        "import tspg\nfrom tspg.bundle import load_bundle, resolve_bundle\n"
        f"bundle = load_bundle(resolve_bundle({bundle.name!r}))\n"
        f"out = tspg.perturb(adata[samples], bundle, k={k}, copy=True)  # samples: the ids listed above"
    ),
)
