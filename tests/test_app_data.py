"""The dashboard with a bundle trained on data tspg cannot find itself (not the demo).

Its own dataset is an upload recognised by the fingerprint stored in the bundle; then the
split, the held-out checkbox, the target mean and the baselines all apply. The dataset has
12 classes, so the map's default classes (ten at most) must be chosen: the target and the
source classes of the selection come first.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_NETS
from test_app import app, chart_data, charts, fresh_streamlit, ok, tables, texts  # noqa: F401 (fresh_streamlit: autouse fixture)

from tspg.bundle import save_bundle
from tspg.config import TrainConfig
from tspg.datasets import synthetic_gem
from tspg.pipeline import train

TARGET = "class-00"
H5AD = "application/octet-stream"


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A bundle trained on a 12-class synthetic GEM, and that GEM as .h5ad bytes."""
    adata = synthetic_gem(n_samples=360, n_genes=40, n_classes=12, seed=1)
    config = TrainConfig.for_recipe("tspg+", epochs=5, target_epochs=5, batch_size=64, **SMALL_NETS)
    bundle = train(
        adata, label_key="label", target=TARGET, config=config, device="cpu", dataset="synthetic12"
    )
    root = tmp_path_factory.mktemp("elsewhere_models")
    save_bundle(bundle, root)
    path = tmp_path_factory.mktemp("elsewhere_data") / "synthetic12.h5ad"
    adata.write_h5ad(path)
    changed = adata.copy()
    changed.X[0, 0] += 1.0  # one value differs: not the data the bundle was trained on
    changed.write_h5ad(other := path.with_name("changed.h5ad"))
    return SimpleNamespace(
        root=root, bundle=bundle, adata=adata, h5ad=path.read_bytes(), changed=other.read_bytes()
    )


def upload(at, name: str, data: bytes, source: str = "bundle"):
    at.sidebar.radio(key="data_source").set_value(source)
    at.run()
    at.sidebar.file_uploader(key="upload").set_value((name, data, H5AD))
    return at.run()


def test_without_its_dataset_the_app_asks_for_it_instead_of_failing(elsewhere, monkeypatch):
    at = ok(app(elsewhere.root, monkeypatch).run())
    assert at.sidebar.radio(key="data_source").value == "bundle"
    hint = "was trained on synthetic12 (360 samples), which is not stored with the bundle: upload that .h5ad file"
    assert hint in texts(at.sidebar.info) and hint in texts(at.info)
    assert at.sidebar.file_uploader(key="upload")  # the upload is right there
    for page in ("app_pages/perturb.py", "app_pages/map.py", "app_pages/genes.py"):
        ok(at.switch_page(page).run())
        assert hint in texts(at.info)


def test_an_upload_of_its_dataset_counts_as_the_bundles_own(elsewhere, monkeypatch):
    bundle, test = elsewhere.bundle, set(elsewhere.bundle.split["test"])
    at = ok(upload(app(elsewhere.root, monkeypatch).run(), "synthetic12.h5ad", elsewhere.h5ad))
    assert "upload synthetic12.h5ad (the bundle's dataset): 360 samples x 40 genes" in texts(
        at.markdown
    )
    assert not at.sidebar.info  # recognised: no more hint

    ok(at.switch_page("app_pages/perturb.py").run())
    assert at.checkbox(key="sel_heldout").value
    pred = tables(at)[0].value
    assert len(pred) == 20 and set(pred.index) <= test and (pred["label"] != TARGET).all()
    heat = chart_data(charts(at)[0])
    tm = heat[heat.column == "target mean"].set_index("gene")["value"]
    np.testing.assert_allclose(
        tm.to_numpy(),
        pd.Series(bundle.target_mean, index=bundle.genes)[tm.index].to_numpy(),
        atol=1e-6,
    )
    at.checkbox(key="sel_heldout").uncheck()
    ok(at.run())
    assert set(tables(at)[0].value.index) - test  # training samples too, now

    ok(at.switch_page("app_pages/genes.py").run())
    overlap = next(d.value for d in at.dataframe if "baseline" in d.value)
    assert set(overlap["baseline"]) == {"differential expression", "mean shift"}
    assert "Baselines need" not in texts(at.info)

    # the same file under "Upload a .h5ad file" is still recognised
    at.sidebar.radio(key="data_source").set_value("upload")
    ok(at.switch_page("app_pages/perturb.py").run())
    at.checkbox(key="sel_heldout").check()
    ok(at.run())
    assert set(tables(at)[0].value.index) <= test


def test_other_data_is_not_taken_for_its_dataset(elsewhere, monkeypatch):
    at = upload(app(elsewhere.root, monkeypatch).run(), "changed.h5ad", elsewhere.changed)
    assert not at.exception
    assert "changed.h5ad is not synthetic12, the dataset" in texts(at.error)

    at = ok(upload(at, "changed.h5ad", elsewhere.changed, source="upload"))
    ok(at.switch_page("app_pages/perturb.py").run())
    assert "sel_heldout" not in [c.key for c in at.checkbox]  # not its data: no split
    assert len(tables(at)[0].value) == 20
    ok(at.switch_page("app_pages/genes.py").run())
    assert "Baselines need the bundle's own training data" in texts(at.info)


def test_map_default_classes_follow_the_selection(elsewhere, monkeypatch):
    labels = elsewhere.adata.obs["label"].astype(str)
    rare = list(
        labels.value_counts().index[-3:]
    )  # the three smallest classes: not among the 9 most frequent others
    assert TARGET not in rare
    at = ok(upload(app(elsewhere.root, monkeypatch).run(), "synthetic12.h5ad", elsewhere.h5ad))
    at.session_state["sel_mode"] = "class"
    at.session_state["sel_classes"] = rare[:2]
    ok(at.switch_page("app_pages/map.py").run())
    real = chart_data(charts(at)[0]).query("kind == 'real'")
    shown = set(real["class"])
    assert len(shown) == 10 and {TARGET, *rare[:2]} <= shown and rare[2] not in shown
    widget = at.multiselect(key="map_classes")
    assert (
        TARGET not in widget.options
        and len(widget.options) == 11
        and widget.proto.max_selections == 9
    )
    assert set(widget.value) == shown - {TARGET}

    at.session_state["sel_classes"] = rare[2:]  # a new selection: the default follows it
    ok(at.run())
    shown = set(chart_data(charts(at)[0]).query("kind == 'real'")["class"])
    assert len(shown) == 10 and {TARGET, rare[2]} <= shown

    at.multiselect(key="map_classes").set_value(rare[:2])  # the user's own choice stays
    ok(at.run())
    at.session_state["sel_classes"] = rare[2:] + rare[:1]
    ok(at.run())
    assert set(chart_data(charts(at)[0]).query("kind == 'real'")["class"]) == {TARGET, *rare[:2]}
