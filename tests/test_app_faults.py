"""The dashboard with bad bundles beside a good one, and bad uploads (issue 10's app cases).

Damaged, NaN and mistyped bundles in the models folder are listed as unreadable, with
their reason, and every page still works with the good bundle; a link naming a bad bundle
opens the good one with a note; a bad upload is one line naming the uploaded file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_app import app, fresh_streamlit, ok, tables, texts  # noqa: F401 (fresh_streamlit: autouse)

from tspg.bundle import list_bundles
from tspg.datasets import DEMO_TARGET

PAGES = ["home", "models", "perturb", "map", "genes", "enrichment"]


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def bad_models(demo_models_dir, tmp_path_factory) -> tuple[Path, str]:
    """The demo bundle, and beside it four bad copies of it and a folder whose manifest cannot be read."""
    root = tmp_path_factory.mktemp("bad_models")
    [good] = [
        p for p in Path(demo_models_dir).iterdir() if p.is_dir() and not p.name.startswith(".")
    ]
    shutil.copytree(good, root / good.name)
    nan = root / "a-nan-generator"
    shutil.copytree(good, nan)
    weights = load_file(nan / "generator.safetensors")
    nan_weights = {
        k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in weights.items()
    }
    save_file(nan_weights, nan / "generator.safetensors")
    scaler = root / "a-nan-scaler"
    shutil.copytree(good, scaler)
    text = (scaler / "manifest.json").read_text()
    (scaler / "manifest.json").write_text(text.replace('"range": [', '"range": [NaN, ', 1))
    typed = root / "a-metrics-of-text"
    shutil.copytree(good, typed)
    _edit_manifest(typed, lambda m: m.update(metrics="abc"))
    cut = root / "a-cut-short"
    shutil.copytree(good, cut)
    w = cut / "target_model.safetensors"
    w.write_bytes(w.read_bytes()[:-64])
    # a manifest that cannot be read (as another user's, mode 0600, would be; tests may run
    # as root, for whom permissions do not apply, so the reading fails another way)
    (root / "a-manifest-unreadable" / "manifest.json").mkdir(parents=True)
    return root, good.name


def test_bad_bundles_are_listed_as_unreadable_and_every_page_works(bad_models, monkeypatch):
    root, good = bad_models
    bad = sorted(e.name for e in list_bundles(root) if e.error is not None)
    assert bad == [
        "a-cut-short",
        "a-manifest-unreadable",
        "a-metrics-of-text",
        "a-nan-generator",
        "a-nan-scaler",
    ]
    at = ok(app(root, monkeypatch).run())
    assert at.sidebar.selectbox(key="bundle").options == [good]
    assert "5 unreadable bundle(s): see the Models page." in texts(at.sidebar.caption)
    for page in PAGES:
        ok(at.switch_page(f"app_pages/{page}.py").run())
        assert at.sidebar.selectbox(key="bundle").value == good, page
    ok(at.switch_page("app_pages/models.py").run())
    table = tables(at)[0].value
    for name in bad:
        assert table.loc[name, "status"] == "unreadable"
        assert table.loc[name, "error"], name
        assert name in texts(at.warning)
    assert "NaN" in table.loc["a-nan-generator", "error"]
    assert "NaN" in table.loc["a-nan-scaler", "error"]
    assert table.loc[good, "status"] == "ok" and table.loc[good, "target"] == DEMO_TARGET


def test_a_link_to_a_bad_bundle_opens_the_good_one_with_a_note(bad_models, monkeypatch):
    root, good = bad_models
    at = app(root, monkeypatch)
    at.query_params = {"bundle": "a-nan-generator"}
    ok(at.switch_page("app_pages/perturb.py").run())
    assert "bundle=a-nan-generator" in texts(at.warning)
    assert at.sidebar.selectbox(key="bundle").value == good
    assert len(tables(at)[0].value) == 20  # the good bundle perturbs


@pytest.mark.parametrize(
    ("name", "data", "said"),
    [
        ("garbage.h5ad", b"this is not HDF5", "garbage.h5ad: not a readable .h5ad file"),
        ("empty.h5ad", b"", "empty.h5ad: the file is empty"),
        ("notes.txt", b"hello", "notes.txt: upload a .h5ad file"),
    ],
)
def test_a_bad_upload_is_one_line_naming_the_file(bad_models, monkeypatch, name, data, said):
    root, _ = bad_models
    at = ok(app(root, monkeypatch).run())
    at.sidebar.radio(key="data_source").set_value("upload")
    ok(at.run())
    at.sidebar.file_uploader(key="upload").set_value((name, data, "application/octet-stream"))
    at.switch_page("app_pages/perturb.py").run()
    assert not at.exception
    [error] = at.error
    assert said in error.value and "\n" not in error.value.strip()
    assert "tspg-upload" not in error.value and "/tmp" not in error.value  # not the server's copy
