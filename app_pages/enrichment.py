"""Enrichment: what the top perturbed genes do (Enrichr online, GMT gene sets offline)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import streamlit as st

from tspg import charts
from tspg.app import loaders as L
from tspg.app import render as R
from tspg.app import state as S
from tspg.app.views import command, data_arg, models_arg, top_genes_table
from tspg.enrichment import DEFAULT_LIBRARIES, EnrichrError
from tspg.ranking import RANKED_BY

bundle, data = R.page_start("Enrichment")
sel, pert = R.page_perturbation(bundle, data)

k = int(st.session_state.get(S.TOP_K, 20))
whats = ["consensus", *pert.samples]
if st.session_state.get(S.ENR_WHAT) not in whats:
    S.note_dropped(
        S.ENR_WHAT,
        [st.session_state.get(S.ENR_WHAT)],
        "sample (genes to enrich) not in the selection",
    )
    st.session_state[S.ENR_WHAT] = "consensus"
if S.ENR_LIBRARIES not in st.session_state:
    st.session_state[S.ENR_LIBRARIES] = list(DEFAULT_LIBRARIES)
rows = pert.source_rows()
n_src = int(rows.sum())
labels = dict(
    zip(pert.samples, pert.labels if pert.labels is not None else [None] * len(pert), strict=True)
)
c = st.columns([2, 1, 1])
c[0].selectbox(
    "Genes of",
    whats,
    key=S.ENR_WHAT,
    format_func=lambda w: (
        f"the selection: top {k} by {RANKED_BY} over {n_src} source samples"
        if w == "consensus"
        else f"sample {w}" + (f" · {labels[w]}" if labels.get(w) else "") + f": its top {k} by P"
    ),
    help="The same lists as the Perturb page's heatmap and tables (one ranking everywhere).",
)
c[1].radio("Direction", ["both", "up", "down"], key=S.ENR_DIRECTION, horizontal=True)
c[2].radio(
    "Backend",
    ["auto", "offline", "enrichr"],
    key=S.ENR_BACKEND,
    horizontal=True,
    help="auto: Enrichr, or the offline GMT gene sets when Enrichr cannot be reached.",
)
with R.guard("Finding the offline gene-set files failed"):
    gmt_options = L.offline_gmt_files(bundle)
offered = st.session_state.get(S.ENR_GMTS_OFFERED, [])
chosen = st.session_state.get(S.ENR_GMTS, gmt_options)
st.session_state[S.ENR_GMTS] = [
    g for g in gmt_options if g in chosen or g not in offered
]  # left out stays out
st.session_state[S.ENR_GMTS_OFFERED] = list(dict.fromkeys([*offered, *gmt_options]))
c = st.columns([2, 2, 1])
c[0].multiselect(
    "Enrichr libraries (online)",
    list(dict.fromkeys([*DEFAULT_LIBRARIES, *st.session_state[S.ENR_LIBRARIES]])),
    key=S.ENR_LIBRARIES,
    accept_new_options=True,
)
c[1].multiselect(
    "Offline gene-set libraries (GMT)",
    gmt_options,
    key=S.ENR_GMTS,
    format_func=lambda f: Path(f).stem,
    help="Used when Enrichr cannot be reached or the backend is offline: the bundled blood-cell markers, the GMT of the "
    "bundle's gene set (if it is still there) and every GMT in $TSPG_GMT_DIR.",
)
c[2].select_slider(
    "Significant below q",
    S.ENRICHMENT_THRESHOLDS,
    key=S.ENR_THRESHOLD,
    format_func=lambda q: f"{q:g}",
    help="Benjamini-Hochberg q-value threshold (the paper's: 1e-4).",
)

what = st.session_state[S.ENR_WHAT]
direction = st.session_state[S.ENR_DIRECTION]
with R.guard("Ranking the genes failed"):
    shown = pert if what == "consensus" else pert.subset([what])
    ranked = top_genes_table(shown, k=k)
    lists = {d: ranked.loc[ranked.direction == d, "gene"].tolist() for d in ("up", "down")}
up = tuple(lists["up"]) if direction in ("both", "up") else ()
down = tuple(lists["down"]) if direction in ("both", "down") else ()
asked = [d for d in ("up", "down") if direction in ("both", d)]
which = (
    f"the selection's top {k} genes per direction, ranked by {RANKED_BY} over its {n_src} source samples"
    if what == "consensus"
    else f"sample {what}'s top {k} genes per direction, ranked by its P"
)
st.caption(
    f"Enriching {which} (the Perturb page's lists).  \nUp: {', '.join(up) or '—'}  \nDown: {', '.join(down) or '—'}"
)

libraries = tuple(st.session_state[S.ENR_LIBRARIES])
backend = st.session_state[S.ENR_BACKEND]
gmt_files = tuple(st.session_state[S.ENR_GMTS])
threshold = float(st.session_state[S.ENR_THRESHOLD])
if backend != "enrichr" and not gmt_files:
    st.warning("Pick at least one offline gene-set library: the offline backend needs one.")
    S.stop()
with R.guard("Enrichment failed"):
    try:
        table, attrs = L.enrichment_table(
            up, down, tuple(bundle.genes), libraries, backend, gmt_files, threshold
        )
    except EnrichrError as err:  # Enrichr chosen and not usable: one log line, and what to do
        logging.getLogger("tspg.app").warning("Enrichment with Enrichr failed: %s", err)
        st.error(f"Enrichment failed: {err}")
        st.info(
            "Choose the backend **auto** (Enrichr, or the offline gene sets when Enrichr cannot "
            "be reached) or **offline** to enrich these genes without Enrichr.",
            icon=":material/lightbulb:",
        )
        S.stop()

backends = sorted(set(attrs.get("backend", {}).values()))
messages = attrs.get("messages", {})
if backends == ["enrichr"]:
    st.success(
        "Backend: **Enrichr** (online)"
        + (", from the local cache" if all(attrs.get("from_cache", {}).values()) else "")
    )
else:
    st.warning(
        "Backend: **offline** gene sets (hypergeometric test on GMT files, not Enrichr)"
        if "offline" in backends and len(backends) == 1
        else f"Backends: {', '.join(backends)}"
    )
    if backend == "auto":
        st.button(
            "Try Enrichr again",
            key="enr_retry",
            on_click=L.enrichment_table.clear,
            help="A fallback is kept for 5 minutes; this asks Enrichr now.",
        )
messages = {d: m for d, m in messages.items() if d in asked}  # not "no down genes" for "up"
for msg, directions in {
    m: [d for d, m2 in messages.items() if m2 == m] for m in messages.values()
}.items():
    st.caption(f"{' and '.join(directions)}: {msg}")  # one line for a message both directions share

if table.empty:
    st.info("No gene set shares a gene with these lists.")
else:
    with R.guard("Drawing the enrichment chart failed"):
        st.markdown(
            f"The 10 terms with the smallest q per direction (dashed line: q = {threshold:g}, below which a term counts as significant)"
        )
        R.show_chart(
            charts.enrichment_chart(table, q_threshold=threshold),
            f"enrichment-{bundle.name}-{what}",
            key="enrichment_chart",
        )
R.show_table(
    table,
    f"enrichment-{bundle.name}-{what}",
    key="enrichment_table",
    index=False,
    width="stretch",
    column_config={c: st.column_config.NumberColumn(format="%.2e") for c in ("p", "q")},
)

ids = (
    [s for s, keep in zip(pert.samples, rows, strict=True) if keep]
    if what == "consensus"
    else [what]
)
left_out = [Path(f).stem for f in gmt_options if f not in gmt_files]
R.reproduce(
    {
        "bundle": bundle.name,
        "genes of": what,
        "samples": ids,
        "direction": direction,
        "k": k,
        "libraries": list(libraries),
        "offline libraries": [Path(f).stem for f in gmt_files],
        "threshold": threshold,
        "backend": backend,
        "up": list(up),
        "down": list(down),
    },
    (
        f"# the command reads every offline library; the page left out: {', '.join(left_out)}\n"
        if left_out
        else ""
    )
    + command(
        "tspg enrich",
        shlex.quote(bundle.name),
        data_arg(bundle, data, optional=True),
        "-o enrichment.csv",
        f"--direction {direction} --k {k} --threshold {threshold:g}",
        "--offline" if backend == "offline" else "",
        "--libraries",
        *map(shlex.quote, libraries),
        models_arg(L.models_root()),
        "--samples",
        *map(shlex.quote, ids),
    ),
    python=(
        "from tspg.enrichment import enrich_directions\n"
        f"table = enrich_directions({list(up)!r}, {list(down)!r}, background=bundle.genes, libraries={list(libraries)!r}, "
        f"gmt_files={list(gmt_files)!r}, backend={backend!r}, threshold={threshold:g})"
    ),
)
