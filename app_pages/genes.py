"""Genes: which genes the generator moves, how consistently, against two baselines (over all
source classes, or per source class); one gene up close."""

from __future__ import annotations

import logging
import shlex

import pandas as pd
import streamlit as st

from tspg import charts
from tspg.app import loaders as L
from tspg.app import render as R
from tspg.app import state as S
from tspg.app.selection import picked_map_classes
from tspg.app.views import (
    command,
    data_arg,
    gene_frames,
    models_arg,
    source_choices,
    source_view,
    sources_of,
)
from tspg.baselines import selection_overlap, source_table
from tspg.errors import UserError
from tspg.perturbation import consensus, consensus_top, unique_top_genes
from tspg.ranking import support_text

SOURCE_CAPTION = (
    "Per source class, over the selection's samples of that class: TSPG's top {k} genes by mean P "
    "beside DE (Wilcoxon, the target against that class alone) and MS (the class's mean shift, "
    "ranked by the change it makes), both fit on the training split. TSPG only: top {k} in TSPG, "
    "beyond rank {far} in DE and MS; baselines only: top {k} in both, beyond rank {far} in TSPG; "
    "against source: mean P of the opposite sign to the class's mean shift; beyond target: mean "
    "x_adv more than one target sd from the target mean. A class needs 2 samples."
)
GENE_COLUMNS = {
    "mean P": st.column_config.NumberColumn(format="%.3f", help="mean P over the class's samples"),
    "in own top k": st.column_config.NumberColumn(
        help="samples of the class with the gene among their own top k"
    ),
    "support": st.column_config.TextColumn(
        help="in how many of the ensemble's generators' own top k (over this class's samples) the gene is"
    ),
    "DE score": st.column_config.NumberColumn(
        format="%.2f", help="Wilcoxon score, target vs this class (training split)"
    ),
    "MS change": st.column_config.NumberColumn(
        format="%.3f", help="mean clip(x + mu_target - mu_class, 0, 1) - x over the same samples"
    ),
    "x_adv mean": st.column_config.NumberColumn(format="%.3f"),
    "target mean": st.column_config.NumberColumn(format="%.3f"),
    "target sd": st.column_config.NumberColumn(format="%.3f"),
}

bundle, data = R.page_start("Genes")
sel, pert = R.page_perturbation(bundle, data)

k = int(st.session_state.get(S.TOP_K, 20))
SHOWN = 25  # genes per direction in the frequency chart
rows = pert.source_rows()
src = pert.subset(rows)
st.caption(
    f"{len(src)} perturbed samples of source classes ({sel.description}); top {k} genes per direction. Change the selection on the Perturb page."
)

# ----------------------------------------------------------------------------- frequency

st.subheader("How often each gene is among a sample's top genes")
with R.guard("Counting the top genes failed"):
    freq = consensus(src.P, src.genes, k=k, members=src.P_members)
    if "support" in freq:  # a seed ensemble: in how many generators' own top k, as "2/3"
        freq["support"] = support_text(freq["support"], freq.pop("n_members"))
    shown = freq.groupby("direction", sort=False).head(
        SHOWN
    )  # the most frequent; the table has them all
    st.caption(
        f"In how many of the {len(src)} samples each gene is among the sample's own top {k}: the "
        f"{SHOWN} most frequent per direction; the table below lists all {len(freq)}. (A different "
        "list from the top genes of the Perturb page and Enrichment, which are ranked by mean P.)"
    )
    R.show_chart(
        charts.gene_frequency_chart(shown), f"gene-frequency-{bundle.name}", key="freq_chart"
    )
    R.show_table(
        freq,
        f"gene-frequency-{bundle.name}",
        key="freq_table",
        index=False,
        width="stretch",
        height=240,
    )

c = st.columns(3)
if src.labels is not None and len(set(src.labels.tolist())) >= 1:
    with R.guard("Counting the unique genes failed"):
        uniq = unique_top_genes(
            src.P,
            src.labels,
            src.genes,
            k=k,
            seed=int(st.session_state.get(S.SEL_SEED, 0)),
            exclude=bundle.target,
        )
    c[0].metric("Source classes (one random sample each)", uniq["n_classes"])
    c[1].metric(f"Unique up genes (of {uniq['n_classes'] * k} picks)", uniq["up"])
    c[2].metric(f"Unique down genes (of {uniq['n_classes'] * k} picks)", uniq["down"])
    st.caption(
        "The paper's consistency measure: few unique genes mean every source class is moved with the same genes."
    )
else:
    st.info("Unique-gene counts need the samples' classes.")

# ----------------------------------------------------------------------------- baselines

st.subheader("TSPG vs mean shift vs differential expression")
ks = tuple(sorted({10, k, 50}))
choices = source_choices(src.labels, bundle.target)
if st.session_state.get(S.GENES_SOURCE) not in choices:
    S.note_dropped(
        S.GENES_SOURCE, [st.session_state.get(S.GENES_SOURCE)], "source class not in the selection"
    )
    st.session_state[S.GENES_SOURCE] = S.ALL_SOURCES
n_of = pd.Series(src.labels).value_counts().to_dict() if src.labels is not None else {}
st.columns([1, 2])[0].selectbox(
    "Source class",
    choices,
    key=S.GENES_SOURCE,
    format_func=lambda c: c if c == S.ALL_SOURCES else f"{c} ({n_of.get(c, 0)} samples)",
    help="All sources: TSPG's genes over the whole selection against the target-vs-rest baselines. "
    "One class: TSPG's genes of that class's samples against differential expression of the target "
    "against that class alone and that class's mean shift.",
)
source = st.session_state[S.GENES_SOURCE]
base = None
try:
    base = L.baselines(bundle, data)
except UserError as err:  # the bundle's own data are needed for the baselines
    st.info(f"Baselines need the bundle's own training data: {err}")
except Exception as err:  # a bug: a message, and the rest of the page still works
    logging.getLogger("tspg.app").exception("fitting the baselines failed")
    st.error(
        f"Fitting the baselines failed: an internal error in tspg ({type(err).__name__}: {err})"
    )
comparison = None
if base is not None and src.labels is not None:
    with R.guard("Comparing per source class failed"):
        comparison = sources_of(src, base, k=k)
if base is not None and source == S.ALL_SOURCES:
    with R.guard("Comparing with the baselines failed"):
        overlap = selection_overlap(src.P, src.x, src.labels, src.genes, base, ks=ks)
        overlap["baseline"] = overlap["baseline"].str.replace("_", " ")
    R.show_table(
        overlap,
        f"overlap-{bundle.name}",
        key="overlap_table",
        index=False,
        width="stretch",
        height=38 + 35 * len(overlap),  # every row: the table is short
        column_config={
            "n_reference": st.column_config.NumberColumn(
                "TSPG genes", help="genes in TSPG's consensus top-k list"
            ),
            "n_baseline": st.column_config.NumberColumn(
                "baseline genes", help="genes in the baseline's top-k list"
            ),
            "overlap": st.column_config.NumberColumn("shared", help="genes in both lists"),
            "jaccard": st.column_config.NumberColumn(
                "Jaccard", format="%.2f", help="shared / genes in either list"
            ),
            "genes": st.column_config.TextColumn("shared genes"),
        },
    )
    st.caption(
        "Overlap of the selection's consensus top-k genes (per direction) with two baselines: the consensus top-k of "
        "the same samples' mean-shift perturbation (the change x + target class mean - their class mean, clipped to [0, 1], "
        "makes), and the top-k of a "
        "Wilcoxon test of the target class against the rest. Both baselines are fit on the training split."
    )
if comparison is not None and source == S.ALL_SOURCES:
    st.markdown("**Per source class**")
    R.show_table(
        source_table(comparison.sources),
        f"sources-{bundle.name}",
        key="sources_table",
        index=False,
        width="stretch",
    )
    st.caption(SOURCE_CAPTION.format(k=k, far=comparison.far))
elif comparison is not None:
    view = source_view(comparison, source)
    R.show_table(
        view["summary"],
        f"source-{bundle.name}-{source}",
        key="source_summary",
        index=False,
        width="stretch",
    )
    st.caption(SOURCE_CAPTION.format(k=k, far=comparison.far))
    if view["note"]:
        hint = "; pick more of its samples on the Perturb page" if view["row"]["n"] < 2 else ""
        st.info(f"{source}: {view['note']}{hint}.")
    else:
        st.markdown(f"**TSPG's genes for {source}**")
        R.show_table(
            view["tspg"],
            f"tspg-genes-{bundle.name}-{source}",
            key="source_tspg_table",
            index=False,
            width="stretch",
            column_config=GENE_COLUMNS,
        )
        st.markdown(f"**Genes the baselines rank high for {source} and TSPG does not**")
        if len(view["baselines"]):
            R.show_table(
                view["baselines"],
                f"baseline-genes-{bundle.name}-{source}",
                key="source_baseline_table",
                index=False,
                width="stretch",
                column_config=GENE_COLUMNS,
            )
        else:
            st.caption(
                f"None: every gene in the top {k} of both baselines is within TSPG's top {comparison.far}."
            )
elif src.labels is None:
    st.info("The per-source comparison needs the samples' classes.")

# ----------------------------------------------------------------------------- one gene

st.subheader("One gene")
cons = consensus_top(src.P, src.genes, k=1)
if st.session_state.get(S.GENE) not in bundle.genes:
    S.note_dropped(S.GENE, [st.session_state.get(S.GENE)], "gene not among the bundle's")
    st.session_state[S.GENE] = cons["up"][0]
st.columns([1, 2])[0].selectbox("Gene (type to search)", bundle.genes, key=S.GENE)
gene = st.session_state[S.GENE]
labels = data.labels(bundle.label_key)
if labels is None:
    st.info(f"{data.label} has no {bundle.label_key!r} column: the per-class views need labels.")
    S.stop()
with R.guard("Drawing the gene views failed"):
    ss = st.session_state
    classes = picked_map_classes(
        labels, bundle.target, pert.labels, ss.get(S.MAP_CLASSES), ss.get(S.MAP_AUTO)
    )
    seed = int(ss.get(S.MAP_SEED, 0))
    ref, ref_idx = L.reference_map(bundle, data, classes, seed)
    mkey = L.map_key(bundle, data, classes, seed)
    Xs = L.scaled_expression(bundle, data)
    _, coords = L.placed(ref, mkey, bundle, pert)
    frame = gene_frames(ref, coords, pert, Xs, ref_idx, labels, gene)
    st.caption(
        "On the map: scaled expression of the real samples (dots) and of the perturbed samples after perturbation (crosses)."
    )
    R.show_chart(charts.gene_map_chart(frame["map"], gene), f"map-{gene}", key="gene_map_chart")
    st.caption(
        "Per class: real samples (grey), and the perturbed selection after perturbation, by source class (red)."
    )
    R.show_chart(
        charts.gene_distribution_chart(frame["distribution"], gene),
        f"distribution-{gene}",
        key="gene_dist_chart",
    )

R.reproduce(
    {
        "bundle": bundle.name,
        "data": data.label,
        "selection": sel.params,
        "k": k,
        "ks": list(ks),
        "gene": gene,
        "source": source,
    },
    "# the same comparisons over the bundle's whole held-out split\n"
    + command(
        "tspg evaluate",
        shlex.quote(bundle.name),
        data_arg(bundle, data, optional=True),
        f"--k {k}",
        "--genes",
        models_arg(L.models_root()),
    ),
    python=(
        "from tspg.baselines import fit_baselines, source_comparison\n"
        "from tspg.perturbation import consensus, unique_top_genes\n"
        f"freq = consensus(P, genes, k={k})\n"
        f"uniq = unique_top_genes(P, labels, genes, k={k}, exclude={bundle.target!r})\n"
        "base = fit_baselines(adata, bundle)\n"
        f"by_source = source_comparison(P, X, labels, genes, base, target={bundle.target!r}, k={k})"
    ),
)
