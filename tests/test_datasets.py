"""Synthetic data for scale and truth: the atlas-like sparse GEM and the planted-truth GEM (tspg/datasets.py)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from tspg.datasets import (
    atlas_gem,
    planted_gem,
    planted_truth,
    truth_recovery,
    write_atlas_gem,
)


def test_atlas_gem_shape_sparsity_normalisation_and_seed():
    a = atlas_gem(3000, 2000, n_classes=5, seed=1)
    assert a.shape == (3000, 2000)
    assert sp.issparse(a.X) and a.X.format == "csr" and a.X.dtype == np.float32
    assert a.X.has_sorted_indices
    density = a.X.nnz / (3000 * 2000)
    assert 0.04 < density < 0.06  # about 5% non-zero, as asked
    # normalize_total (10,000 per cell) then log1p
    totals = np.asarray(np.expm1(a.X).sum(1)).ravel()
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)
    assert a.obs["cell_type"].nunique() == 5
    sizes = a.obs["cell_type"].value_counts()
    assert sizes.max() > 1.5 * sizes.min()  # unequal classes
    # library sizes vary: the number of genes detected per cell spreads out
    detected = np.diff(a.X.indptr)
    assert detected.std() > 0.15 * detected.mean()
    same = atlas_gem(3000, 2000, n_classes=5, seed=1)
    assert (same.X != a.X).nnz == 0 and list(same.obs["cell_type"]) == list(a.obs["cell_type"])
    other = atlas_gem(3000, 2000, n_classes=5, seed=2)
    assert (other.X != a.X).nnz > 0
    assert atlas_gem(3000, 2000, n_classes=5, seed=1, density=0.1).X.nnz > 1.7 * a.X.nnz


def test_atlas_gem_has_class_programs_and_negative_binomial_counts():
    a = atlas_gem(4000, 1000, n_classes=4, seed=0)
    truth = a.uns["truth"]
    counts = np.round(np.expm1(a.X.toarray()))  # back to counts x 10,000 / library size
    labels = a.obs["cell_type"].astype(str).to_numpy()
    for c, up in truth["up"].items():
        cols = a.var_names.get_indexer(up)
        inside = a.X[labels == c][:, cols].mean()
        outside = a.X[labels != c][:, cols].mean()
        assert inside > 2 * outside  # the class's program is up in the class
    # over-dispersed like a negative binomial: variance well above the mean (Poisson: equal)
    c0 = labels == labels[0]
    top = np.argsort(counts[c0].mean(0))[-50:]
    m, v = counts[c0][:, top].mean(0), counts[c0][:, top].var(0)
    assert np.median(v / m) > 1.5


def test_write_atlas_gem_streams_the_same_gem(tmp_path):
    path = write_atlas_gem(tmp_path / "atlas.h5ad", 5000, 300, n_classes=3, seed=4)
    back = ad.read_h5ad(path)
    a = atlas_gem(5000, 300, n_classes=3, seed=4)
    assert back.shape == a.shape and (back.X != a.X).nnz == 0
    assert list(back.obs_names) == list(a.obs_names)
    assert list(back.uns["truth"]["up"]["type-00"]) == list(a.uns["truth"]["up"]["type-00"])
    assert [p.name for p in tmp_path.iterdir()] == ["atlas.h5ad"]


def test_planted_gem_returns_its_truth():
    p = planted_gem(n_samples=300, n_genes=200, n_classes=3, n_up=8, n_down=6, seed=0)
    assert p.shape == (300, 200) and isinstance(p.X, np.ndarray) and p.X.dtype == np.float32
    table = planted_truth(p)
    assert len(table) == 3 * (8 + 6) and table["gene"].is_unique  # disjoint programs
    labels = p.obs["label"].astype(str).to_numpy()
    for c in sorted(set(labels)):
        up = p.var_names.get_indexer(table.query("`class` == @c and direction == 'up'")["gene"])
        down = p.var_names.get_indexer(table.query("`class` == @c and direction == 'down'")["gene"])
        mine, rest = p.X[labels == c], p.X[labels != c]
        assert (mine[:, up].mean(0) > rest[:, up].mean(0)).all()
        assert (mine[:, down].mean(0) < rest[:, down].mean(0)).all()
    target = "type-01"
    up = list(table.query("`class` == @target and direction == 'up'")["gene"])
    down = list(table.query("`class` == @target and direction == 'down'")["gene"])
    wrong = list(table.query("`class` == 'type-00' and direction == 'up'")["gene"])
    score = truth_recovery(p, target, up=up[:4] + wrong[:4], down=down)
    assert score == {
        "up": 0.5,
        "n_up": 8,
        "planted_up": 8,
        "down": 1.0,
        "n_down": 6,
        "planted_down": 6,
    }
    assert truth_recovery(p, target, up=wrong)["up"] == 0.0
    assert sp.issparse(planted_gem(n_samples=60, n_genes=50, n_up=2, n_down=2, sparse=True).X)
    with pytest.raises(ValueError, match="no planted genes"):
        truth_recovery(p, "type-99", up=up)
    with pytest.raises(ValueError, match="exceed"):
        planted_gem(n_genes=20, n_classes=4, n_up=5, n_down=5)
