"""The dashboard's view through AppTest: kept in the URL, picking samples, the map's moves,
the enrichment's messages, Enrichr forced while it cannot be reached."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from enrichr_server import closed_port_url
from test_app import (  # noqa: F401 (fresh_streamlit: an autouse fixture)
    app,
    chart_data,
    charts,
    fresh_streamlit,
    ok,
    tables,
    texts,
    the_bundle,
)

from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo


@pytest.fixture(scope="module")
def models(demo_models_dir, tmp_path_factory) -> Path:
    """This module's own copy of the demo models folder."""
    root = tmp_path_factory.mktemp("view_models")
    for p in Path(demo_models_dir).iterdir():
        if p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, root / p.name)
    return root


@pytest.fixture(scope="module")
def demo_adata():
    return demo()


def heldout_non_target(bundle, adata) -> list[str]:
    labels = adata.obs[DEMO_LABEL_KEY].astype(str)
    return [s for s in bundle.split["test"] if labels[s] != DEMO_TARGET]


# ----------------------------------------------------------------------------- the URL


def test_the_view_round_trips_through_the_url(models, monkeypatch, demo_adata):
    bundle = the_bundle(models)
    at = ok(app(models, monkeypatch).run())
    ok(at.switch_page("app_pages/perturb.py").run())
    at.radio(key="sel_mode").set_value("class")
    ok(at.run())
    at.pills(key="sel_classes").set_value(["CD19+ B", "CD56+ NK"])
    at.number_input(key="top_k").set_value(12)
    at.radio(key="heat_view").set_value("sample")
    ok(at.run())
    sample = at.selectbox(key="heat_sample").options[3].split(" · ")[0]
    at.selectbox(key="heat_sample").set_value(sample)
    ok(at.run())
    params = dict(at.query_params)
    assert params["bundle"] == bundle.name and params["mode"] == "class"
    assert params["classes"] == ["CD19+ B", "CD56+ NK"]
    assert params["k"] == "12" and params["heatmap"] == "sample" and params["sample"] == sample
    assert "n" not in params  # defaults stay out of the link
    shown = tables(at)[0].value

    # a reload, or the link opened elsewhere: a new session with the same URL
    again = app(models, monkeypatch)
    again.query_params = params
    ok(again.switch_page("app_pages/perturb.py").run())
    assert again.radio(key="sel_mode").value == "class"
    assert again.pills(key="sel_classes").value == ["CD19+ B", "CD56+ NK"]
    assert again.number_input(key="top_k").value == 12
    assert again.selectbox(key="heat_sample").value == sample
    assert list(tables(again)[0].value.index) == list(shown.index)
    assert dict(again.query_params) == params  # written back unchanged

    # the map's seed and moves, the enrichment's direction: from the link, onto the page
    third = app(models, monkeypatch)
    third.query_params = {**params, "map_seed": "3", "moves": "0", "direction": "up"}
    ok(third.switch_page("app_pages/map.py").run())
    assert third.number_input(key="map_seed").value == 3
    assert third.toggle(key="map_moves").value is False
    assert "x_before" not in json.dumps(json.loads(charts(third)[0].proto.spec)["layer"])
    ok(third.switch_page("app_pages/enrichment.py").run())
    assert third.radio(key="enr_direction").value == "up"
    assert third.query_params["map_seed"] == "3"  # kept across pages


def test_a_link_with_bad_parameters_opens_with_a_note(models, monkeypatch):
    at = app(models, monkeypatch)
    at.query_params = {
        "bundle": "no-such-bundle",
        "mode": "class",
        "classes": ["CD19+ B", "Martian"],
        "n": "many",
        "k": "5000",
        "q": "0.3",
        "zoom": "2",
    }
    ok(at.switch_page("app_pages/perturb.py").run())
    note = texts(at.warning)
    for part in (
        "bundle=no-such-bundle",
        "n=many",
        "k=5000",
        "q=0.3",
        "`zoom` is not a setting",
        "class(es) not in the data from the link ignored: Martian",
    ):
        assert part in note, part
    assert at.pills(key="sel_classes").value == ["CD19+ B"]  # the usable part of the link
    assert at.sidebar.selectbox(key="bundle").value == the_bundle(models).name
    assert at.number_input(key="top_k").value == 20
    assert at.query_params["classes"] == "CD19+ B"  # the URL now holds what is shown


# ----------------------------------------------------------------------------- picking samples


def test_picking_by_class_clearing_stays_cleared(models, monkeypatch):
    at = ok(app(models, monkeypatch).run())
    at.session_state["sel_mode"] = "class"
    ok(at.switch_page("app_pages/perturb.py").run())
    pills = at.pills(key="sel_classes")
    assert pills.value == ["CD19+ B"]  # the first non-target class, by default
    assert any(o.content.startswith("CD19+ B (") for o in pills.proto.options)  # with its count
    pills.set_value([])
    ok(at.run())
    assert at.pills(key="sel_classes").value == []
    assert "No samples selected." in texts(at.warning)
    assert at.query_params["classes"] == ""  # the URL says so too (the page stopped early)
    ok(at.run())  # and again: no snapping back to a class
    assert at.pills(key="sel_classes").value == []


def test_picking_by_id_shows_classes_and_never_selects_every_match(models, monkeypatch, demo_adata):
    bundle = the_bundle(models)
    at = ok(app(models, monkeypatch).run())
    at.session_state["sel_mode"] = "id"
    ok(at.switch_page("app_pages/perturb.py").run())
    box = at.multiselect(key="sel_ids")
    assert box.proto.select_all == 0  # no "Select N matches": Enter picks one
    ids = heldout_non_target(bundle, demo_adata)[:2]
    cls = demo_adata.obs[DEMO_LABEL_KEY].astype(str)
    assert f"{ids[0]} · {cls[ids[0]]}" in box.options
    box.set_value(ids)
    ok(at.run())
    assert list(tables(at)[0].value.index) == ids


def test_n_above_the_pool_is_clamped_with_a_message(models, monkeypatch, demo_adata):
    bundle = the_bundle(models)
    available = len(heldout_non_target(bundle, demo_adata))
    at = ok(app(models, monkeypatch).run())
    ok(at.switch_page("app_pages/perturb.py").run())
    at.number_input(key="sel_n").set_value(300)
    ok(at.run())
    assert at.number_input(key="sel_n").value == available
    assert f"N = 300 is more than the {available} samples to pick from" in texts(at.warning)
    assert len(tables(at)[0].value) == available
    assert "Leave out the target class" in [c.label for c in at.checkbox]  # not cut


# ----------------------------------------------------------------------------- the map


def test_the_map_shows_each_move_and_uses_the_page_width(models, monkeypatch):
    at = ok(app(models, monkeypatch).run())
    ok(at.switch_page("app_pages/map.py").run())
    el = charts(at)[0]
    spec = json.loads(el.proto.spec)
    assert spec["width"] == "container"  # the page's width (the browser test measures it)
    marks = [layer["mark"]["type"] for layer in spec["layer"]]
    assert marks == ["point", "rule", "point", "point"]  # real, moves, before, after
    rule = spec["layer"][1]["encoding"]
    assert (rule["x"]["field"], rule["x2"]["field"]) == ("x_before", "x")
    data = chart_data(el)
    before, after = data[data.kind == "before"], data[data.kind == "perturbed"]
    assert len(before) == len(after) == 20
    assert set(before["sample"]) == set(after["sample"])
    moved = np.hypot(after["x"].to_numpy() - after["x_before"], after["y"] - after["y_before"])
    assert np.median(moved) > 1  # the generator moved them across the map (span ~ 60)
    names = {p["name"] for p in spec["params"]}
    assert {"legend_pick", "kind_pick"} <= names  # a legend entry isolates the perturbed
    at.toggle(key="map_moves").set_value(False)
    ok(at.run())
    marks = [layer["mark"]["type"] for layer in json.loads(charts(at)[0].proto.spec)["layer"]]
    assert marks == ["point", "point"]


def test_map_read_from_disk_after_a_restart(models, monkeypatch, tmp_path, caplog):
    """The first Map of a new server process (caches empty) reads the map fit before."""
    import streamlit as st

    at = ok(app(models, monkeypatch).run())
    ok(at.switch_page("app_pages/map.py").run())
    first = chart_data(charts(at)[0])
    assert list((tmp_path / "cache" / "maps").glob("*.npz"))
    st.cache_data.clear()
    st.cache_resource.clear()  # a restart: nothing in memory
    again = ok(app(models, monkeypatch).run())
    with caplog.at_level(logging.INFO, logger="tspg.embedding"):
        ok(again.switch_page("app_pages/map.py").run())
    assert "t-SNE map read from" in caplog.text
    second = chart_data(charts(again)[0])
    cols = ["sample", "kind", "x", "y"]
    np.testing.assert_allclose(first[["x", "y"]], second[["x", "y"]], atol=1e-9)
    assert first[cols[:2]].equals(second[cols[:2]])


# ----------------------------------------------------------------------------- enrichment


def test_enrichment_of_up_says_nothing_about_down(models, monkeypatch):
    monkeypatch.setenv("TSPG_ENRICHR_URL", closed_port_url())
    at = ok(app(models, monkeypatch).run())
    at.session_state["enr_direction"] = "up"
    ok(at.switch_page("app_pages/enrichment.py").run())
    assert "down-regulated" not in texts(at.caption)
    assert set(tables(at)[0].value["direction"]) == {"up"}


def test_enrichr_forced_but_unreachable_one_log_line_and_a_way_out(models, monkeypatch, caplog):
    monkeypatch.setenv("TSPG_ENRICHR_URL", closed_port_url())
    at = ok(app(models, monkeypatch).run())
    at.session_state["enr_backend"] = "enrichr"
    with caplog.at_level(logging.INFO):
        at.switch_page("app_pages/enrichment.py").run()
    assert not at.exception
    assert "could not be reached" in texts(at.error)
    assert "**auto**" in texts(at.info) and "**offline**" in texts(at.info)
    failures = [r for r in caplog.records if "Enrichr" in r.getMessage() and r.levelno >= 30]
    assert len(failures) == 1 and failures[0].exc_info is None  # one line, no traceback
    assert "Traceback" not in caplog.text


def test_pages_without_a_selection_write_the_bundle_into_the_url(models, monkeypatch):
    at = ok(app(models, monkeypatch).run())
    assert at.query_params["bundle"] == the_bundle(models).name
    ok(at.switch_page("app_pages/models.py").run())
    assert at.query_params["bundle"] == the_bundle(models).name
