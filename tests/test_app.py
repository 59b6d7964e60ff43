"""The dashboard through Streamlit's AppTest: every page, driven and read back.

AppTest runs the scripts in this process without a browser; charts are not drawn, but
each chart's Vega-Lite spec and data are in its element's proto. Streamlit's caches live
in the process, so they are cleared before each test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from enrichr_server import FakeEnrichr, closed_port_url

from tspg.bundle import list_bundles, load_bundle
from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo

st = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
TIMEOUT = 120  # torch, scanpy and a t-SNE fit on 2 shared cores


@pytest.fixture(scope="module")
def models(demo_models_dir, tmp_path_factory) -> Path:
    """This module's own copy of the demo models folder (tests add folders to it)."""
    root = tmp_path_factory.mktemp("app_models")
    for p in Path(demo_models_dir).iterdir():
        if p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, root / p.name)
    return root


@pytest.fixture(scope="module")
def demo_adata():
    return demo()


@pytest.fixture(autouse=True)
def fresh_streamlit(tmp_path, monkeypatch):
    """Empty Streamlit caches, and an enrichment cache of the test's own."""
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.setenv("TSPG_CACHE_DIR", str(tmp_path / "cache"))
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


def app(models_dir: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("TSPG_MODELS_DIR", str(models_dir))
    return AppTest.from_file(APP, default_timeout=TIMEOUT)


def ok(at: AppTest) -> AppTest:
    """The run raised nothing and showed no error."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def charts(at: AppTest) -> list:
    return at.get("vega_lite_chart") + at.get("arrow_vega_lite_chart")


def chart_data(el) -> pd.DataFrame:
    """A chart element's data (Arrow datasets, or values inline in the spec)."""
    frames = [pa.ipc.open_stream(d.data.data).read_pandas() for d in el.proto.datasets]
    if not frames:
        spec = json.loads(el.proto.spec)
        values = spec.get("data", {}).get("values") or []
        values += [v for ds in spec.get("datasets", {}).values() for v in ds]
        frames = [pd.DataFrame(values)]
    return pd.concat(frames, ignore_index=True)


def tables(at: AppTest) -> list:
    """The page's tables, in order, without the verdict's table of checks (at the top)."""
    return [d for d in at.dataframe if not {"reason", "figures"} <= set(d.value.columns)]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def the_bundle(models_dir: Path):
    entry = next(e for e in list_bundles(models_dir) if e.error is None)
    return load_bundle(entry.path)


# ----------------------------------------------------------------------------- pages


def test_home_shows_the_manifest_summary(models, monkeypatch):
    at = ok(app(models, monkeypatch).run())
    bundle = the_bundle(models)
    picker = at.sidebar.selectbox(key="bundle")
    assert picker.value == bundle.name
    # the name in the box (short enough not to be cut); target, dataset and gene set below it
    assert picker.options == [bundle.name]
    assert f"target **{DEMO_TARGET}** · dataset pbmc68k_reduced · gene set all" in texts(
        at.sidebar.caption
    )
    # the demo bundle's own dataset is the demo: offered once, not under two names
    assert at.sidebar.radio(key="data_source").options == [
        "Its own dataset: pbmc68k_reduced (the demo)",
        "Upload a .h5ad file",
    ]
    m = metrics(at)
    assert m["Classes"] == str(len(bundle.classes)) == "10"
    assert m["Genes"] == str(len(bundle.genes)) == "765"
    assert m["Target"] == bundle.target == DEMO_TARGET
    assert m["Target-model accuracy"] == f"{bundle.metrics['target_model_accuracy']:.3f}"
    assert m["Perturbation accuracy"] == f"{bundle.metrics['perturbation_accuracy_non_target']:.3f}"
    assert "all 765 of the bundle's genes found" in texts(at.markdown)


def test_perturb_selected_ids_and_heatmap(models, monkeypatch, demo_adata):
    bundle = the_bundle(models)
    labels = demo_adata.obs[DEMO_LABEL_KEY].astype(str)
    test = [s for s in bundle.split["test"] if labels[s] != DEMO_TARGET]
    ids = test[:6]
    at = ok(app(models, monkeypatch).run())
    at.session_state["sel_mode"] = "id"
    at.session_state["sel_ids"] = ids
    ok(at.switch_page("app_pages/perturb.py").run())
    assert at.multiselect(key="sel_ids").value == ids

    pred = tables(at)[0].value
    assert list(pred.index) == ids
    from tspg.perturbation import perturb_adata

    expected = perturb_adata(demo_adata[ids], bundle).predictions_df()
    assert list(pred["pred_after"]) == list(expected["pred_after"])
    np.testing.assert_allclose(pred["prob_target_after"], expected["prob_target_after"], atol=1e-3)
    assert list(pred["label"]) == list(labels[ids])

    # the heatmap: the selection mean's top +/-20 genes, columns x, P, x_adv, target mean
    heat = chart_data(charts(at)[0])
    assert set(heat["column"]) == {"x", "P", "x_adv", "target mean"}
    assert heat["gene"].nunique() == 40
    P = perturb_adata(demo_adata[ids], bundle).P
    mean_P = P.mean(0)
    top_gene = bundle.genes[int(np.argmax(mean_P))]
    first = heat[(heat.direction == "up") & (heat["rank"] == 1)]
    assert set(first["gene"]) == {top_gene}
    assert heat[(heat.gene == top_gene) & (heat.column == "P")]["value"].iloc[0] == pytest.approx(
        mean_P.max(), abs=1e-4
    )
    # one ranking: the heatmap's blocks are the tables' lists (mean P over the samples)
    from tspg.perturbation import consensus_top

    lists = consensus_top(P, bundle.genes, k=20)
    up_table, down_table = tables(at)[1].value, tables(at)[2].value
    assert (
        list(up_table["gene"])
        == lists["up"]
        == list(heat[(heat.direction == "up") & (heat.column == "P")]["gene"])
    )
    assert (
        list(down_table["gene"])
        == lists["down"]
        == list(heat[(heat.direction == "down") & (heat.column == "P")]["gene"])
    )
    np.testing.assert_allclose(up_table["mean_P"], np.sort(mean_P)[::-1][:20], atol=1e-5)
    # P's colours: symmetric around 0 at the view's largest |P|
    spec = json.loads(charts(at)[0].proto.spec)
    p_scale = next(
        layer["encoding"]["color"]["scale"]
        for panel in spec["hconcat"]
        for layer in panel["layer"]
        if layer["encoding"]["color"]["title"] == "P"
    )
    m = float(np.abs(heat.loc[heat.column == "P", "value"]).max())
    assert p_scale["domain"] == pytest.approx([-m, 0.0, m], abs=1e-6)
    assert spec["title"]["text"] == f"Mean over {len(ids)} source samples"
    # readable column headers, each with help (not "prob_before": probability of what?)
    columns = json.loads(tables(at)[0].proto.columns)
    assert columns["prob_before"]["label"] == "p(called) before"
    assert columns["prob_target_after"]["label"] == "p(target) after"
    assert all(c.get("help") for c in columns.values())
    # the target-mean column: the bundle's stored training-split mean of the target class
    tm = heat[heat.column == "target mean"].set_index("gene")["value"]
    stored = pd.Series(bundle.target_mean, index=bundle.genes)
    np.testing.assert_allclose(tm.to_numpy(), stored[tm.index].to_numpy(), atol=1e-6)

    # one sample: heatmap and top genes follow it
    at.radio(key="heat_view").set_value("sample")
    at.session_state["heat_sample"] = ids[2]
    ok(at.run())
    from tspg.perturbation import top_genes

    one = perturb_adata(demo_adata[[ids[2]]], bundle)
    top = top_genes(one.P, bundle.genes, k=20)
    up_table, down_table = tables(at)[1].value, tables(at)[2].value
    assert list(up_table["gene"]) == list(top.up[0])
    assert list(down_table["gene"]) == list(top.down[0])
    assert set(chart_data(charts(at)[0])["gene"]) == set(top.up[0]) | set(top.down[0])
    # titled with the sample, its class and its calls before and after
    title = json.loads(charts(at)[0].proto.spec)["title"]
    assert title["text"] == f"Sample {ids[2]} ({labels[ids[2]]})"
    assert title["subtitle"] == (f"called {one.pred_before[0]} before, {one.pred_after[0]} after")
    labels_dl = {b.label for b in at.get("download_button")}
    assert {
        "Perturbed samples (.h5ad)",
        "P, samples x genes (CSV)",
        "SVG",
        "PNG",
        "CSV",
    } <= labels_dl
    assert "tspg perturb" in texts(at.code)


def test_random_selection_moves_most_samples_to_the_target(models, monkeypatch):
    at = ok(app(models, monkeypatch).run())
    ok(at.switch_page("app_pages/perturb.py").run())
    pred = tables(at)[0].value
    assert len(pred) == 20  # default: 20 held-out non-target samples, seed 0
    assert (pred["label"] != DEMO_TARGET).all()
    assert (pred["pred_after"] == DEMO_TARGET).mean() >= 0.5
    at.number_input(key="sel_n").set_value(7)
    ok(at.run())
    assert len(tables(at)[0].value) == 7
    assert metrics(at)["Samples"] == "7"


def test_map_genes_and_enrichment_pages(models, monkeypatch, tmp_path):
    bundle = the_bundle(models)
    monkeypatch.setenv(
        "TSPG_ENRICHR_URL", closed_port_url()
    )  # Enrichr refuses: the offline fallback, on any machine
    at = ok(app(models, monkeypatch).run())
    classes = [DEMO_TARGET, "CD56+ NK", "CD19+ B"]
    at.session_state["map_classes"] = classes[1:]  # besides the target, which is always shown
    at.session_state["sel_mode"] = "class"
    at.session_state["sel_classes"] = ["CD19+ B", "CD56+ NK"]

    ok(at.switch_page("app_pages/map.py").run())
    frame = chart_data(charts(at)[0])
    real, pert = frame[frame.kind == "real"], frame[frame.kind == "perturbed"]
    assert set(real["class"]) == set(classes)
    assert set(pert["class"]) == {"CD19+ B", "CD56+ NK"}
    assert len(pert) == sum(
        1 for s in bundle.split["test"] if s in set(pert["sample"])
    )  # held-out only
    assert {"sample", "class", "predicted", "kind", "x", "y"} <= set(frame.columns)
    spec = json.dumps(json.loads(charts(at)[0].proto.spec))
    assert '"bind": {"legend": "click[' in spec and "tooltip" in spec
    assert "placed on the fixed reference map" in texts(at.caption)
    # the page's equivalent command writes the page's table
    import shlex

    from tspg import cli

    table = tables(at)[0].value
    command = next(c.value for c in at.code if c.value.startswith("tspg map"))
    argv = shlex.split(command)[1:]
    argv[argv.index("-o") + 1] = str(out := tmp_path / "map.csv")
    assert cli.main(argv) == 0
    from_cli = pd.read_csv(out)
    cols = ["sample", "class", "predicted", "kind"]
    pd.testing.assert_frame_equal(
        from_cli[cols], table[cols].reset_index(drop=True), check_dtype=False
    )
    np.testing.assert_allclose(from_cli[["x", "y"]], table[["x", "y"]], atol=1e-6)
    at.button(key="map_joint_button").click()
    ok(at.run())
    assert "from a joint t-SNE fit" in texts(at.caption)

    ok(at.switch_page("app_pages/genes.py").run())
    m = metrics(at)
    assert m["Source classes (one random sample each)"] == "2"
    assert 20 <= int(m["Unique up genes (of 40 picks)"]) <= 40
    overlap = tables(at)[1].value
    assert set(overlap["baseline"]) == {"differential expression", "mean shift"}
    assert set(overlap["k"]) == {10, 20, 50}
    # by source class: "all sources" lists each class; one class shows its two tables
    picker = at.selectbox(key="genes_source")
    assert picker.value == "all sources" and picker.options[0] == "all sources"
    assert [o.split(" (")[0] for o in picker.options[1:]] == ["CD19+ B", "CD56+ NK"]
    per_source = tables(at)[2].value
    assert per_source["source"].tolist() == ["CD19+ B", "CD56+ NK"]
    assert set(per_source["status"]) == {"ok"}
    picker.set_value("CD56+ NK")
    ok(at.run())
    assert at.query_params["source"] == "CD56+ NK"  # kept in the URL like the other views
    summary, tspg_genes, only_base = (t.value for t in tables(at)[1:4])
    assert summary["source"].tolist() == ["CD56+ NK"]
    assert {"TSPG∩DE up/down", "TSPG only up/down", "baselines only up/down"} <= set(summary)
    assert {"gene", "mean P", "DE score", "DE rank", "MS change", "MS rank", "flags"} <= set(
        tspg_genes
    )
    # TSPG's genes of the NK samples of the selection: the one ranking over those samples
    from tspg.baselines import split_arrays
    from tspg.perturbation import perturb_scaled
    from tspg.ranking import rank_genes

    Xte, yte, ids = split_arrays(demo(), bundle, part="test")
    nk = yte == "CD56+ NK"
    ranked = rank_genes(perturb_scaled(Xte[nk], bundle, predict=False).P, bundle.genes, k=20)
    for d in ("up", "down"):
        shown = tspg_genes.loc[tspg_genes["direction"] == d, "gene"].tolist()
        assert shown == ranked.loc[ranked["direction"] == d, "gene"].tolist()
    assert (only_base["TSPG rank"] > 50).all() and (only_base["DE rank"] <= 20).all()
    assert any(b.label == "CSV" for b in at.get("download_button"))
    # a class of the selection with one sample: flagged, no gene tables
    at.session_state["sel_mode"] = "id"
    one_nk = [i for i, y in zip(ids, yte, strict=True) if y == "CD56+ NK"][:1]
    at.session_state["sel_ids"] = [
        *one_nk,
        *[i for i, y in zip(ids, yte, strict=True) if y == "CD19+ B"][:3],
    ]
    ok(at.run())
    assert at.selectbox(key="genes_source").value == "CD56+ NK"
    assert "too few samples (1 < 2)" in texts(at.info)
    assert len(tables(at)) == 2  # frequency and the summary row, without figures
    row = tables(at)[1].value.iloc[0]
    assert row["source"] == "CD56+ NK" and row["n"] == 1 and row["TSPG∩DE up/down"] == ""
    at.session_state["sel_mode"] = "class"
    ok(at.run())
    at.selectbox(key="genes_source").set_value("all sources")
    ok(at.run())
    at.selectbox(key="gene").set_value("LYZ")
    ok(at.run())
    gene_map, dist = (chart_data(c) for c in charts(at)[1:3])
    on_map = frame[frame.kind != "before"]  # the gene map draws no moves
    assert len(gene_map) == len(on_map) and gene_map["value"].between(0, 1).all()
    assert set(dist["kind"]) == {"real", "perturbed"}

    ok(at.switch_page("app_pages/enrichment.py").run())
    assert "offline" in texts(at.warning)  # Enrichr refused: the offline fallback, labelled
    assert "Enrichr could not be used" in texts(at.caption)
    table = tables(at)[0].value
    assert (
        len(table)
        and set(table["backend"]) == {"offline"}
        and set(table["direction"]) <= {"up", "down"}
    )
    bars = chart_data(charts(at)[0])  # one chart, a panel per direction
    assert len(bars) >= 1 and set(bars["direction"]) == set(table["direction"])
    assert len(charts(at)) == 1

    # the page's equivalent command gives the same table
    command = next(c.value for c in at.code if c.value.startswith("tspg enrich"))
    argv = shlex.split(command)[1:]
    out = tmp_path / "enrichment.csv"
    argv[argv.index("-o") + 1] = str(out)
    assert cli.main(argv) == 0
    from_cli = pd.read_csv(out)
    cols = ["direction", "library", "term", "n_overlap"]
    pd.testing.assert_frame_equal(
        from_cli[cols], table[cols].reset_index(drop=True), check_dtype=False
    )
    np.testing.assert_allclose(from_cli["q"], table["q"], rtol=1e-6)

    at.radio(key="enr_direction").set_value("up")
    ok(at.run())
    assert set(tables(at)[0].value["direction"]) <= {"up"}


def test_enrichment_threshold_offline_libraries_and_retrying_enrichr(models, monkeypatch, tmp_path):
    monkeypatch.setenv("TSPG_ENRICHR_URL", closed_port_url())
    at = ok(app(models, monkeypatch).run())
    ok(at.switch_page("app_pages/enrichment.py").run())
    caption = next(c.value for c in at.caption if "Up: " in c.value)
    assert "ranked by mean P over its 20 source samples" in caption  # which list it used
    up = caption.split("Up: ")[1].split("\n")[0].strip().split(", ")
    assert len(up) == 20

    # a GMT of our own in $TSPG_GMT_DIR: one set holding 3 of the up genes (and 10 others), one holding every gene
    genes = the_bundle(models).genes
    others = [g for g in genes if g not in up][:10]
    gmts = tmp_path / "gmts"
    gmts.mkdir()
    (extra := gmts / "extra.gmt").write_text(
        f"HIT3\tmine\t{chr(9).join(up[:3] + others)}\nALL\tmine\t{chr(9).join(genes)}\n"
    )
    monkeypatch.setenv("TSPG_GMT_DIR", str(gmts))
    at = ok(app(models, monkeypatch).run())
    ok(at.switch_page("app_pages/enrichment.py").run())
    pick = at.multiselect(key="enr_gmts")
    assert pick.options == ["blood_markers", "extra"]  # (labels: the library names)
    assert [Path(f).name for f in pick.value] == [
        "blood_markers.gmt",
        "extra.gmt",
    ]  # all, by default
    table = tables(at)[0].value
    assert set(table["backend"]) == {"offline"} and set(table["library"]) == {
        "blood_markers",
        "extra",
    }

    # the q-value threshold: 1e-4 by default, a widget
    hit = table[(table.term == "HIT3") & (table.direction == "up")].iloc[0]
    assert 1e-4 < hit["q"] < 0.05 and not hit["significant"]
    assert (table["significant"] == (table["q"] < 1e-4)).all()
    at.select_slider(key="enr_threshold").set_value(0.05)
    ok(at.run())
    table = tables(at)[0].value
    assert (table["significant"] == (table["q"] < 0.05)).all()
    assert table[(table.term == "HIT3") & (table.direction == "up")].iloc[0]["significant"]
    assert "dashed line: q = 0.05" in texts(at.markdown)
    assert "--threshold 0.05" in next(c.value for c in at.code if "tspg enrich" in c.value)

    # only the chosen offline libraries
    at.multiselect(key="enr_gmts").set_value([str(extra)])
    ok(at.run())
    assert set(tables(at)[0].value["library"]) == {"extra"}
    assert "the page left out: blood_markers" in next(
        c.value for c in at.code if "tspg enrich" in c.value
    )
    # a library offered anew (another bundle's gene set, a new file) starts selected; the one left out stays out
    (gmts / "more.gmt").write_text(f"MORE\tmine\t{chr(9).join(up[:2] + others)}\n")
    ok(at.run())
    assert [Path(f).name for f in at.multiselect(key="enr_gmts").value] == ["extra.gmt", "more.gmt"]
    assert set(tables(at)[0].value["library"]) == {"extra", "more"}

    # Enrichr answers again: the fallback is kept for a while; "Try Enrichr again" asks it now,
    # and the online result shows (and is kept)
    with FakeEnrichr("ok") as server:
        monkeypatch.setenv("TSPG_ENRICHR_URL", server.url)
        ok(at.run())
        assert server.count == 0 and "Backend: **offline**" in texts(at.warning)
        ok(at.button(key="enr_retry").click().run())
        assert "Backend: **Enrichr** (online)" in texts(at.success)
        assert set(tables(at)[0].value["backend"]) == {"enrichr"}
        asked = server.count
        assert asked > 0
        ok(at.run())
        assert server.count == asked and "Enrichr" in texts(at.success)


def test_models_page_lists_an_unreadable_bundle(models, monkeypatch, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models, root)
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{not json")
    good = next(p for p in root.iterdir() if p.is_dir() and p.name != "broken")
    shutil.copytree(
        good, cut := root / "a-cut-short"
    )  # listed first, but its weights are truncated
    weights = cut / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    at = ok(app(root, monkeypatch).run())
    assert (
        at.sidebar.selectbox(key="bundle").value == good.name
    )  # the default skips unreadable bundles
    assert metrics(at)["Target"] == DEMO_TARGET  # the readable bundle still works
    assert "2 unreadable bundle(s)" in texts(at.sidebar.caption)
    ok(at.switch_page("app_pages/models.py").run())
    table = tables(at)[0].value
    assert table.loc["broken", "status"] == "unreadable"
    assert "not valid JSON" in table.loc["broken", "error"]
    assert table.loc["a-cut-short", "status"] == "unreadable"
    assert f"{weights}: unreadable weights" in table.loc["a-cut-short", "error"]
    assert "broken" in texts(at.warning) and "a-cut-short" in texts(at.warning)
    ok_row = table.loc[good.name]
    assert ok_row["status"] == "ok" and ok_row["target"] == DEMO_TARGET
    losses = chart_data(charts(at)[0])
    assert {"epoch", "loss", "value"} <= set(losses.columns)
    history = {k: v for k, v in the_bundle(models).manifest["history"].items() if any(v)}
    assert len(losses) == sum(len(v) for v in history.values())  # every value shown
    assert (losses.loc[losses["loss"] == "adv", "value"] < 0).any()  # the adv term at -kappa
    explained = next(d.value for d in at.dataframe if "meaning" in d.value.columns)
    assert list(explained["loss"]) == list(history)
    assert explained.set_index("loss").loc["adv", "weight"] == "3"
    assert "Carlini-Wagner" in explained.set_index("loss").loc["adv", "meaning"]
    acc = chart_data(charts(at)[1])
    assert set(acc["source"]) == set(the_bundle(models).metrics["perturbation_accuracy_by_source"])
    config = next(d.value for d in at.dataframe if d.value.index.name == "option")
    bundle = the_bundle(models)
    assert list(config.index) == list(bundle.manifest["config"])
    assert config.loc["epochs", "value"] == str(bundle.config.epochs)
    assert not at.table  # every table is a dataframe with a CSV download
    assert {"csv-bundles", "csv-config"} <= {b.key for b in at.download_button}
    assert at.json  # metrics and manifest details


def test_uploads_and_bad_input(models, monkeypatch, tmp_path, demo_adata):
    at = ok(app(models, monkeypatch).run())
    at.sidebar.radio(key="data_source").set_value("upload")
    ok(at.run())
    at.sidebar.file_uploader(key="upload").set_value(("notes.txt", b"hello", "text/plain"))
    at.run()
    assert not at.exception
    assert "upload a .h5ad file" in texts(at.error)

    import anndata as ad

    wrong = ad.AnnData(
        np.ones((4, 3), np.float32),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(4)]),
        var=pd.DataFrame(index=["A", "B", "C"]),
    )
    path = tmp_path / "wrong.h5ad"
    wrong.write_h5ad(path)
    at.sidebar.file_uploader(key="upload").set_value(
        ("wrong.h5ad", path.read_bytes(), "application/octet-stream")
    )
    at.switch_page("app_pages/perturb.py").run()
    assert not at.exception
    assert "none of the model's 765 genes are present" in texts(at.error)

    # a good file without the label column: perturbs, but cannot pick by class
    cells = demo_adata[::25].copy()
    cells.obs = cells.obs.drop(columns=[DEMO_LABEL_KEY])
    cells.write_h5ad(path := tmp_path / "cells.h5ad")
    at.sidebar.file_uploader(key="upload").set_value(
        ("cells.h5ad", path.read_bytes(), "application/octet-stream")
    )
    ok(at.run())
    pred = tables(at)[0].value
    assert len(pred) == 20 and set(pred.index) <= set(cells.obs_names) and "label" not in pred
    heat = chart_data(charts(at)[0])  # uploaded data: the target mean still comes from the bundle
    tm = heat[heat.column == "target mean"].set_index("gene")["value"]
    assert tm.notna().all() and len(tm) == 40
    bundle = the_bundle(models)
    np.testing.assert_allclose(
        tm.to_numpy(),
        pd.Series(bundle.target_mean, index=bundle.genes)[tm.index].to_numpy(),
        atol=1e-6,
    )
    assert "sel_heldout" not in [
        c.key for c in at.checkbox
    ]  # held-out only applies to the bundle's own data
    at.radio(key="sel_mode").set_value("class")
    at.run()
    assert not at.exception
    assert "no 'bulk_labels' column in obs" in texts(at.error)


def test_no_bundle_home_trains_the_demo(tmp_path, monkeypatch):
    empty = tmp_path / "empty_models"
    monkeypatch.setenv("TSPG_DEMO_EPOCHS", "1")
    at = ok(app(empty, monkeypatch).run())
    button = at.button(key="train_demo")
    assert button.label == "Train the demo generator"
    assert "1 generator epochs, 3 generators" in texts(at.markdown)
    button.click()
    ok(at.run())
    names = [e.name for e in list_bundles(empty) if e.error is None]
    assert len(names) == 1
    assert metrics(at)["Target"] == DEMO_TARGET
    assert at.sidebar.selectbox(key="bundle").value == names[0]
    # the demo trains the default recipe's seed ensemble of 3 generators: the pages say so
    bundle = load_bundle(empty / names[0])
    assert bundle.n_generators == 3
    ok(at.switch_page("app_pages/perturb.py").run())
    top = [t.value for t in tables(at) if "support" in t.value.columns]
    assert len(top) == 2  # the up and down tables
    from tspg.perturbation import perturb_adata

    ids = list(tables(at)[0].value.index)  # the page's selection (its predictions table)
    want = perturb_adata(demo()[ids], bundle).ranking(k=20)
    for d, table in zip(("up", "down"), top, strict=True):
        part = want[want.direction == d]
        assert list(table["gene"]) == list(part["gene"])
        assert list(table["support"]) == [f"{s}/3" for s in part["support"]]
    heat = chart_data(charts(at)[0])
    partial = set(want.loc[want.support < 3, "gene"])
    assert {g.removesuffix(" °") for g in heat["gene"] if g.endswith(" °")} == partial
    ok(at.switch_page("app_pages/genes.py").run())
    assert any(
        "support" in t.value.columns and t.value["support"].str.endswith("/3").all()
        for t in tables(at)
    )
    ok(at.switch_page("app_pages/models.py").run())
    assert "**3 generators** (seeds 0, " in texts(at.markdown)
    ok(at.switch_page("app_pages/map.py").run())
    assert "x + the mean P of the bundle's 3 generators" in texts(at.caption)


def test_map_reuses_the_reference_map_for_a_new_selection(models, monkeypatch):
    at = ok(app(models, monkeypatch).run())
    ok(at.switch_page("app_pages/map.py").run())
    first = chart_data(charts(at)[0])
    at.session_state["sel_seed"] = 1  # another random selection (the Perturb page's seed)
    ok(at.run())
    second = chart_data(charts(at)[0])
    real1, real2 = (f[f.kind == "real"].reset_index(drop=True) for f in (first, second))
    pd.testing.assert_frame_equal(
        real1[["sample", "class", "x", "y"]], real2[["sample", "class", "x", "y"]]
    )
    pert1, pert2 = (set(f.loc[f.kind == "perturbed", "sample"]) for f in (first, second))
    assert len(pert1) == len(pert2) == 20 and pert1 != pert2
    assert "placed on the fixed reference map" in texts(at.caption)
    # the default classes: the target and every source class of the selection (the demo has 10 classes)
    sources = set(tables(at)[0].value.query("kind == 'perturbed'")["class"])
    assert {DEMO_TARGET, *sources} <= set(real2["class"])
    widget = at.multiselect(key="map_classes")
    assert DEMO_TARGET not in widget.options and widget.proto.max_selections == 9
    assert set(widget.value) == set(real2["class"]) - {DEMO_TARGET}


def test_sidebar_bundle_picker_demo_data_and_a_partial_upload(
    models, monkeypatch, tmp_path, demo_adata
):
    root = tmp_path / "models"
    shutil.copytree(models, root)
    src = next(p for p in root.iterdir() if p.is_dir())
    other = root / "pbmc68k-reduced-cd19-b"
    shutil.copytree(src, other)  # same networks, another target in the manifest
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(name="pbmc68k-reduced-cd19-b", target="CD19+ B")
    (other / "manifest.json").write_text(json.dumps(manifest))
    at = ok(app(root, monkeypatch).run())
    picker = at.sidebar.selectbox(key="bundle")
    assert picker.options == [src.name, "pbmc68k-reduced-cd19-b"]
    assert metrics(at)["Target"] == DEMO_TARGET
    picker.set_value("pbmc68k-reduced-cd19-b")
    ok(at.run())
    assert metrics(at)["Target"] == "CD19+ B" and "Bundle pbmc68k-reduced-cd19-b" in texts(
        at.subheader
    )

    assert "pbmc68k_reduced (the bundle's dataset): 700 samples x 765 genes" in texts(at.markdown)
    ok(at.switch_page("app_pages/perturb.py").run())
    assert at.checkbox(
        key="sel_heldout"
    ).value  # the demo is the demo bundle's own dataset: its split applies
    assert set(tables(at)[0].value.index) <= set(manifest["split"]["test"])

    # an upload lacking 3 of the bundle's genes: perturbed, the genes filled in and named
    dropped = ["LYZ", "CD79A", "GNLY"]
    part = demo_adata[:40, ~demo_adata.var_names.isin(dropped)].copy()
    part.write_h5ad(path := tmp_path / "part.h5ad")
    at.sidebar.radio(key="data_source").set_value("upload")
    at.run()
    at.sidebar.file_uploader(key="upload").set_value(
        ("part.h5ad", path.read_bytes(), "application/octet-stream")
    )
    ok(at.run())
    note = texts(at.info)
    assert "3 missing" in note and all(g in note for g in dropped)
    assert len(tables(at)[0].value) == 20


def test_demo_epochs_that_are_not_a_number_are_an_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("TSPG_DEMO_EPOCHS", "ten")
    at = app(tmp_path / "empty_models", monkeypatch).run()
    assert not at.exception
    assert "TSPG_DEMO_EPOCHS='ten' is not a whole number of epochs" in texts(at.error)
    assert not at.button  # no training button with settings that cannot work


# ----------------------------------------------------------------------------- tspg app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tspg_app_trains_the_demo_into_an_empty_folder_and_serves(tmp_path):
    """The real command: trains the demo (1 epoch) into the empty models folder, then serves the dashboard."""
    empty = tmp_path / "models"
    empty.mkdir()
    port = _free_port()
    env = dict(
        os.environ,
        TSPG_CACHE_DIR=str(tmp_path / "cache"),
        STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
    )
    env.pop("TSPG_MODELS_DIR", None)
    script = Path(sys.executable).with_name("tspg")  # the console script of this environment
    assert script.exists(), f"{script} not found: install the package (pip install -e .)"
    cmd = [
        str(script),
        "app",
        "--models",
        str(empty),
        "--demo-epochs",
        "1",
        "--headless",
        "--port",
        str(port),
    ]
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (
                f"tspg app exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/_stcore/health", timeout=2
                ) as r:
                    if r.status == 200 and r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"no answer on port {port} within 180 s:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.5)
        [entry] = list_bundles(empty)
        assert entry.error is None and entry.manifest["target"] == DEMO_TARGET
        assert entry.manifest["config"]["epochs"] == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def test_cli_app_without_streamlit_app_is_a_clear_error(models, monkeypatch, tmp_path, capsys):
    from tspg import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "pkg" / "tspg" / "cli.py"))
    assert cli.main(["app", "--models", str(models)]) == 2
    assert "streamlit_app.py not found" in capsys.readouterr().err


def test_target_picker_switches_the_bundle(models, monkeypatch, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models, root)
    src = next(p for p in root.iterdir() if p.is_dir())
    other = root / "pbmc-dendritic"
    shutil.copytree(
        src, other
    )  # same genes and classes, another target (the weights do not matter here)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(name="pbmc-dendritic", target="Dendritic")
    (other / "manifest.json").write_text(json.dumps(manifest))
    at = ok(app(root, monkeypatch).run())
    ok(at.switch_page("app_pages/perturb.py").run())
    picker = at.selectbox(key="perturb_target")
    assert set(picker.options) == {DEMO_TARGET, "Dendritic"}  # a name only when targets repeat
    picker.set_value("pbmc-dendritic")
    ok(at.run())
    assert at.sidebar.selectbox(key="bundle").value == "pbmc-dendritic"
    assert at.subheader[0].value == "20 samples → Dendritic"
    assert (tables(at)[0].value["label"] != "Dendritic").all()


def test_cli_app_listens_on_this_machine_unless_told(models, monkeypatch, caplog):
    """``tspg app`` passes 127.0.0.1 to streamlit; --address 0.0.0.0 exposes it, with a warning."""
    from tspg import cli

    calls = []
    monkeypatch.setattr(cli, "_exec", lambda cmd, env, cwd: calls.append((cmd, env)) or 0)
    assert cli.main(["app", "--models", str(models), "--headless"]) == 0
    cmd, env = calls[-1]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert env["TSPG_MODELS_DIR"] == str(models.resolve())
    with caplog.at_level("WARNING", logger="tspg"):
        assert cli.main(["app", "--models", str(models), "--address", "0.0.0.0"]) == 0
    cmd, _ = calls[-1]
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert "anyone who can reach this machine" in caplog.text
