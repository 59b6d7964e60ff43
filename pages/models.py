"""Models: every bundle in the models folder, and the chosen one's training history and config."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import app_state as S

S.ensure_router()
st.title("Models")
root = S.models_root()
entries = S.bundle_entries()
st.caption(f"Bundles in `{root}`")
if not entries:
    st.info("No bundle yet: train the demo on the Home page, or run `tspg-train --demo`.")
    st.stop()

rows = []
for e in entries:
    if e.error is None:
        m = e.manifest
        met = m.get("metrics", {})
        rows.append(
            {
                "name": e.name,
                "status": "ok",
                "target": m["target"],
                "perturbation accuracy": met.get("perturbation_accuracy_non_target"),
                "target-model accuracy": met.get("target_model_accuracy"),
                "dataset": m["dataset"]["name"],
                "gene set": m["gene_set"]["name"],
                "genes": len(m["genes"]),
                "classes": len(m["classes"]),
                "recipe": m["config"].get("recipe", ""),
                "epochs": m["config"].get("epochs"),
                "created": m.get("created", ""),
                "error": "",
            }
        )
    else:
        rows.append({"name": e.name, "status": "unreadable", "error": e.error})
table = pd.DataFrame(rows).set_index("name")
S.show_table(
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

with S.guard("Loading the bundle failed"):
    bundle = S.current_bundle()
if bundle is None:
    st.stop()

st.subheader(f"{bundle.name}: training")
with S.guard("Drawing the training history failed"):
    from tspg import charts

    st.markdown("**Losses per epoch** (log scale; click a legend entry to highlight a loss)")
    history = {
        k: v for k, v in bundle.manifest.get("history", {}).items() if any(x for x in v)
    }  # unused terms are all zero
    S.show_chart(charts.loss_chart(history), f"losses-{bundle.name}", key="loss_chart")
    st.markdown(
        "**Perturbation accuracy by source class** (held-out samples the target model calls the target after perturbation)"
    )
    S.show_chart(
        charts.accuracy_by_source_chart(bundle.metrics.get("perturbation_accuracy_by_source", {})),
        f"accuracy-{bundle.name}",
        key="accuracy_chart",
    )

st.subheader("Config")
config = pd.DataFrame(
    {
        "value": [
            ", ".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
            for v in bundle.manifest["config"].values()
        ]
    },
    index=pd.Index(list(bundle.manifest["config"]), name="option"),
)
S.show_table(
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
            if k not in ("genes", "scaler", "split", "history", "config", "target_mean")
        },
        expanded=2,
    )

S.reproduce(
    {"models folder": str(root), "bundle": bundle.name},
    f"tspg list {S.models_arg()}\n{S.train_command(bundle.manifest)}",
)
