"""Enrichment: what the top perturbed genes do (Enrichr online, GMT gene sets offline)."""

from __future__ import annotations

import shlex

import streamlit as st

import app_state as S

bundle, data = S.page_start("Enrichment")
sel, pert = S.page_perturbation(bundle, data)

from tspg.enrichment import DEFAULT_LIBRARIES  # noqa: E402
from tspg.perturb import consensus_top, top_genes  # noqa: E402

k = int(st.session_state.get(S.TOP_K, 20))
whats = ["consensus", *pert.samples]
if st.session_state.get(S.ENR_WHAT) not in whats:
    st.session_state[S.ENR_WHAT] = "consensus"
if S.ENR_LIBRARIES not in st.session_state:
    st.session_state[S.ENR_LIBRARIES] = list(DEFAULT_LIBRARIES)
c = st.columns([2, 1, 1])
c[0].selectbox(
    "Genes of", whats, key=S.ENR_WHAT,
    format_func=lambda w: f"the selection's consensus top {k} ({len(pert)} samples)" if w == "consensus" else f"sample {w}",
)
c[1].radio("Direction", ["both", "up", "down"], key=S.ENR_DIRECTION, horizontal=True)
c[2].radio("Backend", ["auto", "offline", "enrichr"], key=S.ENR_BACKEND, horizontal=True, help="auto: Enrichr, or the offline GMT gene sets when Enrichr cannot be reached.")
st.multiselect("Enrichr libraries (online)", list(dict.fromkeys([*DEFAULT_LIBRARIES, *st.session_state[S.ENR_LIBRARIES]])), key=S.ENR_LIBRARIES, accept_new_options=True)

what = st.session_state[S.ENR_WHAT]
direction = st.session_state[S.ENR_DIRECTION]
with S.guard("Ranking the genes failed"):
    if what == "consensus":
        rows = pert.source_rows()
        lists = consensus_top(pert.P[rows], pert.genes, k=k)
    else:
        top = top_genes(pert.subset([what]).P, pert.genes, k=k)
        lists = {"up": top.up[0].tolist(), "down": top.down[0].tolist()}
up = tuple(lists["up"]) if direction in ("both", "up") else ()
down = tuple(lists["down"]) if direction in ("both", "down") else ()
st.caption(f"Up: {', '.join(up) or '—'}  \nDown: {', '.join(down) or '—'}")

libraries = tuple(st.session_state[S.ENR_LIBRARIES])
backend = st.session_state[S.ENR_BACKEND]
with S.guard("Enrichment failed"):
    table, attrs = S.enrichment(up, down, tuple(bundle.genes), libraries, backend)

backends = sorted(set(attrs.get("backend", {}).values()))
messages = attrs.get("messages", {})
if backends == ["enrichr"]:
    st.success("Backend: **Enrichr** (online)" + (", from the local cache" if all(attrs.get("from_cache", {}).values()) else ""))
else:
    st.warning("Backend: **offline** gene sets (hypergeometric test on GMT files, not Enrichr)" if "offline" in backends and len(backends) == 1 else f"Backends: {', '.join(backends)}")
for msg, directions in {m: [d for d, m2 in messages.items() if m2 == m] for m in messages.values()}.items():
    st.caption(f"{' and '.join(directions)}: {msg}")  # one line for a message both directions share

if table.empty:
    st.info("No gene set shares a gene with these lists.")
else:
    with S.guard("Drawing the enrichment chart failed"):
        from tspg import charts

        st.markdown(f"The 10 terms with the smallest q per direction (dashed line: q = {S.ENRICHMENT_THRESHOLD:g}, below which a term counts as significant)")
        S.show_chart(charts.enrichment_chart(table, q_threshold=S.ENRICHMENT_THRESHOLD), f"enrichment-{bundle.name}-{what}", key="enrichment_chart")
S.show_table(
    table, f"enrichment-{bundle.name}-{what}", key="enrichment_table", index=False, hide_index=True, width="stretch",
    column_config={c: st.column_config.NumberColumn(format="%.2e") for c in ("p", "q")},
)

ids = [s for s, keep in zip(pert.samples, pert.source_rows(), strict=True) if keep] if what == "consensus" else [what]
S.reproduce(
    {"bundle": bundle.name, "genes of": what, "samples": ids, "direction": direction, "k": k, "libraries": list(libraries), "backend": backend, "up": list(up), "down": list(down)},
    S.command(
        "tspg enrich", shlex.quote(bundle.name), S.data_arg(bundle, data, optional=True), "-o enrichment.csv",
        f"--direction {direction} --k {k} --threshold {S.ENRICHMENT_THRESHOLD:g}", "--offline" if backend == "offline" else "",
        "--libraries", *map(shlex.quote, libraries), S.models_arg(), "--samples", *map(shlex.quote, ids),
    ),
    python=(
        "from tspg.enrichment import enrich_directions\n"
        f"table = enrich_directions({list(up)!r}, {list(down)!r}, background=bundle.genes, libraries={list(libraries)!r}, backend={backend!r})"
    ),
)
