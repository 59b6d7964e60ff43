"""Perturbing with a bundle, and top genes / consensus / unique-gene counts by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_adata

from tspg.perturbation import (
    consensus,
    consensus_top,
    generate_perturbed,
    perturb,
    perturb_adata,
    perturb_scaled,
    top_genes,
    top_genes_df,
    unique_top_genes,
)

GENES = ["A", "B", "C", "D", "E"]
# three samples, five genes; every value distinct within a row
P3 = np.array(
    [
        [0.5, -0.2, 0.1, -0.9, 0.3],
        [0.4, 0.3, -0.3, 0.2, -0.1],
        [0.6, -0.4, 0.2, -0.5, -0.3],
    ],
    dtype=np.float32,
)


# ----------------------------------------------------------------------------- top genes


def test_top_genes_by_hand():
    top = top_genes(P3, GENES, k=2)
    assert top.up.tolist() == [["A", "E"], ["A", "B"], ["A", "C"]]
    assert top.down.tolist() == [["D", "B"], ["C", "E"], ["D", "B"]]
    np.testing.assert_allclose(top.up_P, [[0.5, 0.3], [0.4, 0.3], [0.6, 0.2]])
    np.testing.assert_allclose(top.down_P, [[-0.9, -0.2], [-0.3, -0.1], [-0.5, -0.4]])
    assert top.up_index.tolist()[0] == [0, 4]
    assert top.k == 2


def test_top_genes_ties_k_too_large_and_one_sample():
    top = top_genes(
        np.array([1.0, 1.0, 0.0]), ["x", "y", "z"], k=10
    )  # 1-d: one sample; k capped at 3
    assert top.up.tolist() == [["x", "y", "z"]]  # the tie goes to the earlier gene
    assert top.down.tolist() == [["z", "x", "y"]]
    with pytest.raises(ValueError, match="genes"):
        top_genes(P3, GENES[:4])
    with pytest.raises(ValueError, match="k must be"):
        top_genes(P3, GENES, k=0)


def test_top_genes_df_is_tidy(quick_bundle):
    res = perturb_scaled(
        np.full((2, len(quick_bundle.genes)), 0.5, np.float32), quick_bundle, samples=["s1", "s2"]
    )
    df = top_genes_df(res, k=3)
    assert list(df.columns) == ["sample", "direction", "rank", "gene", "P"]
    assert len(df) == 2 * 2 * 3
    assert df["sample"].tolist()[:6] == ["s1"] * 6
    assert df["direction"].tolist()[:6] == ["up"] * 3 + ["down"] * 3
    assert df["rank"].tolist()[:6] == [1, 2, 3, 1, 2, 3]
    s1 = df[(df["sample"] == "s1") & (df["direction"] == "up")]
    j = [quick_bundle.genes.index(g) for g in s1["gene"]]
    np.testing.assert_allclose(s1["P"], res.P[0, j])
    assert s1["P"].is_monotonic_decreasing


# ----------------------------------------------------------------------------- consensus


def test_consensus_counts_by_hand():
    df = consensus(P3, GENES, k=2)
    assert list(df.columns) == ["gene", "direction", "count", "frequency", "mean_P"]
    up = df[df["direction"] == "up"]
    # top-2 up lists: {A,E}, {A,B}, {A,C}: A 3 times; B, C, E once each, then by mean P
    # mean P: B (-0.2+0.3-0.4)/3 = -0.1, C 0.0, E (0.3-0.1-0.3)/3 = -0.0333
    assert up["gene"].tolist() == ["A", "C", "E", "B"]
    assert up["count"].tolist() == [3, 1, 1, 1]
    np.testing.assert_allclose(up["frequency"], [1, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(up["mean_P"], [0.5, 0.0, -0.1 / 3, -0.1], atol=1e-7)
    down = df[df["direction"] == "down"]
    # top-2 down lists: {D,B}, {C,E}, {D,B}: D 2, B 2, C 1, E 1; ties by most negative mean P
    # mean P: D (-0.9+0.2-0.5)/3 = -0.4, B -0.1, C 0.0, E -0.0333
    assert down["gene"].tolist() == ["D", "B", "E", "C"]
    assert down["count"].tolist() == [2, 2, 1, 1]
    assert consensus_top(P3, GENES, k=2) == {"up": ["A", "C"], "down": ["D", "B"]}
    with pytest.raises(ValueError, match="no samples"):
        consensus(P3[:0], GENES)


def test_unique_top_genes_by_hand():
    labels = ["x", "y", "z"]  # one sample per class: the choice does not depend on the seed
    res = unique_top_genes(P3, labels, GENES, k=2, seed=123)
    assert (res["up"], res["down"], res["n_classes"], res["k"]) == (
        4,
        4,
        3,
        2,
    )  # {A,B,C,E}, {B,C,D,E}
    assert res["samples"] == [0, 1, 2]
    res = unique_top_genes(P3, labels, GENES, k=2, exclude="y")  # samples 0 and 2
    assert (res["up"], res["down"], res["n_classes"]) == (3, 2, 2)  # {A,E,C}, {D,B}
    res = unique_top_genes(P3, labels, GENES, k=1)
    assert (res["up"], res["down"]) == (1, 2)  # {A}, {D,C}


def test_unique_top_genes_is_seeded():
    rng = np.random.default_rng(0)
    P = rng.normal(size=(40, 30))
    labels = np.repeat(["a", "b", "c", "d"], 10)
    genes = [f"g{i}" for i in range(30)]
    first = unique_top_genes(P, labels, genes, k=5, seed=7)
    assert first == unique_top_genes(P, labels, genes, k=5, seed=7)
    assert [labels[i] for i in first["samples"]] == ["a", "b", "c", "d"]
    picked = top_genes(P[first["samples"]], genes, k=5)
    assert first["up"] == len(set(picked.up.ravel())) and first["down"] == len(
        set(picked.down.ravel())
    )
    with pytest.raises(ValueError, match="labels"):
        unique_top_genes(P, labels[:5], genes)


# ----------------------------------------------------------------------------- perturbing


def test_perturb_round_trip_shuffled_genes(quick_bundle, tiny_adata):
    res = perturb_adata(tiny_adata, quick_bundle)
    n, g = tiny_adata.n_obs, len(quick_bundle.genes)
    assert res.P.shape == res.x.shape == res.x_adv.shape == (n, g)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    np.testing.assert_allclose(res.x_adv, res.x + res.P, atol=1e-6)  # P is the change made
    assert (
        list(res.labels) == tiny_adata.obs["cell_type"].astype(str).tolist()
    )  # the bundle's label key
    order = np.random.default_rng(1).permutation(tiny_adata.n_vars)
    shuffled = perturb_adata(tiny_adata[:, order].copy(), quick_bundle)
    np.testing.assert_array_equal(shuffled.P, res.P)
    np.testing.assert_array_equal(shuffled.proba_after, res.proba_after)
    # the same numbers as a plain forward pass of the generator, clipped to the data range
    G = quick_bundle.generator.eval()
    with torch.no_grad():
        raw = G(torch.from_numpy(res.x)).numpy()
    np.testing.assert_allclose(res.x_adv, np.clip(res.x + raw, 0, 1), atol=1e-6)
    np.testing.assert_allclose(res.P, np.clip(res.x + raw, 0, 1) - res.x, atol=1e-6)
    inside = (res.x + raw >= 0) & (res.x + raw <= 1)
    np.testing.assert_allclose(
        res.P[inside], raw[inside], atol=1e-6
    )  # where nothing is clipped, P = G(x)
    assert (~inside).any() and (np.abs(res.P[~inside]) < np.abs(raw[~inside]) + 1e-6).all()
    assert (res.pred_after[res.labels != "beta"] == "beta").mean() > 0.8


def test_perturb_errors_name_the_problem(quick_bundle, tiny_adata):
    with pytest.raises(
        ValueError, match="G03"
    ):  # no gene may be missing (a few are filled by default)
        perturb_adata(
            tiny_adata[:, [g for g in tiny_adata.var_names if g != "G03"]].copy(),
            quick_bundle,
            max_missing=0,
        )
    with pytest.raises(ValueError, match="no layer 'counts'"):
        perturb_adata(tiny_adata, quick_bundle, layer="counts")
    with pytest.raises(ValueError, match="no column 'tissue'"):
        perturb_adata(tiny_adata, quick_bundle, label_key="tissue")
    with pytest.raises(ValueError, match="genes matrix"):
        perturb_scaled(np.zeros((3, 4), np.float32), quick_bundle)
    with pytest.raises(ValueError, match="in-place"):
        perturb(tiny_adata[:, ::-1].copy(), quick_bundle)
    # perturb() names the data as the caller says (e.g. the file it was read from)
    lacking = tiny_adata[:, [g for g in tiny_adata.var_names if g != "G03"]].copy()
    with pytest.raises(ValueError, match=r"^new\.h5ad: .*G03"):
        perturb(lacking, quick_bundle, source="new.h5ad", copy=True, max_missing=0)
    with pytest.raises(ValueError, match=r"^new\.h5ad: no layer 'counts'"):
        perturb(tiny_adata, quick_bundle, layer="counts", source="new.h5ad", copy=True)


def test_predictions_not_computed_is_a_clear_error(quick_bundle, tiny_adata):
    res = perturb_adata(tiny_adata, quick_bundle)
    bare = perturb_scaled(
        res.x, quick_bundle, samples=tiny_adata.obs_names, labels=res.labels, predict=False
    )
    np.testing.assert_array_equal(bare.P, res.P)  # the perturbation itself is there
    assert bare.predicted is False and res.predicted is True
    for read in (lambda r: r.pred_before, lambda r: r.pred_after, lambda r: r.predictions_df()):
        with pytest.raises(ValueError, match="predictions were not computed"):
            read(bare)
        with pytest.raises(ValueError, match="predictions were not computed"):
            read(bare.subset([0, 1]))


def test_perturb_anndata_slots_and_subset(quick_bundle):
    adata = make_tiny_adata(n_per_class=4)
    out = perturb(adata, quick_bundle, k=3, copy=True)
    assert {"tspg_x", "tspg_perturbation", "tspg_perturbed"} <= set(out.layers)
    assert out.obs["tspg_pred_after"].cat.categories.tolist() == quick_bundle.classes
    # probabilities of the predicted class and of the target, from the target model itself
    direct = perturb_adata(adata, quick_bundle)
    for when, proba in (("before", direct.proba_before), ("after", direct.proba_after)):
        pred = out.obs[f"tspg_pred_{when}"].astype(str).to_numpy()
        cls = [quick_bundle.classes.index(c) for c in pred]
        np.testing.assert_allclose(
            out.obs[f"tspg_prob_pred_{when}"], proba[np.arange(len(pred)), cls]
        )
        np.testing.assert_allclose(
            out.obs[f"tspg_prob_target_{when}"], proba[:, quick_bundle.classes.index("beta")]
        )
    assert (out.obs["tspg_prob_pred_after"] >= out.obs["tspg_prob_target_after"]).all()
    uns = out.uns["tspg"]
    assert uns["params"]["k"] == 3 and uns["params"]["target"] == "beta"
    assert uns["top_genes"]["up"].shape == (12, 3)
    res = perturb_adata(adata, quick_bundle)
    src = res.labels != "beta"
    expected = consensus(res.P[src], quick_bundle.genes, k=3)
    assert list(uns["consensus"]["gene"]) == expected["gene"].tolist()
    # in place on data holding exactly the bundle's genes
    perturb(adata, quick_bundle)
    np.testing.assert_array_equal(
        adata.layers["tspg_perturbation"], out.layers["tspg_perturbation"]
    )
    sub = res.subset(["s005", "s001"])
    assert sub.samples == ["s005", "s001"]
    np.testing.assert_array_equal(sub.P[1], res.P[1])
    assert res.subset(src).labels.tolist() == res.labels[src].tolist()
    # source rows: labels other than the target; all rows when unknown or all of the target
    np.testing.assert_array_equal(res.source_rows(), src)
    assert res.subset(~src).source_rows().all() and len(res.subset(~src)) == 4
    bare = adata.copy()
    bare.obs = bare.obs[[]]
    unlabelled = perturb_adata(bare, quick_bundle)
    assert unlabelled.labels is None and unlabelled.source_rows().all()
    with pytest.raises(ValueError, match="nope"):
        res.subset(["nope"])
    pred = res.predictions_df()
    assert list(pred.columns[:2]) == ["label", "pred_before"] and isinstance(pred, pd.DataFrame)


def test_generate_perturbed_chunks_and_empty(quick_bundle):
    import importlib

    tp = importlib.import_module(
        "tspg.perturbation"
    )  # (tspg.perturb the attribute is the function)

    X = np.random.default_rng(0).random((5, len(quick_bundle.genes)), dtype=np.float32)
    P, x_adv = generate_perturbed(quick_bundle.generator, X)
    chunk = tp._CHUNK
    try:
        tp._CHUNK = 2  # the chunked path gives the same numbers
        P2, x_adv2 = generate_perturbed(quick_bundle.generator, X)
    finally:
        tp._CHUNK = chunk
    np.testing.assert_allclose(P2, P, atol=1e-6)
    np.testing.assert_allclose(x_adv2, x_adv, atol=1e-6)
    P0, x0 = generate_perturbed(quick_bundle.generator, X[:0])
    assert P0.shape == x0.shape == (0, X.shape[1])
    quick_bundle.generator.train()
    try:
        generate_perturbed(quick_bundle.generator, X)
        assert quick_bundle.generator.training  # the previous mode is restored
    finally:
        quick_bundle.generator.eval()
    empty = perturb_scaled(X[:0], quick_bundle)
    assert empty.proba_after.shape == (0, len(quick_bundle.classes))


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_write_perturbed_streams_what_perturb_returns(quick_bundle, tmp_path, monkeypatch, storage):
    """The file written a chunk at a time holds exactly perturb(copy=True)'s result."""
    import importlib

    import anndata as ad
    import scipy.sparse as sp

    from tspg.perturbation import write_perturbed

    module = importlib.import_module(
        "tspg.perturbation"
    )  # (tspg.perturb the attribute is the function)

    adata = make_tiny_adata(n_per_class=7)
    adata.obsm["X_umap"] = np.arange(42, dtype=float).reshape(21, 2)
    if storage == "sparse":
        adata.X = sp.csr_matrix(np.where(adata.X > 1.2, adata.X, 0))
    expected = perturb(adata, quick_bundle, k=4, copy=True)
    monkeypatch.setattr(module, "_CHUNK_BYTES", 4 * 30 * 4)  # chunks of 4 samples
    out = write_perturbed(adata, quick_bundle, tmp_path / "p.h5ad", k=4)
    assert out.n_obs == 21
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert sp.issparse(back.X) == (storage == "sparse") == sp.issparse(expected.X)
    np.testing.assert_array_equal(
        back.X.toarray() if sp.issparse(back.X) else back.X,
        expected.X.toarray() if sp.issparse(expected.X) else expected.X,
    )
    # (chunks of 4 samples: the forward passes round the last bit differently)
    for name in ("tspg_x", "tspg_perturbation", "tspg_perturbed"):
        np.testing.assert_allclose(back.layers[name], expected.layers[name], atol=1e-6)
    pd.testing.assert_frame_equal(back.obs, expected.obs, atol=1e-6)
    pd.testing.assert_frame_equal(back.var, expected.var)
    np.testing.assert_array_equal(back.obsm["X_umap"], adata.obsm["X_umap"])
    for part in ("top_genes", "consensus"):
        for key, value in expected.uns["tspg"][part].items():
            if value.dtype.kind == "f":
                np.testing.assert_allclose(back.uns["tspg"][part][key], value, atol=1e-6)
            else:
                np.testing.assert_array_equal(back.uns["tspg"][part][key], value)
    assert back.uns["tspg"]["params"] == expected.uns["tspg"]["params"]
    assert [p.name for p in tmp_path.iterdir()] == ["p.h5ad"]
