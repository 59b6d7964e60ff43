"""Sweep: every gene set x target of a sweep (paper's Table 1); a click opens a bundle."""

from __future__ import annotations

import shlex

import streamlit as st

from tspg import charts
from tspg.app import loaders as L
from tspg.app import render as R
from tspg.app import state as S
from tspg.app.views import models_arg, open_bundle_from_pick, sweep_table
from tspg.sweep import sweep_genes_df

st.title("Sweep")
root = L.models_root()
with R.guard("Reading the sweep's results failed"):
    try:
        results = L.sweep_results()
    except FileNotFoundError:
        st.info(
            f"No sweep in `{root}` yet. A sweep trains a generator for every gene set x target "
            "(the paper's Table 1) and writes its results table beside the bundles:"
        )
        st.code(
            "tspg sweep data.h5ad --label-key cell_type --gene-sets h.all.v2023.gmt "
            f"--targets all {models_arg(root)}",
            language="bash",
        )
        S.stop()
if results.empty:
    st.info(f"The sweep results in `{root}` hold no rows yet.")
    S.stop()

ss = st.session_state
readable = set(L.readable_names())


def _open(name: str | None) -> None:
    """Make ``name`` the sidebar's bundle (a callback: it runs before the sidebar is drawn)."""
    if name and name in readable:
        ss[S.BUNDLE] = name
        ss[S.SWEEP_OPENED] = name
    elif name:
        ss[S.SWEEP_OPENED] = f"!{name}"


def _open_from_chart() -> None:
    _open(open_bundle_from_pick(ss.get("sweep_chart"), charts.SWEEP_SELECTION))


def _open_from_table() -> None:
    rows = getattr(getattr(ss.get("sweep_table"), "selection", None), "rows", None) or []
    if rows:
        _open(str(table.iloc[rows[0]]["bundle"]))


opened = ss.pop(S.SWEEP_OPENED, None)
if opened and opened.startswith("!"):
    st.warning(f"Bundle {opened[1:]!r} cannot be opened: it is not a readable bundle in `{root}`.")
elif opened:
    row = st.container(horizontal=True, vertical_alignment="center")
    row.success(f"Opened bundle **{opened}**: it is the sidebar's bundle on every page now.")
    row.page_link("app_pages/perturb.py", label="Perturb", icon=":material/tune:")
    row.page_link("app_pages/map.py", label="Map", icon=":material/scatter_plot:")
    row.page_link("app_pages/genes.py", label="Genes", icon=":material/genetics:")

n_sets, n_targets = results["gene_set"].nunique(), results["target"].nunique()
failed = int((results["status"] == "failed").sum())
st.caption(
    f"{len(results)} bundles: {n_sets} gene sets x {n_targets} targets"
    + (f", {failed} failed" if failed else "")
    + f"; results in `{root}`."
)

# ----------------------------------------------------------------------------- the grid

st.subheader("Gene sets x targets")
st.radio(
    "Colour by",
    list(charts.SWEEP_COLORS),
    key=S.SWEEP_COLOR,
    format_func=charts.SWEEP_COLORS.get,
    horizontal=True,
    help="Perturbation accuracy: held-out samples of other classes the target model calls the "
    "target after perturbation. Verdict: can the bundle be trusted (Models page). Energy "
    "distance: how far the perturbed samples are from the real target samples (lower: nearer).",
)
with R.guard("Drawing the sweep failed"):
    chart = charts.sweep_heatmap_chart(results, color=ss[S.SWEEP_COLOR])
    R.show_chart(
        chart,
        "sweep",
        key="sweep_chart",
        on_select=_open_from_chart,
        selection_mode=charts.SWEEP_SELECTION,
    )
st.caption("Click a cell (or a row of the table) to open that bundle on the other pages.")

table = sweep_table(results)
st.dataframe(
    table,
    key="sweep_table",
    on_select=_open_from_table,
    selection_mode="single-row",
    hide_index=True,
    width="stretch",
    height=min(38 + 35 * len(table), 420),
    column_config={
        "gene set": st.column_config.TextColumn("gene set"),
        "accuracy": st.column_config.ProgressColumn(
            "perturbation accuracy", format="percent", min_value=0.0, max_value=1.0
        ),
        "target-model accuracy": st.column_config.NumberColumn(format="%.3f"),
        "energy distance": st.column_config.NumberColumn(
            format="%.3g", help="of the perturbed samples to the real target (lower: nearer)"
        ),
        "before": st.column_config.NumberColumn(
            "energy distance before", format="%.3g", help="of the samples before perturbation"
        ),
    },
)

# ----------------------------------------------------------------------------- one target

st.subheader("One target")
targets = sorted(results["target"].unique().tolist())
if ss.get(S.SWEEP_TARGET) not in targets:
    S.note_dropped(S.SWEEP_TARGET, [ss.get(S.SWEEP_TARGET)], "target not in the sweep")
    ss[S.SWEEP_TARGET] = targets[0]
st.columns([1, 2])[0].selectbox("Target", targets, key=S.SWEEP_TARGET)
target = ss[S.SWEEP_TARGET]
left, right = st.columns(2)
with left, R.guard("Drawing the target's gene sets failed"):
    st.markdown(f"**Perturbation accuracy towards {target}, by gene set** (the paper's Table 1)")
    R.show_chart(
        charts.sweep_target_chart(results, target), f"sweep-{target}", key="sweep_target_chart"
    )
with right, R.guard("Counting the recurring genes failed"):
    genes = charts.recurring_genes_frame(sweep_genes_df(results), target)
    n = int((results["target"] == target).sum())
    st.markdown(f"**Genes that recur across the {n} gene sets' top genes** for {target}")
    if genes.empty:
        st.info("No top genes were recorded for this target.")
    else:
        shown = genes.groupby("direction", sort=False).head(15)
        R.show_chart(
            charts.gene_frequency_chart(shown), f"sweep-genes-{target}", key="sweep_genes_chart"
        )
        R.show_table(
            genes,
            f"sweep-genes-{target}",
            key="sweep_genes",
            index=False,
            width="stretch",
            height=240,
            column_config={
                "gene_sets": st.column_config.NumberColumn(
                    "gene sets", help="gene sets whose top genes hold this gene"
                ),
                "frequency": st.column_config.NumberColumn("share", format="percent"),
                "sets": st.column_config.TextColumn("which"),
            },
        )

R.reproduce(
    {"models folder": str(root), "gene sets": n_sets, "targets": targets},
    f"python -c {shlex.quote(f'import tspg.sweep; print(tspg.sweep.read_results({str(root)!r}))')}",
)
