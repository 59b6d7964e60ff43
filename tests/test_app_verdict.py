"""Verdicts and gene matching in the dashboard (issues 9 and 13 item 4), through AppTest.

A bundle whose target model learnt shuffled labels fails in the sidebar, on Home, on the
Models page and at the top of every analysis page; z-scored data fail the data-fit check on
the Perturb page, with a warning about their units; genes found ignoring case, by a ``var``
column or a few missing are said so, the missing ones downloadable, and the data perturbed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_app import app, fresh_streamlit, metrics, ok, tables, texts  # noqa: F401 (fresh_streamlit: autouse)

from tspg.bundle import save_bundle
from tspg.datasets import demo

H5AD = "application/octet-stream"


@pytest.fixture(scope="module")
def shuffled(shuffled_bundle, tmp_path_factory):
    """A bundle whose target model was trained on shuffled labels, and its data as .h5ad."""
    bundle, adata = shuffled_bundle
    assert bundle.manifest["verdict"]["level"] == "fail"
    root = tmp_path_factory.mktemp("shuffled_models")
    save_bundle(bundle, root)
    path = tmp_path_factory.mktemp("shuffled_data") / "shuffled.h5ad"
    adata.write_h5ad(path)
    return root, path.read_bytes()


@pytest.fixture(scope="module")
def demo_models(demo_models_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verdict_models")
    for p in Path(demo_models_dir).iterdir():
        if p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, root / p.name)
    return root


def upload(at, name: str, data: bytes, source: str = "upload"):
    at.sidebar.radio(key="data_source").set_value(source)
    at.run()
    at.sidebar.file_uploader(key="upload").set_value((name, data, H5AD))
    return at.run()


def h5ad_bytes(adata, tmp_path, name: str) -> bytes:
    adata.write_h5ad(path := tmp_path / name)
    return path.read_bytes()


def badge(block, text: str, color: str) -> bool:
    """Whether ``block`` shows a badge of ``color`` holding ``text`` (st.badge is Markdown)."""
    return any(m.value.startswith(f":{color}-badge[") and text in m.value for m in block.markdown)


# ----------------------------------------------------------------------------- a failing bundle


def test_a_bundle_on_shuffled_labels_fails_everywhere(shuffled, monkeypatch):
    root, data = shuffled
    at = ok(app(root, monkeypatch).run())
    assert badge(at.sidebar, "verdict: fail", "red")
    assert badge(at.main, "Verdict on this bundle: fail", "red")
    ok(at.switch_page("app_pages/models.py").run())
    table = tables(at)[0].value
    assert set(table["verdict"]) == {"fail"}
    assert "target model" in table["verdict summary"].iloc[0]
    # the analysis pages, with the bundle's own data uploaded: the selection fails too, and why
    upload(at, "shuffled.h5ad", data, source="bundle")
    for page in ("perturb", "genes", "enrichment"):
        ok(at.switch_page(f"app_pages/{page}.py").run())
        assert badge(at.main, "Verdict on this selection: fail", "red"), page
        why = next(d.value for d in at.dataframe if "reason" in d.value.columns)
        row = why[why["check"] == "target model"].iloc[0]
        assert row["level"] == "fail" and "cannot tell 'beta' apart" in row["reason"]
        assert why["level"].iloc[0] == "fail"  # the worst first


# ----------------------------------------------------------------------------- data that do not fit


def test_zscored_data_fail_the_data_fit_check_on_the_perturb_page(
    demo_models, monkeypatch, tmp_path
):
    import scanpy as sc

    z = sc.datasets.pbmc68k_reduced()  # .X is z-scored; the demo bundle learnt log counts
    at = ok(app(demo_models, monkeypatch).run())
    upload(at, "zscored.h5ad", h5ad_bytes(z, tmp_path, "zscored.h5ad"))
    ok(at.switch_page("app_pages/perturb.py").run())
    assert badge(at.main, "Verdict on this selection: fail", "red")
    units = texts(at.warning)
    assert "fall outside the range of the bundle's training data" in units
    assert "other units or normalised differently" in units
    why = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    fit = why[why["check"] == "data fit the model"].iloc[0]
    assert fit["level"] == "fail" and "outside the training range" in fit["reason"]


# ----------------------------------------------------------------------------- gene matching


def test_genes_matched_ignoring_case_by_symbols_or_a_few_missing(
    demo_models, monkeypatch, tmp_path
):
    cells = demo()[::10].copy()
    at = ok(app(demo_models, monkeypatch).run())

    lower = cells.copy()
    lower.var_names = [g.lower() for g in lower.var_names]
    upload(at, "lower.h5ad", h5ad_bytes(lower, tmp_path, "lower.h5ad"))
    ok(at.switch_page("app_pages/perturb.py").run())
    assert "765 only when ignoring case" in texts(at.info)
    assert metrics(at)["Samples"] == "20"

    by_id = cells.copy()
    by_id.var["gene_symbols"] = list(by_id.var_names)
    by_id.var_names = [f"ENSG{i:011d}" for i in range(by_id.n_vars)]
    upload(at, "ids.h5ad", h5ad_bytes(by_id, tmp_path, "ids.h5ad"))
    ok(at.run())
    assert "by the symbols in var['gene_symbols']" in texts(at.info)
    assert metrics(at)["Samples"] == "20"

    dropped = ["LYZ", "CD79A", "GNLY"]
    few = cells[:, ~cells.var_names.isin(dropped)].copy()
    upload(at, "few.h5ad", h5ad_bytes(few, tmp_path, "few.h5ad"))
    ok(at.run())
    note = texts(at.info)
    assert "762 of the model's 765 genes found" in note and "3 missing" in note
    assert "filled with the training" in note
    dl = next(b for b in at.download_button if b.key == "dl_missing_genes")
    assert dl.label == "The 3 missing genes (CSV)"
    assert metrics(at)["Samples"] == "20"  # perturbed, the genes filled in
    why = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    fit = why[why["check"] == "data fit the model"].iloc[0]
    assert "genes missing: 3" in fit["figures"]

    most = cells[:, :300].copy()  # 465 of 765 missing: refused, with the list to download
    upload(at, "most.h5ad", h5ad_bytes(most, tmp_path, "most.h5ad"))
    at.run()
    assert not at.exception
    [error] = at.error
    assert "465 of the model's 765 genes are missing (61%)" in error.value
    assert any(b.key == "dl_missing_genes" for b in at.download_button)
    assert not at.get("arrow_vega_lite_chart") + at.get("vega_lite_chart")
