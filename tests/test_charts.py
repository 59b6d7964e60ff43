"""Chart builders, checked through ``chart.to_dict()``: data, encodings, scales, params."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import pytest

from tspg import charts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ spec helpers


def to_spec(chart) -> dict:
    return chart.to_dict()


def frame_of(spec: dict, node: dict | None = None) -> pd.DataFrame:
    """The rows behind ``node`` (default: the top level): inline values or a named dataset."""
    data = (node if node is not None and "data" in node else spec)["data"]
    rows = data["values"] if "values" in data else spec["datasets"][data["name"]]
    return pd.DataFrame(rows)


def tooltip_fields(enc: dict) -> list[str]:
    tips = enc["tooltip"] if isinstance(enc["tooltip"], list) else [enc["tooltip"]]
    return [t["field"] for t in tips]


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def map_df(rng):
    n_real, n_new = 40, 6
    return pd.DataFrame(
        {
            "x": rng.normal(size=n_real + n_new),
            "y": rng.normal(size=n_real + n_new),
            "sample": [f"s{i}" for i in range(n_real + n_new)],
            "class": rng.choice(["alpha", "beta", "gamma"], n_real + n_new),
            "predicted": rng.choice(["alpha", "beta", "gamma"], n_real + n_new),
            "kind": ["real"] * n_real + ["perturbed"] * n_new,
        }
    )


# ------------------------------------------------------------------ heatmap


def test_heatmap_frame_ranked_by_P_in_two_directions_and_trimmed():
    genes = [f"G{i}" for i in range(8)]
    P = np.array([0.1, -0.5, 0.9, 0.0, -0.2, 0.4, -0.9, 0.3])
    x = np.linspace(0, 1, 8)
    f = charts.heatmap_frame(genes, x, P, np.clip(x + P, 0, 1), np.full(8, 0.5))
    assert list(f.columns) == ["gene", "column", "value", "direction", "rank"]
    assert len(f) == 8 * 4 and set(f["column"]) == set(charts.HEATMAP_COLUMNS)
    p_rows = f[f["column"] == "P"]
    up, down = p_rows[p_rows.direction == "up"], p_rows[p_rows.direction == "down"]
    assert up["gene"].tolist() == ["G2", "G5", "G7", "G0", "G3"]  # P >= 0, most positive first
    assert down["gene"].tolist() == ["G6", "G1", "G4"]  # most negative first
    assert up["rank"].tolist() == [1, 2, 3, 4, 5] and down["rank"].tolist() == [1, 2, 3]
    x_rows = f[f["column"] == "x"].set_index("gene")["value"]
    assert x_rows["G2"] == pytest.approx(x[2])
    small = charts.heatmap_frame(genes, x, P, x, x, n_genes=2)
    assert small["gene"].unique().tolist() == ["G2", "G5", "G6", "G1"]
    # the same lists as every other top-gene list (tspg.ranking)
    from tspg.ranking import rank_genes

    ranked = rank_genes(P, genes, k=2)
    assert small.drop_duplicates("gene")["gene"].tolist() == ranked["gene"].tolist()


def test_heatmap_frame_rejects_matrices():
    with pytest.raises(ValueError, match="pass means"):
        charts.heatmap_frame(["a", "b"], np.zeros((3, 2)), np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="3 values for 2 genes"):
        charts.heatmap_frame(["a", "b"], np.zeros(3), np.zeros(2), np.zeros(2), np.zeros(2))


def _heat_panels(spec: dict) -> dict[str, dict]:
    """The heatmap's panels by their header's direction: {"up": panel, "down": panel}."""
    return {p["layer"][0]["encoding"]["x"]["title"].split(":")[0]: p for p in spec["hconcat"]}


def test_heatmap_chart_blocks_scales_sort_and_tooltip():
    genes = ["A", "B", "C", "D"]
    P = np.array([0.2, -0.7, 0.5, -0.1])
    f = charts.heatmap_frame(
        genes, [0.1, 0.9, 0.3, 0.5], P, [0.3, 0.2, 0.8, 0.6], [0.4, 0.1, 0.9, 0.5], n_genes=2
    )
    spec = to_spec(charts.heatmap_chart(f, title="sample s1", subtitle="called a before"))
    assert spec["title"]["text"] == "sample s1" and spec["title"]["subtitle"] == "called a before"
    panels = _heat_panels(spec)
    assert list(panels) == ["up", "down"]  # side by side, each headed by its direction
    for d, panel in panels.items():
        assert {"filter": f"(datum.direction === '{d}')"} in panel["transform"]
        assert panel["resolve"]["scale"]["color"] == "independent"
        assert panel["height"] == {"step": charts.ROW_HEIGHT} and charts.ROW_HEIGHT >= 18
        for layer in panel["layer"]:
            enc = layer["encoding"]
            assert enc["y"]["sort"] == {"field": "rank", "op": "min", "order": "ascending"}
            assert enc["y"]["axis"]["labelOverlap"] is False
            assert enc["x"]["sort"] == charts.HEATMAP_COLUMNS
            assert tooltip_fields(enc) == ["gene", "direction", "rank", "column", "value"]
            assert layer["mark"]["type"] == "rect"
    by_title = {layer["encoding"]["color"]["title"]: layer for layer in panels["up"]["layer"]}
    # P: blue-white-red, symmetric at the view's largest |P| (0.7), square-root scale
    p_scale = by_title["P"]["encoding"]["color"]["scale"]
    assert p_scale["domain"] == [-0.7, 0.0, 0.7] and p_scale["range"] == charts.DIVERGING_RANGE
    assert p_scale["type"] == "pow" and p_scale["exponent"] == 0.5
    expr_scale = by_title["expression (scaled)"]["encoding"]["color"]["scale"]
    assert expr_scale["scheme"] == charts.EXPRESSION_SCHEME and expr_scale["domain"] == [0.0, 1.0]
    assert {"filter": "(datum.column === 'P')"} in by_title["P"]["transform"]
    # the legends once (on the last panel), not repeated
    assert all(
        isinstance(layer["encoding"]["color"]["legend"], dict) for layer in panels["down"]["layer"]
    )
    assert all(layer["encoding"]["color"]["legend"] is None for layer in panels["up"]["layer"])
    assert len(frame_of(spec)) == 16


def test_heatmap_p_colours_are_symmetric_at_the_view():
    """The demo's case: up P to ~0.6, down to ~-0.16 (the browser test checks their colour)."""
    scale = charts.heatmap_p_scale([0.6, 0.3, -0.16, -0.35]).to_dict()
    assert scale["domain"] == [-0.6, 0.0, 0.6] and scale["clamp"] is True


def test_heatmap_rows_shrink_only_for_long_lists():
    assert charts.heatmap_row_height(20) == charts.ROW_HEIGHT
    assert charts.heatmap_row_height(100) * 100 < 1500  # 100 genes a direction: < 1,500 px


def test_heatmap_chart_all_zero_P_and_nan_target_mean():
    f = charts.heatmap_frame(["a", "b"], [0.1, 0.2], [0.0, 0.0], [0.1, 0.2], [np.nan, np.nan])
    spec = to_spec(charts.heatmap_chart(f))
    [panel] = spec["hconcat"]  # every P is 0: all "up"
    p_layer = [layer for layer in panel["layer"] if layer["encoding"]["color"]["title"] == "P"][0]
    assert p_layer["encoding"]["color"]["scale"]["domain"] == [-1.0, 0.0, 1.0]
    assert frame_of(spec)["value"].isna().sum() == 2


# ------------------------------------------------------------------ map


def test_map_chart_legend_selections_marks_and_tooltip(map_df):
    spec = to_spec(charts.map_chart(map_df))  # no before positions: no moves drawn
    assert len(frame_of(spec)) == len(map_df)
    real, pert = spec["layer"]
    params = {p["name"]: p for p in spec["params"]}  # lifted to the top, naming the view
    pick, kind = params[charts.LEGEND_SELECTION], params[charts.KIND_SELECTION]
    assert pick["views"] == kind["views"] == [real["name"]]
    assert pick["select"] == {"type": "point", "fields": ["class"]}
    assert kind["select"] == {"type": "point", "fields": ["kind"]}
    # each bound to clicks on its own legend only (not re-sent by clicks on the other one)
    assert "indexof(event.item.mark.name, 'class_legend') === 0" in pick["bind"]["legend"]
    assert "indexof(event.item.mark.name, 'kind_legend') === 0" in kind["bind"]["legend"]
    for layer in (real, pert):
        enc = layer["encoding"]
        assert enc["color"]["field"] == "class"
        assert enc["color"]["scale"]["domain"] == ["alpha", "beta", "gamma"]
        both = [c["param"] for c in enc["opacity"]["condition"]["test"]["and"]]
        assert both == [charts.LEGEND_SELECTION, charts.KIND_SELECTION]
        assert tooltip_fields(enc)[:3] == ["sample", "class", "predicted"]
        assert enc["shape"]["scale"]["domain"] == ["real", "perturbed"]
    assert {"filter": "(datum.kind === 'real')"} in real["transform"]
    assert {"filter": "(datum.kind === 'perturbed')"} in pert["transform"]
    assert pert["mark"]["stroke"] == "black" and pert["mark"]["size"] > real["mark"]["size"]


def test_map_chart_draws_each_move_from_before_to_after(map_df, rng):
    moved = map_df.copy()
    is_pert = moved["kind"] == "perturbed"
    moved["x_before"] = np.where(is_pert, rng.normal(size=len(moved)), np.nan)
    moved["y_before"] = np.where(is_pert, rng.normal(size=len(moved)), np.nan)
    spec = to_spec(charts.map_chart(moved, width="container"))
    assert spec["width"] == "container"  # the page's width
    real, lines, before, after = spec["layer"]
    assert lines["mark"]["type"] == "rule"
    enc = lines["encoding"]
    assert (enc["x"]["field"], enc["y"]["field"]) == ("x_before", "y_before")
    assert (enc["x2"]["field"], enc["y2"]["field"]) == ("x", "y")
    assert {"filter": "(datum.kind === 'perturbed')"} in lines["transform"]
    assert {"filter": "(datum.kind === 'before')"} in before["transform"]
    assert before["mark"]["filled"] is False and after["mark"]["stroke"] == "black"
    assert after["encoding"]["shape"]["scale"] == {
        "domain": ["real", "before", "perturbed"],
        "range": ["circle", "square", "cross"],
    }
    # the chart's rows: one "before" row per perturbed sample, at its place before
    rows = frame_of(spec)
    b = rows[rows["kind"] == "before"].set_index("sample")
    p = moved[is_pert].set_index("sample")
    assert len(b) == is_pert.sum()
    np.testing.assert_allclose(b.loc[p.index, "x"], p["x_before"])
    # moves switched off: no lines, no before points
    off = to_spec(charts.map_chart(moved, moves=False))
    assert [layer["mark"]["type"] for layer in off["layer"]] == ["point", "point"]


def test_map_chart_by_prediction_and_real_only(map_df):
    spec = to_spec(charts.map_chart(map_df[map_df["kind"] == "real"], color="predicted"))
    assert len(spec["layer"]) == 1  # no perturbed layer without perturbed samples
    assert spec["params"][0]["select"]["fields"] == ["predicted"]
    assert "predicted_legend" in spec["params"][0]["bind"]["legend"]
    assert spec["layer"][0]["encoding"]["color"]["field"] == "predicted"
    with pytest.raises(ValueError, match="lacks column"):
        charts.map_chart(map_df.drop(columns="kind"))


def test_gene_map_chart(map_df, rng):
    frame = map_df.assign(value=rng.random(len(map_df)))
    spec = to_spec(charts.gene_map_chart(frame, "CD14"))
    assert spec["title"] == "CD14"
    enc = spec["layer"][0]["encoding"]
    assert enc["color"] == {
        "field": "value",
        "type": "quantitative",
        "scale": {"scheme": charts.EXPRESSION_SCHEME},
        "title": "CD14",
    }
    assert "value" in tooltip_fields(enc)
    via_map = to_spec(charts.map_chart(frame, highlight_gene="CD14"))
    assert via_map["layer"][0]["encoding"]["color"]["field"] == "value"
    with pytest.raises(ValueError, match="value"):
        charts.gene_map_chart(map_df, "CD14")


def test_big_frame_over_altair_row_limit(rng):
    n = 7000
    big = pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "y": rng.normal(size=n),
            "sample": [f"s{i}" for i in range(n)],
            "class": rng.choice(list("abc"), n),
            "predicted": "a",
            "kind": ["real"] * (n - 10) + ["perturbed"] * 10,
        }
    )
    chart = charts.map_chart(big)
    spec = to_spec(chart)  # no MaxRowsError, and Altair's global settings untouched
    assert len(frame_of(spec)) == n
    assert alt.data_transformers.options.get("max_rows", 5000) == 5000
    with pytest.raises(alt.MaxRowsError):
        alt.Chart(big).mark_point().encode(x="x:Q").to_dict()
    assert charts.chart_to_svg(chart).lstrip().startswith("<svg")


# ------------------------------------------------------------------ training and accuracy


def test_loss_chart_shows_every_finite_value_one_linear_panel_per_loss():
    history = {"gan": [1.0, 0.5, 0.0, -0.1, 0.2], "adv": [2.0, float("nan"), -2.0]}
    frame = charts.loss_frame(history)
    assert list(frame.columns) == ["epoch", "loss", "value"] and len(frame) == 8
    assert frame.loc[frame["loss"] == "gan", "epoch"].tolist() == [1, 2, 3, 4, 5]
    spec = to_spec(charts.loss_chart(history))
    assert spec["facet"]["field"] == "loss" and spec["resolve"]["scale"]["y"] == "independent"
    enc = spec["spec"]["encoding"]
    assert "type" not in enc["y"]["scale"]  # linear: zero and negative values show
    assert enc["x"]["field"] == "epoch"
    shown = frame_of(spec)
    assert len(shown) == 7 and (shown["value"] <= 0).sum() == 3  # 0, -0.1 and -2 kept
    assert "1 non-finite" in spec["title"]["subtitle"]
    clean = to_spec(charts.loss_chart({"total": [3.0, 2.0]}))
    assert "subtitle" not in clean["title"]


def test_accuracy_by_source_chart():
    spec = to_spec(charts.accuracy_by_source_chart({"b": 0.5, "a": 0.9, "c": 1.0}))
    bars = spec["layer"][0]
    assert bars["encoding"]["x"]["scale"]["domain"] == [0, 1]
    assert bars["encoding"]["y"]["sort"] == ["c", "a", "b"]
    assert frame_of(spec).set_index("source")["accuracy"].to_dict() == {
        "c": 1.0,
        "a": 0.9,
        "b": 0.5,
    }
    assert bars["encoding"]["y"]["axis"]["labelOverlap"] is False and spec["height"] == {
        "step": charts.ROW_HEIGHT
    }


# ------------------------------------------------------------------ genes


def test_gene_frequency_chart():
    frame = pd.DataFrame(
        {
            "gene": ["a", "b", "c", "d"],
            "direction": ["up", "up", "down", "down"],
            "frequency": [0.25, 0.75, 1.0, 0.5],
        }
    )
    spec = to_spec(charts.gene_frequency_chart(frame))
    assert spec["facet"]["row"]["field"] == "direction"
    enc = spec["spec"]["encoding"]
    assert enc["x"]["field"] == "frequency" and enc["x"]["axis"]["format"] == "%"
    assert enc["y"]["sort"] == {"field": "frequency", "order": "descending"}
    assert len(frame_of(spec)) == 4
    # each panel its own genes, every one labelled on an 18-px row
    assert spec["resolve"]["scale"]["y"] == "independent"
    assert spec["spec"]["height"] == {"step": charts.ROW_HEIGHT}
    assert enc["y"]["axis"]["labelOverlap"] is False
    assert spec["facet"]["row"]["sort"] == ["up", "down"]


def test_gene_distribution_frame():
    f = charts.gene_distribution_frame(["a", "b", "a"], [0.1, 0.5, 0.2], ["b"], [0.9])
    assert list(f.columns) == ["class", "value", "kind"]
    assert f["kind"].tolist() == ["real"] * 3 + ["perturbed"] and f["class"].tolist() == [
        "a",
        "b",
        "a",
        "b",
    ]
    assert f["value"].tolist() == pytest.approx([0.1, 0.5, 0.2, 0.9])
    unknown = charts.gene_distribution_frame(["a"], [0.1], None, [0.3, 0.4])
    assert unknown.loc[unknown.kind == "perturbed", "class"].tolist() == ["unknown", "unknown"]
    with pytest.raises(ValueError, match="2 real classes for 1 values"):
        charts.gene_distribution_frame(["a", "b"], [0.1], None, [])


def test_gene_distribution_chart():
    frame = pd.DataFrame(
        {
            "class": ["a", "a", "b", "b", "a"],
            "value": [0.1, 0.2, 0.6, 0.7, 0.65],
            "kind": ["real"] * 4 + ["perturbed"],
        }
    )
    spec = to_spec(charts.gene_distribution_chart(frame, "CD14"))
    assert spec["mark"]["type"] == "boxplot"
    enc = spec["encoding"]
    assert enc["x"]["field"] == "class" and enc["xOffset"]["field"] == "kind"
    assert enc["y"]["field"] == "value" and enc["y"]["title"] == "CD14 expression"
    assert enc["color"]["scale"]["domain"] == ["real", "perturbed"]
    assert enc["x"]["axis"]["labelOverlap"] is False  # every class named


def test_enrichment_chart_top_terms_and_threshold():
    frame = pd.DataFrame(
        {
            "library": ["GO", "KEGG", "GO", "KEGG", "GO", "GO"],
            "term": ["t1", "t2", "t3", "t4", "t1", "a long term name (GO:0000001)"],
            "q": [1e-6, 0.2, 1e-3, 0.04, 0.01, 1e-4],
            "direction": ["up", "up", "up", "up", "up", "down"],
        }
    )
    spec = to_spec(charts.enrichment_chart(frame, top=3))
    # one panel per direction, up above down, each with its own terms
    assert spec["facet"]["row"]["field"] == "direction" and spec["facet"]["row"]["sort"] == [
        "up",
        "down",
    ]
    assert spec["resolve"]["scale"]["y"] == "independent"
    assert spec["spec"]["height"] == {"step": charts.ROW_HEIGHT}
    bars, rule = spec["spec"]["layer"]
    shown = frame_of(spec)
    up = shown[shown["direction"] == "up"].sort_values("rank")
    assert up["term"].tolist() == ["t1", "t3", "t1"]  # the 3 smallest q of the up genes
    assert up["neg_log10_q"].tolist() == pytest.approx([6.0, 3.0, 2.0])
    assert up["label"].tolist() == [
        "t1 (GO)",
        "t3",
        "t1 (GO)",
    ]  # a term in two rows keeps both bars
    assert shown.loc[shown["direction"] == "down", "term"].tolist() == [
        "a long term name (GO:0000001)"
    ]
    assert bars["encoding"]["y"]["sort"] == {"field": "rank", "op": "min", "order": "ascending"}
    axis = bars["encoding"]["y"]["axis"]
    assert axis["labelOverlap"] is False and axis["labelLimit"] >= 400  # whole term names
    assert bars["encoding"]["color"]["field"] == "library"
    assert rule["mark"]["type"] == "rule" and rule["encoding"]["x"]["aggregate"] == "max"
    assert shown["threshold"].tolist() == pytest.approx([-np.log10(0.05)] * 4)
    # without a direction column: one panel
    single = to_spec(charts.enrichment_chart(frame.drop(columns="direction"), top=2))
    assert set(frame_of(single)["direction"]) == {"all"} and len(frame_of(single)) == 2
    assert charts.chart_to_svg(charts.enrichment_chart(frame)).lstrip().startswith("<svg")


# ------------------------------------------------------------------ export


def test_svg_and_png_export(map_df):
    chart = charts.map_chart(map_df)
    svg = charts.chart_to_svg(chart)
    assert svg.lstrip().startswith("<svg")
    png = charts.chart_to_png(
        charts.accuracy_by_source_chart({"a": 0.5}),
        scale=1,
    )
    assert png[:8] == PNG_MAGIC


def test_export_of_a_foreign_big_chart():
    big = pd.DataFrame({"v": np.arange(6000.0)})
    svg = charts.chart_to_svg(alt.Chart(big).mark_tick().encode(x="v:Q"))
    assert svg.lstrip().startswith("<svg")
    assert alt.data_transformers.options.get("max_rows", 5000) == 5000


def test_chart_spec_is_the_charts_dict_without_the_default_view_size(map_df):
    chart = charts.map_chart(map_df)
    spec = charts.chart_spec(chart)
    full = chart.to_dict()
    assert "config" not in spec  # Altair's default theme adds a 300 x 300 view only
    assert {k: v for k, v in full.items() if k != "config"} == spec


# ------------------------------------------------------------------ sweeps


@pytest.fixture
def sweep_results():
    return pd.DataFrame(
        {
            "gene_set": ["A", "A", "B", "B", "C"],
            "target": ["t1", "t2", "t1", "t2", "t1"],
            "bundle": ["a-t1", "a-t2", "b-t1", "b-t2", "c-t1"],
            "status": ["trained", "trained", "skipped", "trained", "failed"],
            "perturbation_accuracy_non_target": [0.2, 0.4, 0.9, 1.0, np.nan],
            "verdict": ["fail", "caution", "ok", "", ""],
            "e_distance": [3.0, 2.0, 1.0, 0.5, np.nan],
            "e_distance_unperturbed": [4.0, 4.0, 4.0, 4.0, np.nan],
            "genes": [10, 10, 12, 12, 0],
            "error": ["", "", "", "", "no genes of C in the data"],
        }
    )


def test_sweep_heatmap_rows_by_accuracy_colours_and_click(sweep_results):
    spec = to_spec(charts.sweep_heatmap_chart(sweep_results))
    enc = spec["encoding"]
    assert enc["y"]["sort"] == ["B", "A", "C"]  # mean accuracy 0.95, 0.3, then none
    assert enc["x"]["sort"] == ["t1", "t2"]
    assert enc["color"]["field"] == "accuracy" and enc["color"]["scale"]["domain"] == [0, 1]
    [pick] = spec["params"]
    assert pick["name"] == charts.SWEEP_SELECTION and pick["select"]["fields"] == ["bundle"]
    rows = frame_of(spec).set_index("bundle")
    assert rows.loc["c-t1", "verdict"] == "failed" and rows.loc["b-t2", "verdict"] == "none"
    assert "bundle" in tooltip_fields(enc) and "error" in tooltip_fields(enc)
    v = to_spec(charts.sweep_heatmap_chart(sweep_results, color="verdict"))["encoding"]["color"]
    assert v["field"] == "verdict" and v["scale"]["domain"] == charts.VERDICT_LEVELS
    e = to_spec(charts.sweep_heatmap_chart(sweep_results, color="e_distance"))["encoding"]["color"]
    assert e["field"] == "e_distance" and e["scale"]["reverse"] is True  # near: bright
    with pytest.raises(ValueError, match="colour by"):
        charts.sweep_heatmap_chart(sweep_results, color="size")


def test_sweep_target_chart_is_the_papers_table_1_sorted(sweep_results):
    spec = to_spec(charts.sweep_target_chart(sweep_results, "t1"))
    bars = spec["layer"][0]
    assert bars["encoding"]["y"]["sort"] == ["B", "A", "C"]  # best first, the failed last
    assert bars["encoding"]["x"]["scale"]["domain"] == [0, 1]
    assert set(frame_of(spec)["target"]) == {"t1"}


def test_recurring_genes_by_hand():
    genes = pd.DataFrame(
        {
            "gene_set": ["A", "A", "B", "B", "C", "A"],
            "target": ["t1", "t1", "t1", "t1", "t1", "t2"],
            "direction": ["up", "down", "up", "up", "up", "up"],
            "rank": [1, 1, 1, 2, 1, 1],
            "gene": ["G1", "G9", "G1", "G2", "G1", "G7"],
        }
    )
    out = charts.recurring_genes_frame(genes, "t1")
    up = out[out.direction == "up"]
    assert up["gene"].tolist() == ["G1", "G2"] and up["gene_sets"].tolist() == [3, 1]
    np.testing.assert_allclose(up["frequency"], [1.0, 1 / 3])
    assert up.iloc[0]["sets"] == "A, B, C"
    assert out[out.direction == "down"]["gene"].tolist() == ["G9"]
    assert "G7" not in set(out["gene"])  # another target's
