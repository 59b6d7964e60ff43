"""What every page draws the same way: the error guard, charts and tables with downloads,
the "parameters and equivalent command" box, and the start of each analysis page."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
import streamlit as st

from .. import charts
from ..data import MAX_MISSING_SHARE
from ..errors import UserError
from . import loaders as L
from . import state as S
from .views import missing_genes_frame, verdict_rows

__all__ = [
    "frame_csv",
    "guard",
    "page_perturbation",
    "page_start",
    "prediction_columns",
    "reproduce",
    "selection_checks",
    "show_gene_match",
    "show_verdict",
    "show_chart",
    "show_table",
    "top_gene_columns",
]

logger = logging.getLogger("tspg.app")


@contextmanager
def guard(what: str, *, expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a backend step; on failure show a message on the page and stop it.

    A :class:`tspg.errors.UserError` (or one of ``expected``) is the user's to fix: its
    message. Anything else is a bug in tspg: said so, with the traceback in the server log;
    never a traceback on the page.
    """
    try:
        yield
    except L.Waiting as msg:
        st.info(str(msg))
        S.stop()
    except (UserError, *expected) as err:
        logger.info("%s: %s", what, err)
        st.error(f"{what}: {err}")
        S.stop()
    except Exception as err:
        logger.exception("%s: a bug in tspg", what)
        st.error(
            f"{what}: an internal error in tspg ({type(err).__name__}: {err}). "
            "Please report it; the details are in the server's log."
        )
        S.stop()


def page_start(title: str):
    """Every analysis page's start: the title, a place for the selection's verdict (filled
    by :func:`selection_checks`), the sidebar's bundle and data, and how the data's genes
    were matched.

    Stops the page with a message when there is no bundle or the data cannot be used.
    """
    st.title(title)
    st.session_state[S.VERDICT_BOX] = st.container()
    with guard("Loading the bundle failed"):
        bundle = L.current_bundle()
    if bundle is None:
        st.info("No trained generator yet: train the demo on the Home page.")
        S.stop()
    with guard("The chosen data cannot be used"):
        data = L.current_data(bundle)
        match = L.gene_match(bundle, data)
    show_gene_match(bundle, data, match)
    return bundle, data


def show_gene_match(bundle, data, match) -> None:
    """How the bundle's genes were found in the data: nothing when exactly; a note when
    matched ignoring case, by a ``var`` column or with a few filled in; an error (and the
    page stops) when too many are missing. Missing genes can be downloaded as CSV."""
    if match.exact:
        return
    too_many = match.missing_share > MAX_MISSING_SHARE
    if too_many:
        st.error(
            f"{data.label}: {match.n_missing} of the model's {match.n_genes} genes are missing "
            f"({100 * match.missing_share:.0f}%); at most {100 * MAX_MISSING_SHARE:g}% can be filled in. "
            "Download the list, add the genes to the file (or train a bundle on the genes it has), and upload it again.",
            icon=":material/error:",
        )
    else:
        st.info(f"Genes: {match.summary()}.", icon=":material/join:")
    if match.missing:
        st.download_button(
            f"The {match.n_missing} missing genes (CSV)",
            frame_csv(lambda: missing_genes_frame(match), index=False),
            file_name=f"missing-genes-{_slug(bundle.name)}.csv",
            mime="text/csv",
            key="dl_missing_genes",
            on_click="ignore",
            icon=":material/download:",
        )
    if too_many:
        S.stop()


def page_perturbation(bundle, data):
    """The Perturb page's sample selection and its perturbation (stops the page when it is
    empty), with the selection's verdict at the top of the page."""
    with guard("Selecting samples failed"):
        sel = L.current_selection(bundle, data)
    if not sel.samples:
        st.warning("No samples selected: pick some on the Perturb page.")
        S.stop()
    with guard("Perturbation failed"):
        pert = L.perturbation(bundle, data, sel.samples)
    selection_checks(bundle, data, pert)
    return sel, pert


def selection_checks(bundle, data, pert) -> None:
    """At the top of the page: the selection's verdict (the bundle's stored checks and this
    selection's: moved, data fit) with its reasons one click away, and a warning when the
    data's values fall outside the training range (other units?)."""
    box = st.session_state.get(S.VERDICT_BOX) or st.container()
    with guard("Grading the selection failed"):
        verdict = L.selection_verdict(bundle, data, pert)
    with box:
        scaling = pert.scaling
        if scaling is not None and scaling.warned:
            st.warning(
                f"{100 * scaling.outside_share:.0f}% of {data.label}'s values fall outside the range of the "
                f"bundle's training data and are clipped (most: gene {scaling.most_affected_gene}, "
                f"{100 * scaling.most_affected_share:.0f}% of its values). Are they in other units or "
                "normalised differently (e.g. z-scores instead of log counts)?",
                icon=":material/straighten:",
            )
        show_verdict(verdict, what="this selection")


LEVEL_STYLE = {
    "ok": ("green", ":material/check_circle:"),
    "caution": ("orange", ":material/warning:"),
    "fail": ("red", ":material/error:"),
}


def show_verdict(verdict: dict | None, *, what: str) -> None:
    """A verdict as a coloured badge and its summary, with every check (level, reason,
    figures and the samples they rest on) in an expander beneath."""
    if not verdict:
        st.caption(f"No verdict for {what}: the bundle was trained before verdicts were stored.")
        return
    color, icon = LEVEL_STYLE.get(verdict["level"], ("gray", ":material/help:"))
    row = st.container(horizontal=True, vertical_alignment="center", gap="small")
    row.badge(f"Verdict on {what}: {verdict['level']}", icon=icon, color=color)
    row.caption(verdict.get("summary", ""))
    with st.expander(f"Why: the {len(verdict.get('checks', {}))} checks behind this verdict"):
        st.dataframe(
            verdict_rows(verdict),
            hide_index=True,
            width="stretch",
            column_config={
                "level": st.column_config.TextColumn("level", width="small"),
                "check": st.column_config.TextColumn("check"),
                "reason": st.column_config.TextColumn("reason", width="large"),
                "figures": st.column_config.TextColumn(
                    "figures (n: samples they rest on)", width="large"
                ),
            },
        )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "chart"


def show_chart(
    chart, name: str, *, key: str | None = None, on_select=None, selection_mode=None, stretch=False
):
    """``st.altair_chart`` plus SVG and PNG downloads (rendered only when clicked).

    ``stretch``: the chart takes the page's width (its spec's width is "container");
    otherwise it is drawn at the builder's size.
    """
    kw = {"on_select": on_select, "selection_mode": selection_mode} if on_select else {}
    # Streamlit fits a chart into its given height (axes included) unless told to pad: small
    # charts (a few bars, a short heatmap) would be squashed. Drawn at the builder's size.
    # The spec is built here, unvalidated (charts.chart_spec), and drawn as Vega-Lite:
    # st.altair_chart would validate it against the schema on every rerun.
    if stretch:
        spec = charts.chart_spec(chart)
        result = st.vega_lite_chart(spec=spec, width="stretch", key=key, **kw)
    else:
        spec = charts.chart_spec(chart.properties(autosize="pad"))
        result = st.vega_lite_chart(spec=spec, width="content", key=key, **kw)
    fname = _slug(name)
    export = chart.properties(width=900) if stretch else chart  # a file has no container
    row = st.container(horizontal=True)
    row.download_button(
        "SVG",
        lambda: charts.chart_to_svg(export),
        file_name=f"{fname}.svg",
        mime="image/svg+xml",
        key=f"svg-{key or fname}",
        on_click="ignore",
        icon=":material/download:",
    )
    row.download_button(
        "PNG",
        lambda: charts.chart_to_png(export),
        file_name=f"{fname}.png",
        mime="image/png",
        key=f"png-{key or fname}",
        on_click="ignore",
        icon=":material/download:",
    )
    return result


def prediction_columns(target: str, label_key: str) -> dict:
    """Readable headers, with help, for :meth:`tspg.perturbation.Perturbation.predictions_df`."""
    num = st.column_config.NumberColumn
    text = st.column_config.TextColumn
    return {
        "label": text("class", help=f"The sample's class in the data (obs[{label_key!r}])."),
        "pred_before": text(
            "called before", help="The target model's class for the sample as it is."
        ),
        "prob_before": num(
            "p(called) before",
            format="%.3f",
            width="small",
            help="The target model's probability of the class it called, before perturbation.",
        ),
        "pred_after": text(
            "called after", help="The target model's class for the perturbed sample (x_adv)."
        ),
        "prob_after": num(
            "p(called) after",
            format="%.3f",
            width="small",
            help="The target model's probability of the class it called, after perturbation.",
        ),
        "prob_target_before": num(
            "p(target) before",
            format="%.3f",
            width="small",
            help=f"The target model's probability of the target class, {target}, before.",
        ),
        "prob_target_after": num(
            "p(target) after",
            format="%.3f",
            width="small",
            help=f"The target model's probability of the target class, {target}, after.",
        ),
    }


def top_gene_columns(k: int, n_samples: int, *, one: bool) -> dict:
    """Readable headers, with help, for :func:`tspg.ranking.rank_genes`' columns."""
    num = st.column_config.NumberColumn
    return {
        "rank": num("rank", help="1 = the strongest of its direction", width="small"),
        "gene": st.column_config.TextColumn("gene"),
        "mean_P": num(
            "P" if one else "mean P",
            format="%.3f",
            help="The sample's perturbation of the gene (scaled units)."
            if one
            else f"The gene's perturbation, averaged over the {n_samples} source samples: the ranking.",
        ),
        "n_top": num(
            f"in own top {k}",
            help=f"How many of the {n_samples} samples have this gene among their own top {k}.",
        ),
        "frequency": num(
            "share", format="percent", help=f"The same as a share of the {n_samples} samples."
        ),
        "support": st.column_config.TextColumn(
            "support",
            width="small",
            help=f"In how many of the seed ensemble's generators' own top {k} the gene is. "
            "A gene in every one (3/3) is kept by a rerun 98% of the time on the demo; "
            "one below, 58-76%.",
        ),
    }


@st.cache_data(show_spinner=False, max_entries=64)
def _csv(df: pd.DataFrame, index: bool) -> bytes:
    return df.to_csv(index=index).encode()


def show_table(
    df: pd.DataFrame, name: str, *, key: str | None = None, index: bool = True, **kw
) -> None:
    """``st.dataframe`` plus a CSV download; ``index=False`` leaves the index out of both."""
    if not index:
        kw.setdefault("hide_index", True)
    st.dataframe(df, **kw)
    st.download_button(
        "CSV",
        _csv(df, index),
        file_name=f"{_slug(name)}.csv",
        mime="text/csv",
        key=f"csv-{key or _slug(name)}",
        on_click="ignore",
        icon=":material/download:",
    )


def frame_csv(make: Callable[[], pd.DataFrame], *, index: bool = True) -> Callable[[], bytes]:
    """A callable for a deferred CSV download of the frame ``make()`` builds."""
    return lambda: make().to_csv(index=index).encode()


def reproduce(params: dict, command: str, *, python: str | None = None) -> None:
    """The page's parameters and the equivalent command, in a closed expander (long lists of
    samples or genes start folded; long commands wrap)."""
    with st.expander("Parameters and the equivalent command"):
        st.json(params, expanded=1)
        st.code(command, language="bash", wrap_lines=True)
        if python:
            st.code(python, language="python", wrap_lines=True)
