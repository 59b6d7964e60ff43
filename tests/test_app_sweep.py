"""The Sweep page through AppTest, on a small sweep run by the real tspg.sweep code.

Three gene sets x two targets of a synthetic GEM, trained for a few epochs on an in-process
Dask cluster; the page's heatmap, table, Table 1 bars and recurring genes are read back and
checked against :func:`tspg.sweep.read_results`. (The click that opens a bundle is checked
in the real browser, tests/test_browser.py.)
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import SMALL_NETS
from test_app import app, chart_data, charts, fresh_streamlit, ok, tables  # noqa: F401

from tspg.config import TrainConfig
from tspg.datasets import synthetic_gem

distributed = pytest.importorskip("distributed")

from tspg.sweep import GeneSet, read_results, sweep, sweep_genes_df  # noqa: E402

TARGETS = ["class-00", "class-01"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A models folder holding a 3 gene sets x 2 targets sweep and its results table."""
    out = tmp_path_factory.mktemp("sweep_models")
    gem = synthetic_gem(n_samples=90, n_genes=30, n_classes=3, seed=0)
    g = list(gem.var_names)
    sets = [
        GeneSet("SET_A", tuple(g[:10])),
        GeneSet("SET_B", tuple(g[8:20])),
        GeneSet("SET_C", tuple(g[18:])),
    ]
    config = TrainConfig.for_recipe("tspg+", epochs=6, target_epochs=6, batch_size=32, **SMALL_NETS)
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        sweep(
            gem,
            label_key="label",
            gene_sets=sets,
            targets=TARGETS,
            config=config,
            out=out,
            client=client,
            threads=1,
            dataset="syn",
        )
    return out


def test_the_sweep_page_shows_the_grid_the_table_and_one_target(swept, monkeypatch):
    results = read_results(swept)
    at = ok(app(swept, monkeypatch).run())
    ok(at.switch_page("app_pages/sweep.py").run())
    assert "6 bundles: 3 gene sets x 2 targets" in "\n".join(c.value for c in at.caption)

    grid = chart_data(charts(at)[0]).set_index("bundle")
    assert len(grid) == 6 and set(grid["target"]) == set(TARGETS)
    expected = results.set_index("bundle")["perturbation_accuracy_non_target"]
    pd.testing.assert_series_equal(
        grid.loc[expected.index, "accuracy"], expected, check_names=False
    )
    spec = json.loads(charts(at)[0].proto.spec)
    assert spec["encoding"]["color"]["field"] == "accuracy"
    assert {p["name"] for p in spec["params"]} == {"sweep_pick"}  # a click picks a bundle

    at.radio(key="sweep_color").set_value("verdict")
    ok(at.run())
    spec = json.loads(charts(at)[0].proto.spec)
    assert spec["encoding"]["color"]["field"] == "verdict"
    assert at.query_params["sweep_color"] == "verdict"

    table = tables(at)[0].value
    assert len(table) == 6 and table["accuracy"].is_monotonic_decreasing
    assert set(table["bundle"]) == set(results["bundle"])

    at.selectbox(key="sweep_target").set_value("class-01")
    ok(at.run())
    bars = chart_data(charts(at)[1])
    mine = results[results["target"] == "class-01"]
    assert set(bars["gene_set"]) == set(mine["gene_set"]) and set(bars["target"]) == {"class-01"}
    spec = json.loads(charts(at)[1].proto.spec)
    order = spec["layer"][0]["encoding"]["y"]["sort"]
    best = mine.sort_values(
        ["perturbation_accuracy_non_target", "gene_set"], ascending=[False, True]
    )["gene_set"]
    assert order == best.tolist()  # Table 1, best first

    recurring = tables(at)[1].value  # genes recurring across the target's gene sets
    assert len(recurring) and set(recurring["direction"]) == {"up", "down"}
    long = sweep_genes_df(results)
    long = long[long["target"] == "class-01"]
    counts = long.groupby(["direction", "gene"])["gene_set"].nunique()
    for _, row in recurring.iterrows():
        assert row["gene_sets"] == counts[(row["direction"], row["gene"])]


def test_no_sweep_says_how_to_run_one(tmp_path, monkeypatch):
    at = ok(app(tmp_path, monkeypatch).run())
    ok(at.switch_page("app_pages/sweep.py").run())
    assert "No sweep in" in "\n".join(i.value for i in at.info)
    assert any(c.value.startswith("tspg sweep") for c in at.code)
