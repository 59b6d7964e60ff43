"""Altair chart builders: tidy (long-form) frames in, ``alt.Chart`` out. No Streamlit here.

Where a chart needs a particular frame, a ``*_frame`` builder sits next to it. Every
encoding names its type explicitly, so the charts do not depend on dtype inference.

Frames over Altair's 5,000-row check are embedded as inline values (``alt.InlineData``),
so ``chart.to_dict()``, ``st.altair_chart`` and the exports work for them without touching
Altair's global data-transformer settings (which would leak between app sessions).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import altair as alt
import numpy as np
import pandas as pd

from .ranking import rank_genes

__all__ = [
    "DIRECTION_COLORS",
    "DIRECTIONS",
    "DIVERGING_RANGE",
    "EXPRESSION_SCHEME",
    "GENE_LABEL_LIMIT",
    "HEATMAP_COLUMNS",
    "KINDS",
    "KIND_SELECTION",
    "MAP_KIND_LABELS",
    "LEGEND_SELECTION",
    "MAX_ROWS",
    "ROW_HEIGHT",
    "TERM_LABEL_LIMIT",
    "SWEEP_COLORS",
    "SWEEP_SELECTION",
    "VERDICT_COLORS",
    "VERDICT_LEVELS",
    "accuracy_by_source_chart",
    "accuracy_frame",
    "chart_spec",
    "chart_to_png",
    "chart_to_svg",
    "enrichment_chart",
    "gene_distribution_chart",
    "gene_distribution_frame",
    "gene_frequency_chart",
    "gene_map_chart",
    "heatmap_chart",
    "heatmap_frame",
    "heatmap_p_scale",
    "heatmap_row_height",
    "loss_chart",
    "loss_frame",
    "map_chart",
    "recurring_genes_frame",
    "sweep_frame",
    "sweep_heatmap_chart",
    "sweep_target_chart",
]

logger = logging.getLogger(__name__)

HEATMAP_COLUMNS = ["x", "P", "x_adv", "target mean"]
KINDS = ["real", "perturbed"]
DIRECTIONS = ["up", "down"]
# blue - white - red for P (down - none - up), as in the paper's Fig. 2
DIVERGING_RANGE = ["#2166ac", "#f7f7f7", "#b2182b"]
DIRECTION_COLORS = {"up": "#b2182b", "down": "#2166ac"}
EXPRESSION_SCHEME = "viridis"
MAX_ROWS = 5000  # Altair's default check; bigger frames go inline
LEGEND_SELECTION = "legend_pick"
ROW_HEIGHT = 18  # pixels per labelled row (heatmap, gene and term bars): every label readable
GENE_LABEL_LIMIT = 200  # pixels of a gene label before it is cut with an ellipsis
TERM_LABEL_LIMIT = 520  # enrichment terms are long ("... (GO:0002250)"): room for most of them


# --------------------------------------------------------------------------- helpers


def _data(frame: pd.DataFrame):
    """A frame as chart data: the frame itself, or inline JSON values above ``MAX_ROWS``."""
    frame = pd.DataFrame(frame)
    if len(frame) <= MAX_ROWS:
        return frame
    return alt.InlineData(values=_records(frame))


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe records (NaN -> null, numpy scalars -> Python, categories -> strings)."""
    return json.loads(frame.to_json(orient="records", double_precision=10))


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what}: the frame lacks column(s) {', '.join(missing)} (has {', '.join(map(str, frame.columns))})"
        )
    return frame


def _as_1d(values, n: int | None, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(
            f"{name}: expected one value per gene (1-d), got shape {a.shape}; pass means for a selection"
        )
    if n is not None and len(a) != n:
        raise ValueError(f"{name}: {len(a)} values for {n} genes")
    return a


def _title(title) -> dict:
    """``title=...`` for ``.properties`` only when there is one (Undefined fails validation)."""
    return {"title": title} if title else {}


def _row_axis(label_limit: int = GENE_LABEL_LIMIT) -> alt.Axis:
    """A y axis of one labelled row per item: no label is hidden for overlap (Vega's default
    drops every other label when rows are close), long labels cut at ``label_limit`` px."""
    return alt.Axis(labelOverlap=False, labelLimit=label_limit, labelPadding=4)


def _symmetric_max(values) -> float:
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    m = float(v.max()) if v.size else 0.0
    return m if m > 0 else 1.0


# --------------------------------------------------------------------------- heatmap (Fig. 2 right)


def heatmap_frame(genes, x, P, x_adv, target_mean, *, n_genes: int | None = None) -> pd.DataFrame:
    """Long frame for :func:`heatmap_chart`: one row per gene and column.

    Parameters
    ----------
    genes
        Gene names.
    x, P, x_adv, target_mean
        One value per gene (1-d): a sample's scaled expression, its perturbation, the
        perturbed sample and the target class's mean. For a selection pass the means.
    n_genes
        The top ``n_genes`` genes per direction, ranked by P (:func:`tspg.ranking.rank_genes`,
        the ranking every top-gene list uses). None: every gene, those with P >= 0 as up.

    Returns
    -------
    DataFrame with columns ``gene``, ``column`` (one of ``x``, ``P``, ``x_adv``,
    ``target mean``), ``value``, ``direction`` (``up``/``down``) and ``rank`` (1 = the
    strongest of its direction), up genes first, each direction in rank order, then by column.
    """
    genes = [str(g) for g in genes]
    n = len(genes)
    cols = {
        "x": _as_1d(x, n, "x"),
        "P": _as_1d(P, n, "P"),
        "x_adv": _as_1d(x_adv, n, "x_adv"),
        "target mean": _as_1d(target_mean, n, "target_mean"),
    }
    if n_genes is not None and n_genes < 1:
        raise ValueError("n_genes must be at least 1")
    ranked = rank_genes(cols["P"], genes, k=n_genes)
    pos = {g: i for i, g in enumerate(genes)}
    idx = np.array([pos[g] for g in ranked["gene"]], dtype=int)
    wide = pd.DataFrame(
        {
            "gene": ranked["gene"].to_numpy(dtype=object),
            "direction": ranked["direction"].to_numpy(dtype=object),
            "rank": ranked["rank"].to_numpy(),
            **{k: v[idx] for k, v in cols.items()},
        }
    )
    wide["order"] = np.arange(len(wide))
    long = wide.melt(
        id_vars=["gene", "direction", "rank", "order"],
        value_vars=HEATMAP_COLUMNS,
        var_name="column",
        value_name="value",
    )
    long["column"] = pd.Categorical(long["column"], categories=HEATMAP_COLUMNS)
    long = long.sort_values(["order", "column"], kind="stable").reset_index(drop=True)
    long["column"] = long["column"].astype(str)
    return long[["gene", "column", "value", "direction", "rank"]]


def heatmap_p_scale(values) -> alt.Scale:
    """The heatmap's P colours: blue - white - red, symmetric around 0 at the largest |P| of
    the view, on a square-root (sign-preserving) scale so that small P (e.g. down genes at
    a quarter of the largest up P) are still clearly coloured."""
    m = _symmetric_max(values)
    return alt.Scale(
        type="pow", exponent=0.5, domain=[-m, 0.0, m], range=DIVERGING_RANGE, clamp=True
    )


def heatmap_row_height(n_genes: int) -> int:
    """Pixels per gene row: ``ROW_HEIGHT`` up to 40 genes per direction, 13 above (100 genes
    a direction is then ~1,300 px tall, both directions side by side)."""
    return ROW_HEIGHT if n_genes <= 40 else 13


def heatmap_chart(
    frame: pd.DataFrame,
    *,
    title: str = "",
    subtitle: str = "",
    row_height: int | None = None,
    column_width: int = 56,
) -> alt.HConcatChart:
    """The paper's Fig. 2 (right): genes (rows, in rank order) x columns x, P, x_adv, target mean.

    Up genes and down genes are two panels side by side, each headed by what it holds; the
    legends sit once, at the top right. P has its own diverging scale
    (:func:`heatmap_p_scale`: symmetric at the view's largest |P|); the three expression
    columns share one sequential scale. Hover shows gene, direction, rank, column and value.
    Every gene is labelled: ``row_height`` pixels per row (default
    :func:`heatmap_row_height`), no label dropped for overlap.
    """
    frame = _require(
        pd.DataFrame(frame), ["gene", "column", "value", "direction", "rank"], "heatmap_chart"
    )
    per_direction = int(frame.groupby("direction")["gene"].nunique().max()) if len(frame) else 1
    row_height = row_height or heatmap_row_height(per_direction)
    p_values = frame.loc[frame["column"] == "P", "value"]
    m = _symmetric_max(p_values)
    expr = frame.loc[frame["column"] != "P", "value"].to_numpy(dtype=np.float64)
    expr = expr[np.isfinite(expr)]
    lo = min(0.0, float(expr.min())) if expr.size else 0.0
    hi = max(1.0, float(expr.max())) if expr.size else 1.0
    tooltip = [
        alt.Tooltip("gene:N", title="gene"),
        alt.Tooltip("direction:N", title="direction"),
        alt.Tooltip("rank:Q", title="rank"),
        alt.Tooltip("column:N", title="column"),
        alt.Tooltip("value:Q", title="value", format=".3f"),
    ]
    y = alt.Y(
        "gene:N",
        sort=alt.EncodingSortField("rank", op="min", order="ascending"),
        title=None,
        axis=alt.Axis(
            labelOverlap=False,
            labelLimit=GENE_LABEL_LIMIT,
            labelPadding=4,
            labelFontSize=11 if row_height >= ROW_HEIGHT else 10,
        ),
    )
    legend = dict(orient="right", direction="vertical", offset=12)
    headers = {"up": "up: most positive P", "down": "down: most negative P"}
    shown = [d for d in DIRECTIONS if d in set(frame["direction"])]
    panels = []
    for d in shown:
        show = d == shown[-1]  # the legends once, at the top right
        x = alt.X(
            "column:N",
            sort=HEATMAP_COLUMNS,
            scale=alt.Scale(domain=HEATMAP_COLUMNS),
            title=headers[d],
            axis=alt.Axis(orient="top", labelAngle=0, titleFontSize=12, titleFontWeight="bold"),
        )
        base = alt.Chart().mark_rect().encode(x=x, y=y, tooltip=tooltip)
        # one view, two layers: P with its own diverging scale, the expression columns with
        # a shared sequential one (independent colour scales -> two legends)
        p_legend = alt.Legend(
            values=[-m, -m / 4, 0.0, m / 4, m], format=".2f", gradientLength=120, **legend
        )
        p_layer = base.transform_filter(alt.datum.column == "P").encode(
            color=alt.Color(
                "value:Q",
                scale=heatmap_p_scale(p_values),
                title="P",
                legend=p_legend if show else None,
            )
        )
        expr_layer = base.transform_filter(alt.datum.column != "P").encode(
            color=alt.Color(
                "value:Q",
                scale=alt.Scale(scheme=EXPRESSION_SCHEME, domain=[lo, hi]),
                title="expression (scaled)",
                legend=alt.Legend(gradientLength=80, **legend) if show else None,
            )
        )
        panels.append(
            alt.layer(expr_layer, p_layer)
            .transform_filter(alt.datum.direction == d)
            .resolve_scale(color="independent")
            .properties(width=column_width * len(HEATMAP_COLUMNS), height=alt.Step(row_height))
        )
    chart = alt.hconcat(*panels, data=_data(frame), spacing=40)
    if title:
        chart = chart.properties(
            title=alt.Title(title, subtitle=subtitle or alt.Undefined, anchor="start")
        )
    return chart


# --------------------------------------------------------------------------- t-SNE map (Fig. 2 left)


def _map_tooltip(frame: pd.DataFrame, extra: Sequence[alt.Tooltip] = ()) -> list:
    tips = [alt.Tooltip("sample:N"), alt.Tooltip("class:N")]
    if "predicted" in frame.columns:
        tips.append(alt.Tooltip("predicted:N", title="predicted class"))
    tips.append(alt.Tooltip("kind:N"))
    return tips + list(extra)


MAP_KIND_LABELS = {
    "real": "real samples",
    "before": "selected, before",
    "perturbed": "selected, after (perturbed)",
}
KIND_SELECTION = "kind_pick"


def _map_data(frame: pd.DataFrame, moves: bool) -> pd.DataFrame:
    """The chart's rows: the map frame, plus (``moves``) one ``before`` row per perturbed
    sample at its place before perturbation (``x_before``, ``y_before``)."""
    if not moves:
        return frame
    pert = frame[frame["kind"] == "perturbed"]
    before = pert.assign(x=pert["x_before"], y=pert["y_before"], kind="before")
    return pd.concat([frame, before], ignore_index=True)


def _map_layers(
    frame: pd.DataFrame, color, tooltip, *, params=(), opacity=None, moves: bool = False
) -> alt.LayerChart:
    """Real samples as filled circles; perturbed samples as larger crosses with a black
    outline; with ``moves``, each selected sample's place before perturbation as a hollow
    square joined to its cross by a line."""
    kinds = ["real", "before", "perturbed"] if moves else ["real", "perturbed"]
    shapes = {"real": "circle", "before": "square", "perturbed": "cross"}
    labels = " : ".join(f"datum.value == '{k}' ? '{MAP_KIND_LABELS[k]}'" for k in kinds)
    shape = alt.Shape(
        "kind:N",
        scale=alt.Scale(domain=kinds, range=[shapes[k] for k in kinds]),
        title="points",
        legend=alt.Legend(labelExpr=f"{labels} : datum.value", symbolStrokeColor="black"),
    )
    base_enc = dict(
        x=alt.X("x:Q", axis=None, title=None),
        y=alt.Y("y:Q", axis=None, title=None),
        color=color,
        shape=shape,
        tooltip=tooltip,
    )
    if opacity is not None:
        base_enc["opacity"] = opacity
    real = (
        alt.Chart()
        .transform_filter(alt.datum.kind == "real")
        .mark_point(filled=True, size=30)
        .encode(**base_enc)
    )
    if params:
        real = real.add_params(*params)
    layers = [real]
    if moves and (frame["kind"] == "perturbed").any():
        line_enc = {k: v for k, v in base_enc.items() if k not in ("shape", "x", "y")}
        layers.append(
            alt.Chart()
            .transform_filter(alt.datum.kind == "perturbed")
            .mark_rule(strokeWidth=1.2, strokeOpacity=0.75)
            .encode(
                x=alt.X("x_before:Q", axis=None, title=None),
                y=alt.Y("y_before:Q", axis=None, title=None),
                x2="x:Q",
                y2="y:Q",
                **line_enc,
            )
        )
        layers.append(
            alt.Chart()
            .transform_filter(alt.datum.kind == "before")
            .mark_point(filled=False, size=70, strokeWidth=1.8)
            .encode(**base_enc)
        )
    if (frame["kind"] == "perturbed").any():
        pert = (
            alt.Chart()
            .transform_filter(alt.datum.kind == "perturbed")
            .mark_point(filled=True, size=140, stroke="black", strokeWidth=1.0)
            .encode(**base_enc)
        )
        layers.append(pert)
    return alt.layer(*layers, data=_data(_map_data(frame, moves)))


def _own_legend(field: str) -> alt.LegendStreamBinding:
    """Bind a point selection to the legend of ``field`` only. With Vega-Lite's plain
    ``bind="legend"`` every click in the chart also re-sends each selection's last legend
    value, so with two legends a click on one brought back the other's earlier pick."""
    own = f"event.item && event.item.mark && indexof(event.item.mark.name, '{field}_legend') === 0"
    return alt.LegendStreamBinding(legend=f"click[{own}]")


def map_chart(
    frame: pd.DataFrame,
    *,
    color: Literal["class", "predicted"] = "class",
    highlight_gene: str | None = None,
    moves: bool = True,
    width: int | str = 520,
    height: int = 440,
    title: str = "",
) -> alt.LayerChart:
    """t-SNE map from :func:`tspg.embedding.map_frame`.

    Real samples are points coloured by ``color`` (their class, or the target model's
    prediction). Perturbed samples are larger crosses with a black outline, coloured the
    same way; with ``moves`` (and ``x_before``/``y_before`` in the frame) each one's place
    before perturbation is a hollow square joined to its cross by a line. Clicking a class
    in the colour legend highlights it, clicking an entry of the "sample" legend (real,
    before, after) isolates those points (``alt.selection_point`` bound to each legend; the
    others fade). Tooltip: sample, class, predicted class, kind. ``width="container"``
    fills the page's width. With ``highlight_gene``, the frame must carry a ``value``
    column and the map is coloured by that gene's expression instead (:func:`gene_map_chart`).
    """
    frame = _require(pd.DataFrame(frame), ["x", "y", "sample", "class", "kind"], "map_chart")
    if highlight_gene is not None:
        return gene_map_chart(frame, highlight_gene, width=width, height=height, title=title)
    if color not in frame.columns:
        raise ValueError(f"map_chart: cannot colour by {color!r}; the frame has no such column")
    moves = bool(moves and {"x_before", "y_before"} <= set(frame.columns))
    pick = alt.selection_point(fields=[color], bind=_own_legend(color), name=LEGEND_SELECTION)
    pick_kind = alt.selection_point(fields=["kind"], bind=_own_legend("kind"), name=KIND_SELECTION)
    domain = sorted(pd.unique(frame[color].dropna().astype(str)).tolist())
    col = alt.Color(
        f"{color}:N",
        title="predicted class" if color == "predicted" else "class",
        scale=alt.Scale(domain=domain, scheme="tableau10" if len(domain) <= 10 else "tableau20"),
        legend=alt.Legend(
            labelLimit=GENE_LABEL_LIMIT + 60
        ),  # whole class names ("CD8+/CD45RA+ Naive Cytotoxic")
    )
    opacity = alt.condition(pick & pick_kind, alt.value(0.9), alt.value(0.08))
    chart = _map_layers(
        frame, col, _map_tooltip(frame), params=[pick, pick_kind], opacity=opacity, moves=moves
    )
    return chart.properties(width=width, height=height, **_title(title))


def gene_map_chart(
    frame: pd.DataFrame, gene: str, *, width: int | str = 520, height: int = 440, title: str = ""
) -> alt.LayerChart:
    """The t-SNE map coloured by one gene's expression (frame: map frame + ``value`` column)."""
    frame = _require(
        pd.DataFrame(frame), ["x", "y", "sample", "class", "kind", "value"], "gene_map_chart"
    )
    col = alt.Color("value:Q", scale=alt.Scale(scheme=EXPRESSION_SCHEME), title=str(gene))
    tooltip = _map_tooltip(frame, [alt.Tooltip("value:Q", title=str(gene), format=".3f")])
    chart = _map_layers(frame, col, tooltip)
    return chart.properties(width=width, height=height, title=title or str(gene))


# --------------------------------------------------------------------------- training and accuracy


def loss_frame(history: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """Tidy loss history: ``epoch`` (from 1), ``loss`` (name), ``value``; all values kept."""
    rows = []
    for name, values in history.items():
        v = np.asarray(list(values), dtype=np.float64).ravel()
        rows.append(
            pd.DataFrame({"epoch": np.arange(1, len(v) + 1), "loss": str(name), "value": v})
        )
    if not rows:
        return pd.DataFrame(
            {
                "epoch": pd.Series(dtype=int),
                "loss": pd.Series(dtype=str),
                "value": pd.Series(dtype=float),
            }
        )
    return pd.concat(rows, ignore_index=True)


def loss_chart(
    history: Mapping[str, Sequence[float]],
    *,
    width: int = 230,
    height: int = 130,
    columns: int = 3,
    title: str = "",
) -> alt.FacetChart:
    """Loss per epoch: one small panel per loss term, each on its own linear y scale, so
    every value shows (a Carlini-Wagner term that reaches ``-kappa`` is negative; a log
    scale would hide it). Non-finite values are left out and the title says how many.
    """
    frame = loss_frame(history)
    keep = np.isfinite(frame["value"])
    dropped = int((~keep).sum())
    frame = frame[keep].reset_index(drop=True)
    order = list(dict.fromkeys(frame["loss"]))
    chart = (
        alt.Chart(_data(frame))
        .mark_line(point=alt.OverlayMarkDef(size=10))
        .encode(
            x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
            color=alt.Color("loss:N", legend=None, sort=order),
            tooltip=[
                alt.Tooltip("loss:N"),
                alt.Tooltip("epoch:Q"),
                alt.Tooltip("value:Q", format=".4g"),
            ],
        )
        .properties(width=width, height=height)
        .facet(
            facet=alt.Facet("loss:N", sort=order, title=None, header=alt.Header(labelFontSize=12)),
            columns=columns,
        )
        .resolve_scale(y="independent")
    )
    subtitle = f"{dropped} non-finite value(s) not shown" if dropped else alt.Undefined
    return chart.properties(title=alt.Title(title or "training loss", subtitle=subtitle))


def accuracy_frame(per_source: Mapping[str, float]) -> pd.DataFrame:
    """``source`` (class), ``accuracy``: one row per source class, highest first."""
    frame = pd.DataFrame(
        {
            "source": [str(k) for k in per_source],
            "accuracy": [float(v) for v in per_source.values()],
        }
    )
    return frame.sort_values(
        ["accuracy", "source"], ascending=[False, True], kind="stable"
    ).reset_index(drop=True)


def accuracy_by_source_chart(
    per_source: Mapping[str, float], *, width: int = 420, title: str = ""
) -> alt.LayerChart:
    """Perturbation accuracy per source class: horizontal bars on [0, 1], labelled in %."""
    frame = accuracy_frame(per_source)
    base = alt.Chart(_data(frame)).encode(
        y=alt.Y("source:N", sort=frame["source"].tolist(), title="source class", axis=_row_axis()),
        x=alt.X(
            "accuracy:Q",
            scale=alt.Scale(domain=[0, 1]),
            axis=alt.Axis(format="%"),
            title="perturbation accuracy",
        ),
        tooltip=[
            alt.Tooltip("source:N", title="source class"),
            alt.Tooltip("accuracy:Q", format=".1%"),
        ],
    )
    bars = base.mark_bar(color="#4c78a8")
    text = base.mark_text(align="left", dx=3).encode(text=alt.Text("accuracy:Q", format=".0%"))
    return alt.layer(bars, text).properties(
        width=width, height=alt.Step(ROW_HEIGHT), **_title(title)
    )


# --------------------------------------------------------------------------- genes


def gene_frequency_chart(
    frame: pd.DataFrame, *, width: int = 420, row_height: int = ROW_HEIGHT, title: str = ""
) -> alt.FacetChart:
    """How often each gene is among a sample's top genes (frame: ``gene``, ``direction``, ``frequency``).

    One panel per direction (up, down), each with its own genes, ``row_height`` pixels per
    gene and every gene labelled; bars sorted by frequency.
    """
    frame = _require(
        pd.DataFrame(frame), ["gene", "direction", "frequency"], "gene_frequency_chart"
    ).copy()
    frame["gene"] = frame["gene"].astype(str)
    frame = frame.sort_values(
        ["direction", "frequency", "gene"], ascending=[True, False, True], kind="stable"
    ).reset_index(drop=True)
    is_fraction = bool(len(frame)) and float(frame["frequency"].max()) <= 1.0
    x = alt.X(
        "frequency:Q",
        title="fraction of samples" if is_fraction else "samples",
        axis=alt.Axis(format="%") if is_fraction else alt.Undefined,
    )
    return (
        alt.Chart(_data(frame))
        .mark_bar()
        .encode(
            y=alt.Y(
                "gene:N",
                sort=alt.EncodingSortField("frequency", order="descending"),
                title=None,
                axis=_row_axis(),
            ),
            x=x,
            color=alt.Color(
                "direction:N",
                scale=alt.Scale(domain=DIRECTIONS, range=[DIRECTION_COLORS[d] for d in DIRECTIONS]),
                legend=None,
            ),
            tooltip=[
                alt.Tooltip("gene:N"),
                alt.Tooltip("direction:N"),
                alt.Tooltip("frequency:Q", format=".3g"),
            ],
        )
        .properties(width=width, height=alt.Step(row_height))
        .facet(row=alt.Row("direction:N", sort=DIRECTIONS, title=None, header=_direction_header()))
        .resolve_scale(y="independent")
        .properties(**_title(title))
    )


def _direction_header() -> alt.Header:
    """Facet headers "up genes" / "down genes", above each panel."""
    return alt.Header(
        labelExpr="datum.value + ' genes'",
        labelAngle=0,
        labelOrient="top",
        labelAnchor="start",
        labelFontWeight="bold",
        labelFontSize=12,
    )


def gene_distribution_frame(
    real_class, real_value, perturbed_class, perturbed_value
) -> pd.DataFrame:
    """Long frame for :func:`gene_distribution_chart`: one gene's values of real samples (by
    class) and of perturbed samples (by source class; ``unknown`` when ``perturbed_class`` is None).

    Returns
    -------
    DataFrame with columns ``class``, ``value``, ``kind`` (``real`` rows first, then ``perturbed``).
    """
    real_value = np.asarray(real_value, dtype=np.float64).reshape(-1)
    perturbed_value = np.asarray(perturbed_value, dtype=np.float64).reshape(-1)
    if perturbed_class is None:
        perturbed_class = np.full(len(perturbed_value), "unknown", dtype=object)
    parts = []
    for kind, cls, val in (
        ("real", real_class, real_value),
        ("perturbed", perturbed_class, perturbed_value),
    ):
        cls = np.asarray(cls, dtype=object).astype(str).reshape(-1)
        if len(cls) != len(val):
            raise ValueError(
                f"gene_distribution_frame: {len(cls)} {kind} classes for {len(val)} values"
            )
        parts.append(pd.DataFrame({"class": cls, "value": val, "kind": kind}))
    return pd.concat(parts, ignore_index=True)


def gene_distribution_chart(
    frame: pd.DataFrame, gene: str, *, column_width: int = 56, height: int = 260, title: str = ""
) -> alt.Chart:
    """Expression of one gene per class: a box per class for real samples, with the perturbed
    samples' values (grouped by source class) beside it; ``column_width`` pixels per class,
    every class labelled.

    Frame columns: ``class``, ``value``, ``kind`` (``real`` / ``perturbed``).
    """
    frame = _require(
        pd.DataFrame(frame), ["class", "value", "kind"], "gene_distribution_chart"
    ).copy()
    frame["class"] = frame["class"].astype(str)
    frame["kind"] = frame["kind"].astype(str)
    classes = sorted(frame["class"].unique().tolist())
    chart = (
        alt.Chart(_data(frame))
        .mark_boxplot(extent=1.5, size=12, outliers=alt.MarkConfig(size=8))
        .encode(
            x=alt.X(
                "class:N",
                sort=classes,
                title="class (perturbed: source class)",
                axis=alt.Axis(labelAngle=-40, labelOverlap=False, labelLimit=GENE_LABEL_LIMIT),
            ),
            xOffset=alt.XOffset("kind:N", sort=KINDS, scale=alt.Scale(domain=KINDS)),
            y=alt.Y("value:Q", title=f"{gene} expression"),
            color=alt.Color(
                "kind:N",
                scale=alt.Scale(domain=KINDS, range=["#9e9e9e", "#d62728"]),
                title="sample",
            ),
        )
    )
    return chart.properties(
        width=max(240, column_width * len(classes)), height=height, title=title or str(gene)
    )


def enrichment_chart(
    frame: pd.DataFrame,
    *,
    top: int = 10,
    q_threshold: float = 0.05,
    width: int = 320,
    row_height: int = ROW_HEIGHT,
    label_limit: int = TERM_LABEL_LIMIT,
    title: str = "",
) -> alt.FacetChart:
    """Bars of -log10(q) for the ``top`` terms (smallest q) of each direction, coloured by
    library, with a dashed rule at -log10(``q_threshold``).

    One panel per direction (``up genes`` above ``down genes``; a frame without a
    ``direction`` column is one panel, ``all genes``), each with its own terms, all labelled
    (``row_height`` pixels per term, labels cut at ``label_limit`` pixels). The panels share
    the x axis. Frame columns: ``library``, ``term``, ``q``, optionally ``direction``.
    """
    frame = _require(pd.DataFrame(frame), ["library", "term", "q"], "enrichment_chart").copy()
    if "direction" not in frame.columns:
        frame["direction"] = "all"
    frame["direction"] = frame["direction"].astype(str)
    frame = frame[np.isfinite(pd.to_numeric(frame["q"], errors="coerce"))]
    frame = (
        frame.sort_values(["q", "term"], kind="stable")
        .groupby("direction", sort=False)
        .head(top)
        .reset_index(drop=True)
    )
    frame["neg_log10_q"] = -np.log10(np.clip(frame["q"].to_numpy(dtype=np.float64), 1e-300, 1.0))
    frame["rank"] = frame.groupby("direction").cumcount()
    frame["label"] = frame["term"].astype(str)
    dup = frame.duplicated(
        ["direction", "label"], keep=False
    )  # one term from two libraries: say which
    frame.loc[dup, "label"] = (
        frame.loc[dup, "term"].astype(str) + " (" + frame.loc[dup, "library"].astype(str) + ")"
    )
    frame["threshold"] = -np.log10(q_threshold)
    frame = frame[
        ["direction", "library", "term", "q", "neg_log10_q", "rank", "label", "threshold"]
    ]
    directions = [d for d in [*DIRECTIONS, "all"] if d in set(frame["direction"])]
    directions += sorted(set(frame["direction"]) - set(directions))
    bars = (
        alt.Chart()
        .mark_bar()
        .encode(
            y=alt.Y(
                "label:N",
                sort=alt.EncodingSortField("rank", op="min", order="ascending"),
                title=None,
                axis=_row_axis(label_limit),
            ),
            x=alt.X("neg_log10_q:Q", title="-log10(q)"),
            color=alt.Color(
                "library:N",
                title="library",
                legend=alt.Legend(orient="bottom", columns=1, labelLimit=label_limit),
            ),
            tooltip=[
                alt.Tooltip("term:N"),
                alt.Tooltip("library:N"),
                alt.Tooltip("direction:N"),
                alt.Tooltip("q:Q", format=".3g"),
            ],
        )
    )
    rule = (
        alt.Chart()
        .mark_rule(color="black", strokeDash=[4, 3])
        .encode(
            x=alt.X("max(threshold):Q"),
            tooltip=[
                alt.Tooltip("max(threshold):Q", title=f"-log10(q = {q_threshold:g})", format=".2f")
            ],
        )
    )
    return (
        alt.layer(bars, rule, data=_data(frame))
        .properties(width=width, height=alt.Step(row_height))
        .facet(row=alt.Row("direction:N", sort=directions, title=None, header=_direction_header()))
        .resolve_scale(y="independent")
        .properties(**_title(title))
    )


# --------------------------------------------------------------------------- sweeps (paper's Table 1)

VERDICT_LEVELS = ["ok", "caution", "fail", "failed", "none"]
VERDICT_COLORS = ["#2e7d32", "#f0a020", "#c62828", "#6d6d6d", "#c8c8c8"]
SWEEP_COLORS = {
    "accuracy": "perturbation accuracy",
    "verdict": "verdict",
    "e_distance": "energy distance to the real target",
}
SWEEP_SELECTION = "sweep_pick"


def sweep_frame(results: pd.DataFrame) -> pd.DataFrame:
    """A sweep's results (:func:`tspg.sweep.read_results`) for the charts: ``gene_set``,
    ``target``, ``bundle``, ``status``, ``accuracy`` (perturbation accuracy of the held-out
    non-target samples), ``verdict`` (``failed`` for a task that failed, ``none`` when the
    bundle has none), ``e_distance`` (of x_adv to the real target), ``e_distance_unperturbed``,
    ``genes`` and ``error``."""
    r = _require(pd.DataFrame(results), ["gene_set", "target", "bundle", "status"], "sweep_frame")
    verdict = r.get("verdict", pd.Series("", index=r.index)).fillna("").astype(str)
    verdict = verdict.where(verdict != "", "none").where(r["status"] != "failed", "failed")
    num = lambda c: pd.to_numeric(r.get(c, pd.Series(np.nan, index=r.index)), errors="coerce")  # noqa: E731
    return pd.DataFrame(
        {
            "gene_set": r["gene_set"].astype(str),
            "target": r["target"].astype(str),
            "bundle": r["bundle"].astype(str),
            "status": r["status"].astype(str),
            "accuracy": num("perturbation_accuracy_non_target"),
            "verdict": verdict,
            "e_distance": num("e_distance"),
            "e_distance_unperturbed": num("e_distance_unperturbed"),
            "genes": num("genes"),
            "error": r.get("error", pd.Series("", index=r.index)).fillna("").astype(str),
        }
    )


def sweep_heatmap_chart(
    results: pd.DataFrame,
    *,
    color: Literal["accuracy", "verdict", "e_distance"] = "accuracy",
    row_height: int = ROW_HEIGHT,
    column_width: int = 56,
    title: str = "",
) -> alt.Chart:
    """Gene sets (rows) x targets (columns) of a sweep, coloured by the perturbation
    accuracy, the verdict or the energy distance to the real target (lower is nearer).

    Rows are sorted by mean accuracy (best first). A click on a cell selects its bundle
    (point selection :data:`SWEEP_SELECTION` on ``bundle``: the dashboard opens it). Tooltip:
    gene set, target, bundle, accuracy, verdict, energy distances, status, error.
    """
    frame = sweep_frame(results)
    if color not in SWEEP_COLORS:
        raise ValueError(f"sweep_heatmap_chart: colour by one of {', '.join(SWEEP_COLORS)}")
    order = frame.groupby("gene_set")["accuracy"].mean().sort_values(ascending=False, kind="stable")
    rows = order.index.tolist() + sorted(set(frame["gene_set"]) - set(order.index))
    targets = sorted(frame["target"].unique().tolist())
    if color == "verdict":
        col = alt.Color(
            "verdict:N",
            scale=alt.Scale(domain=VERDICT_LEVELS, range=VERDICT_COLORS),
            title="verdict",
        )
    elif color == "accuracy":
        col = alt.Color(
            "accuracy:Q",
            scale=alt.Scale(scheme="viridis", domain=[0, 1]),
            title="perturbation accuracy",
            legend=alt.Legend(format="%"),
        )
    else:
        col = alt.Color(
            "e_distance:Q",
            scale=alt.Scale(scheme="viridis", reverse=True),
            title=["energy distance", "to the real target", "(lower: nearer)"],
        )
    pick = alt.selection_point(fields=["bundle"], name=SWEEP_SELECTION, on="click")
    chart = (
        alt.Chart(_data(frame))
        .mark_rect(stroke="white", strokeWidth=1)
        .encode(
            x=alt.X(
                "target:N",
                sort=targets,
                title="target",
                axis=alt.Axis(orient="top", labelAngle=-35, labelLimit=GENE_LABEL_LIMIT),
            ),
            y=alt.Y("gene_set:N", sort=rows, title="gene set", axis=_row_axis()),
            color=col,
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.35)),
            tooltip=[
                alt.Tooltip("gene_set:N", title="gene set"),
                alt.Tooltip("target:N"),
                alt.Tooltip("bundle:N"),
                alt.Tooltip("accuracy:Q", title="perturbation accuracy", format=".1%"),
                alt.Tooltip("verdict:N"),
                alt.Tooltip("e_distance:Q", title="energy distance (x_adv)", format=".3g"),
                alt.Tooltip(
                    "e_distance_unperturbed:Q", title="energy distance (before)", format=".3g"
                ),
                alt.Tooltip("status:N"),
                alt.Tooltip("error:N"),
            ],
        )
        .add_params(pick)
        .properties(width=max(160, column_width * len(targets)), height=alt.Step(row_height))
    )
    return chart.properties(**_title(title))


def sweep_target_chart(
    results: pd.DataFrame, target: str, *, width: int = 360, title: str = ""
) -> alt.LayerChart:
    """The paper's Table 1 for one target: each gene set's perturbation accuracy as a
    horizontal bar, best first, coloured by the bundle's verdict."""
    frame = sweep_frame(results)
    frame = frame[frame["target"] == str(target)].sort_values(
        ["accuracy", "gene_set"], ascending=[False, True], na_position="last", kind="stable"
    )
    base = alt.Chart(_data(frame)).encode(
        y=alt.Y("gene_set:N", sort=frame["gene_set"].tolist(), title="gene set", axis=_row_axis()),
        x=alt.X(
            "accuracy:Q",
            scale=alt.Scale(domain=[0, 1]),
            axis=alt.Axis(format="%"),
            title=f"perturbation accuracy towards {target}",
        ),
        tooltip=[
            alt.Tooltip("gene_set:N", title="gene set"),
            alt.Tooltip("accuracy:Q", title="perturbation accuracy", format=".1%"),
            alt.Tooltip("verdict:N"),
            alt.Tooltip("genes:Q"),
            alt.Tooltip("bundle:N"),
        ],
    )
    bars = base.mark_bar().encode(
        color=alt.Color(
            "verdict:N",
            scale=alt.Scale(domain=VERDICT_LEVELS, range=VERDICT_COLORS),
            title="verdict",
        )
    )
    text = base.mark_text(align="left", dx=3).encode(text=alt.Text("accuracy:Q", format=".0%"))
    return alt.layer(bars, text).properties(
        width=width, height=alt.Step(ROW_HEIGHT), **_title(title)
    )


def recurring_genes_frame(genes: pd.DataFrame, target: str) -> pd.DataFrame:
    """How many gene sets have each gene among their top genes for ``target``, per direction
    (frame of :func:`tspg.sweep.sweep_genes_df`): ``gene``, ``direction``, ``gene_sets``
    (count), ``frequency`` (share of the target's gene sets), ``sets`` (their names);
    sorted most recurring first."""
    g = _require(
        pd.DataFrame(genes), ["gene_set", "target", "direction", "gene"], "recurring_genes_frame"
    )
    g = g[g["target"] == str(target)]
    n_sets = max(g["gene_set"].nunique(), 1)
    out = (
        g.groupby(["direction", "gene"], sort=False)["gene_set"]
        .agg(gene_sets="nunique", sets=lambda s: ", ".join(sorted(set(s))))
        .reset_index()
    )
    out["frequency"] = out["gene_sets"] / n_sets
    out["direction"] = pd.Categorical(out["direction"], categories=DIRECTIONS)
    out = out.sort_values(
        ["direction", "gene_sets", "gene"], ascending=[True, False, True], kind="stable"
    )
    out["direction"] = out["direction"].astype(str)
    return out[["gene", "direction", "gene_sets", "frequency", "sets"]].reset_index(drop=True)


# --------------------------------------------------------------------------- export


def _spec(chart: alt.TopLevelMixin) -> dict:
    try:
        return chart.to_dict()
    except alt.MaxRowsError:
        # a chart built outside this module with a big DataFrame
        with alt.data_transformers.disable_max_rows():
            return chart.to_dict()


def chart_spec(chart: alt.TopLevelMixin) -> dict:
    """The chart's Vega-Lite spec for drawing (the dashboard): without Altair's schema
    validation (the builders here are checked by the tests; validating costs ~50 ms a chart)
    and without the default theme's 300 x 300 view size."""
    spec = chart.to_dict(validate=False)
    view = spec.get("config", {}).get("view", {})
    for key in ("continuousWidth", "continuousHeight"):
        view.pop(key, None)
    if "view" in spec.get("config", {}) and not view:
        del spec["config"]["view"]
    if "config" in spec and not spec["config"]:
        del spec["config"]
    return spec


def _vl_version() -> str | None:
    import vl_convert as vlc

    version = "_".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return version if version.replace("_", ".") in vlc.get_vegalite_versions() else None


def chart_to_svg(chart: alt.TopLevelMixin) -> str:
    """The chart as an SVG document (through vl-convert; no browser needed)."""
    import vl_convert as vlc

    return vlc.vegalite_to_svg(_spec(chart), vl_version=_vl_version())


def chart_to_png(chart: alt.TopLevelMixin, scale: float = 2) -> bytes:
    """The chart as PNG bytes, ``scale`` times its size in pixels (through vl-convert)."""
    import vl_convert as vlc

    return vlc.vegalite_to_png(_spec(chart), vl_version=_vl_version(), scale=scale)
