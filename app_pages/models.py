"""Models: every bundle in the models folder, and the chosen one's training history and config."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from tspg import charts
from tspg.app import loaders as L
from tspg.app import render as R
from tspg.app import state as S
from tspg.app.views import generators_table, loss_table, models_arg
from tspg.config import format_option

st.title("Models")
root = L.models_root()
entries = L.bundle_entries()
st.caption(f"Bundles in `{root}`")
if not entries:
    st.info("No bundle yet: train the demo on the Home page, or run `tspg-train --demo`.")
    S.stop()

table = pd.DataFrame([e.summary() for e in entries]).set_index("name")
verdicts = {e.name: (e.manifest or {}).get("verdict") if e.error is None else None for e in entries}
table.insert(1, "verdict", [(verdicts.get(n) or {}).get("level", "") for n in table.index])
table.insert(
    2, "verdict summary", [(verdicts.get(n) or {}).get("summary", "") for n in table.index]
)
first = [
    "status",
    "verdict",
    "verdict summary",
    "target",
    "perturbation accuracy",
    "target-model accuracy",
]
table = table[[*first, *(c for c in table.columns if c not in first)]]
R.show_table(
    table,
    "bundles",
    key="bundles",
    width="stretch",
    column_config={
        c: st.column_config.NumberColumn(format="%.3f")
        for c in ("perturbation accuracy", "target-model accuracy")
    },
)
for e in entries:
    if e.error is not None:
        st.warning(f"**{e.name}** is unreadable and was skipped: {e.error}")

with R.guard("Loading the bundle failed"):
    bundle = L.current_bundle()
if bundle is None:
    S.stop()

st.subheader(f"{bundle.name}: verdict")
R.show_verdict(bundle.manifest.get("verdict"), what="this bundle")

st.subheader(f"{bundle.name}: training")
gens = generators_table(bundle.manifest)
st.markdown(
    f"**{len(gens)} generator{'s' if len(gens) > 1 else ''}** (seed{'s' if len(gens) > 1 else ''} "
    f"{', '.join(str(s) for s in gens['seed'])})"
    + (
        ", trained against one target model; the bundle reports their mean perturbation. "
        "Losses below: generator 0's."
        if len(gens) > 1
        else ": its top genes depend on the seed; `--seeds 3` trains an ensemble that says which genes do."
    )
)
if len(gens) > 1:
    st.dataframe(
        gens,
        hide_index=True,
        column_config={
            "perturbation accuracy": st.column_config.NumberColumn(format="%.3f"),
            "seconds": st.column_config.NumberColumn(format="%.1f"),
        },
    )
with R.guard("Drawing the training history failed"):
    st.markdown("**Losses per epoch** (one panel per loss, each on its own linear scale)")
    history = {
        k: v for k, v in bundle.manifest.get("history", {}).items() if any(x for x in v)
    }  # unused terms are all zero
    R.show_chart(charts.loss_chart(history), f"losses-{bundle.name}", key="loss_chart")
    st.dataframe(
        loss_table(history, bundle.manifest["config"]),
        hide_index=True,
        width="stretch",
        column_config={
            "weight": st.column_config.TextColumn(
                "weight", help="the term's weight in the generator's loss (the config's w_*)"
            ),
            "meaning": st.column_config.TextColumn("what it measures", width="large"),
        },
    )
    st.markdown(
        "**Perturbation accuracy by source class** (held-out samples the target model calls the target after perturbation)"
    )
    R.show_chart(
        charts.accuracy_by_source_chart(bundle.metrics.get("perturbation_accuracy_by_source", {})),
        f"accuracy-{bundle.name}",
        key="accuracy_chart",
    )

st.subheader("Config")
config = pd.DataFrame(
    {"value": [format_option(v) for v in bundle.manifest["config"].values()]},
    index=pd.Index(list(bundle.manifest["config"]), name="option"),
)
R.show_table(
    config,
    f"config-{bundle.name}",
    key="config",
    width="stretch",
    height=min(38 + 35 * len(config), 420),
)
with st.expander("Metrics and manifest details"):
    st.json(
        {
            k: v
            for k, v in bundle.manifest.items()
            if k
            not in ("genes", "scaler", "split", "history", "config", "target_mean", "generators")
        },
        expanded=2,
    )

R.reproduce(
    {"models folder": str(root), "bundle": bundle.name},
    f"tspg list {models_arg(root)}\n{bundle.train_command(out=root)}",
)
