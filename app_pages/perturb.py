"""Perturb: pick samples and a target, perturb them live, and read the result."""

from __future__ import annotations

import shlex

import pandas as pd
import streamlit as st

from tspg import charts
from tspg.app import loaders as L
from tspg.app import render as R
from tspg.app import state as S
from tspg.app.render import prediction_columns, top_gene_columns
from tspg.app.selection import (
    SELECTION_MODES,
    clamp_n,
    compatible_bundles,
    default_classes,
    present_classes,
    random_candidates,
)
from tspg.app.views import (
    SUPPORT_MARKER,
    heatmap_frame,
    heatmap_title,
    models_arg,
    support_legend,
    target_label,
    top_genes_table,
)
from tspg.perturbation import top_genes_df
from tspg.ranking import RANKED_BY

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
    format_func=lambda n: target_label(n, manifests),
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
ss = st.session_state
label_of = {} if labels is None else dict(zip(map(str, data.adata.obs_names), labels, strict=True))
if mode == "random":
    leave_out = labels is not None and bool(ss.get(S.SEL_NONTARGET, True))
    available = len(
        random_candidates(pool, label_of or None, target=bundle.target, leave_out_target=leave_out)
    )
    ss[S.SEL_N], clamped = clamp_n(ss.get(S.SEL_N, 20), available)
    cols = st.columns([1, 1, 2])
    cols[0].number_input(
        "N samples",
        min_value=1,
        step=1,
        key=S.SEL_N,
        help=f"How many samples to pick at random (at most {available} here).",
    )
    cols[1].number_input("Seed", min_value=0, step=1, key=S.SEL_SEED)
    if labels is not None:
        cols[2].checkbox(
            "Leave out the target class",
            key=S.SEL_NONTARGET,
            help=f"Pick no sample of {bundle.target}, the class the generator moves samples to.",
        )
    if clamped:
        st.warning(clamped, icon=":material/info:")
elif mode == "class":
    if labels is None:
        st.error(
            f"{data.label} has no {bundle.label_key!r} column in obs, so samples cannot be picked by class. Pick them by id or at random."
        )
        S.stop()
    present = present_classes(bundle.classes, labels)
    stored = ss.get(S.SEL_CLASSES)
    chosen = [c for c in stored or [] if c in present]
    S.note_dropped(
        S.SEL_CLASSES, [c for c in stored or [] if c not in present], "class(es) not in the data"
    )
    if stored is None or (stored and not chosen):  # never picked, or none of them is here
        chosen = default_classes(bundle.classes, labels, bundle.target)
    ss[S.SEL_CLASSES] = chosen
    in_pool = pd.Series([label_of[s] for s in pool]).value_counts()
    st.pills(
        "Source classes",
        present,
        selection_mode="multi",
        key=S.SEL_CLASSES,
        format_func=lambda c: f"{c} ({in_pool.get(c, 0)})",
        help="Every sample of the chosen classes in the pool (their number in brackets).",
    )
else:
    known = set(map(str, data.adata.obs_names))
    stored = list(ss.get(S.SEL_IDS) or [])
    S.note_dropped(S.SEL_IDS, [s for s in stored if s not in known], "sample id(s) not in the data")
    ss[S.SEL_IDS] = [s for s in stored if s in known]
    id_options = list(dict.fromkeys([*ss[S.SEL_IDS], *pool]))
    st.multiselect(
        "Sample ids",
        id_options,
        key=S.SEL_IDS,
        placeholder="type part of an id or a class, then pick",
        format_func=lambda s: f"{s} · {label_of[s]}" if s in label_of else s,
        filter_mode="contains",
        select_all=False,  # Enter picks the first match, never every match
        wrap=True,
        help="Each id with its class. Typing filters the list; Enter adds the first match.",
    )
if data.own:
    st.checkbox("Held-out samples only (never seen in training)", key=S.SEL_HELDOUT)

with R.guard("Selecting samples failed"):
    sel = L.current_selection(bundle, data)
if not sel.samples:
    st.warning("No samples selected.")
    S.stop()
with R.guard("Perturbation failed"):
    pert = L.perturbation(bundle, data, sel.samples)
R.selection_checks(bundle, data, pert)
pred = pert.predictions_df()

# ----------------------------------------------------------------------------- before / after

st.subheader(f"{len(pert)} samples → {bundle.target}")
st.caption(f"{sel.description}; data: {data.label}")
moved = float((pred["pred_after"] == bundle.target).mean())
m = st.columns(4)
m[0].metric("Samples", len(pert))
m[1].metric(
    "Called the target before",
    f"{float((pred['pred_before'] == bundle.target).mean()):.1%}",
    help=f"Share of the samples the target model calls {bundle.target} as they are.",
)
m[2].metric(
    "Called the target after",
    f"{moved:.1%}",
    help=f"Share of the perturbed samples the target model calls {bundle.target}.",
)
m[3].metric(
    "Mean target probability",
    f"{pred['prob_target_after'].mean():.3f}",
    delta=f"{pred['prob_target_after'].mean() - pred['prob_target_before'].mean():+.3f}",
    help=f"The target model's mean probability of {bundle.target} after perturbation (change: against before).",
)
R.show_table(
    pred.round(4),
    f"predictions-{bundle.name}",
    key="predictions",
    width="stretch",
    height=min(38 + 35 * len(pred), 320),
    column_config=prediction_columns(bundle.target, bundle.label_key),
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
        S.note_dropped(
            S.HEAT_SAMPLE,
            [ss.get(S.HEAT_SAMPLE)] if ss.get(S.HEAT_SAMPLE) else [],
            "sample not in the selection",
        )
        st.session_state[S.HEAT_SAMPLE] = pert.samples[0]
    sample_label = dict(
        zip(
            pert.samples,
            pert.labels if pert.labels is not None else [None] * len(pert),
            strict=True,
        )
    )
    c3.selectbox(
        "Sample",
        pert.samples,
        key=S.HEAT_SAMPLE,
        format_func=lambda s: f"{s} · {sample_label[s]}" if sample_label[s] is not None else s,
    )
shown = pert.subset([st.session_state[S.HEAT_SAMPLE]]) if one else pert
k = int(st.session_state.get(S.TOP_K, 20))
n_src = int(shown.source_rows().sum())
with R.guard("Drawing the heatmap failed"):
    target_mean = L.target_mean(bundle, data)
    frame = heatmap_frame(shown, target_mean, n_genes=k)
    title, subtitle = heatmap_title(shown, target=bundle.target)
    st.caption(
        f"Left, up: the {k} genes with the most positive P; right, down: the {k} with the most negative P; "
        + (
            "ranked by this sample's P."
            if one
            else f"ranked by {RANKED_BY} over the {n_src} source samples (every column: their mean)."
        )
        + " The same lists as the tables below and the Enrichment page. Columns: x, the scaled expression before; "
        "P, the perturbation (the change the generator makes); x_adv = x + P, after; target mean, the target class's "
        "mean over the training split. P's colours are symmetric around 0 at the largest |P| shown."
    )
    if frame["gene"].str.endswith(SUPPORT_MARKER).any():
        subtitle = f"{subtitle} · {support_legend(k)}" if subtitle else support_legend(k)
    R.show_chart(
        charts.heatmap_chart(frame, title=title, subtitle=subtitle),
        f"heatmap-{bundle.name}",
        key="heatmap",
    )
    if target_mean is None:
        st.caption(
            "The target mean column is empty: the bundle's training data are not available here."
        )

# ----------------------------------------------------------------------------- top genes

st.subheader(f"Top ±{k} genes")
st.caption(
    f"Sample {shown.samples[0]}: its {k} genes with the largest positive and negative P."
    if one
    else f"Ranked by {RANKED_BY} over the {n_src} source samples (as the heatmap). "
    f"'In own top {k}': how many of these samples have the gene among their own top {k} (the Genes page counts these)."
)
with R.guard("Ranking the genes failed"):
    top = top_genes_table(shown, k=k)
    up, down = top[top.direction == "up"], top[top.direction == "down"]
    cols = ["rank", "gene", "mean_P"] if one else ["rank", "gene", "mean_P", "n_top", "frequency"]
    cols += ["support"] if "support" in top else []
u, d = st.columns(2)
height = 38 + 35 * min(max(len(up), len(down)), 20)  # up to 20 rows without scrolling
config = top_gene_columns(k, n_src, one=one)
with u:
    st.markdown("**Up** (most positive P)")
    R.show_table(
        up[cols].reset_index(drop=True),
        f"top-up-{bundle.name}",
        key="top_up",
        index=False,
        height=height,
        column_config=config,
    )
with d:
    st.markdown("**Down** (most negative P)")
    R.show_table(
        down[cols].reset_index(drop=True),
        f"top-down-{bundle.name}",
        key="top_down",
        index=False,
        height=height,
        column_config=config,
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
