"""t-SNE reference map: sample selection, determinism, placement, joint map, tidy frame."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tspg.embedding import (
    ReferenceMap,
    fit_class_map,
    fit_joint_map,
    fit_reference_map,
    map_classes,
    map_frame,
    place,
    select_map_samples,
)


def _knn_recovery(coords: np.ndarray, labels, k: int = 5) -> float:
    """Leave-one-out k-NN vote on map coordinates: fraction of samples whose class it recovers."""
    labels = np.asarray(labels)
    d = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    hits = 0
    for i, row in enumerate(nn):
        values, counts = np.unique(labels[row], return_counts=True)
        hits += values[counts.argmax()] == labels[i]
    return hits / len(labels)


@pytest.fixture(scope="module")
def tiny_map():
    from conftest import make_tiny_adata

    adata = make_tiny_adata()
    X = adata.X / adata.X.max(0)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    ref = fit_reference_map(X, samples=adata.obs_names, labels=labels, seed=0, perplexity=10)
    return ref, X, labels


# ------------------------------------------------------------------ select_map_samples


def test_select_target_first_and_max_classes():
    labels = np.array(["a"] * 5 + ["b"] * 9 + ["c"] * 2 + ["d"] * 7)
    idx = select_map_samples(labels, max_classes=2, target="c")
    assert sorted(set(labels[idx])) == ["b", "c"]  # the target, then the most frequent
    assert (np.diff(idx) > 0).all()
    assert set(labels[select_map_samples(labels, max_classes=3)]) == {"b", "d", "a"}


def test_select_explicit_classes_and_seeded_subsample():
    labels = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20)
    idx = select_map_samples(labels, classes=["b", "a"], max_per_class=10, seed=1)
    assert len(idx) == 20 and set(labels[idx]) == {"a", "b"}
    assert np.array_equal(
        idx, select_map_samples(labels, classes=["b", "a"], max_per_class=10, seed=1)
    )
    assert not np.array_equal(
        idx, select_map_samples(labels, classes=["b", "a"], max_per_class=10, seed=2)
    )
    # the target is added when the caller's classes lack it
    assert set(labels[select_map_samples(labels, classes=["a"], target="c")]) == {"a", "c"}


def test_map_classes_order():
    labels = np.array(["a"] * 5 + ["b"] * 9 + ["c"] * 2 + ["d"] * 7)
    assert map_classes(labels, target="c") == ["c", "b", "d", "a"]  # the target, then by frequency
    assert map_classes(labels, target="c", max_classes=2) == ["c", "b"]
    assert map_classes(labels, classes=["a", "d"], target="c") == ["c", "a", "d"]
    assert map_classes(labels, classes=["a", "d", "b"], max_classes=None) == ["a", "d", "b"]


def test_fit_class_map_rows_and_subsample(tiny_map):
    _, X, labels = tiny_map
    names = np.array([f"s{i:03d}" for i in range(len(X))])
    ref, idx = fit_class_map(
        X, labels, names, classes=["alpha"], target="beta", max_per_class=8, seed=3, perplexity=5
    )
    assert len(idx) == len(ref) == 16 and (np.diff(idx) > 0).all()
    assert ref.samples == names[idx].tolist() and ref.labels == labels[idx].tolist()
    assert set(ref.labels) == {"alpha", "beta"} and ref.seed == 3 and ref.params["perplexity"] == 5
    with pytest.raises(ValueError, match="3 names"):
        fit_class_map(X, labels, names[:3])


def test_select_unknown_class_is_a_clear_error():
    with pytest.raises(ValueError, match="not in the data"):
        select_map_samples(["a", "b"], target="z")
    with pytest.raises(ValueError, match="not in the data"):
        select_map_samples(["a", "b"], classes=["a", "q"])


# ------------------------------------------------------------------ reference map


def test_fit_shapes_params_and_determinism(tiny_map):
    ref, X, labels = tiny_map
    assert isinstance(ref, ReferenceMap)
    assert ref.coords.shape == (len(X), 2) and np.isfinite(ref.coords).all()
    assert ref.samples[0] == "s000" and ref.labels == list(labels)
    assert ref.params["n_genes"] == X.shape[1] and ref.params["method"] == "openTSNE"
    again = fit_reference_map(X, samples=ref.samples, labels=labels, seed=0, perplexity=10)
    np.testing.assert_array_equal(again.coords, ref.coords)
    other = fit_reference_map(X, samples=ref.samples, labels=labels, seed=1, perplexity=10)
    assert not np.allclose(other.coords, ref.coords)


def test_classes_separate_on_tiny(tiny_map):
    ref, _, labels = tiny_map
    assert _knn_recovery(ref.coords, labels) >= 0.95


def test_place_copies_land_near_their_originals(tiny_map):
    ref, X, labels = tiny_map
    rows = np.arange(0, len(X), 3)
    before = ref.coords.copy()
    xy = place(ref, X[rows])
    assert xy.shape == (len(rows), 2) and np.isfinite(xy).all()
    np.testing.assert_array_equal(ref.coords, before)  # the map never moves
    nearest = np.linalg.norm(xy[:, None] - ref.coords[None], axis=2).argmin(1)
    assert (np.asarray(labels)[nearest] == labels[rows]).mean() >= 0.9
    np.testing.assert_array_equal(place(ref, X[rows]), xy)  # deterministic
    # same frame as coords: placing the map's own points lands close to them
    spread = np.ptp(ref.coords, axis=0).max()
    assert np.median(np.linalg.norm(xy - ref.coords[rows], axis=1)) < 0.1 * spread


def test_place_checks_genes_and_pickling(tiny_map):
    ref, X, _ = tiny_map
    with pytest.raises(ValueError, match="genes"):
        place(ref, X[:3, :-1])
    assert place(ref, X[:0]).shape == (0, 2)
    clone = pickle.loads(pickle.dumps(ref))
    assert clone.embedding is None
    np.testing.assert_array_equal(clone.coords, ref.coords)
    with pytest.raises(ValueError, match="fit it again"):
        place(clone, X[:3])


def test_pca_is_kept_and_applied(tiny_map):
    from conftest import make_tiny_adata

    adata = make_tiny_adata(n_genes=40)
    X = adata.X / adata.X.max(0)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    ref = fit_reference_map(X, samples=adata.obs_names, labels=labels, perplexity=10, n_pcs=5)
    assert ref.pca is not None and ref.pca.components.shape == (5, 40) and ref.params["n_pcs"] == 5
    assert ref.project(X[:4]).shape == (4, 5)
    assert place(ref, X[:4]).shape == (4, 2)


def test_too_few_samples_and_mismatched_names():
    X = np.random.default_rng(0).random((4, 6))
    with pytest.raises(ValueError, match="at least 5"):
        fit_reference_map(X, samples=list("abcd"), labels=list("xxyy"))
    with pytest.raises(ValueError, match="names"):
        fit_reference_map(np.vstack([X, X]), samples=list("abc"), labels=list("xxyyxxyy"))


def test_joint_map(tiny_map):
    _, X, labels = tiny_map
    real, new = fit_joint_map(X, X[:7] + 0.01, seed=0, perplexity=10)
    assert real.shape == (len(X), 2) and new.shape == (7, 2)
    real2, new2 = fit_joint_map(X, X[:7] + 0.01, seed=0, perplexity=10)
    np.testing.assert_array_equal(real, real2)
    np.testing.assert_array_equal(new, new2)
    nearest = np.linalg.norm(new[:, None] - real[None], axis=2).argmin(1)
    assert (labels[nearest] == labels[:7]).all()
    with pytest.raises(ValueError, match="genes"):
        fit_joint_map(X, X[:2, :3])


# ------------------------------------------------------------------ map_frame


def test_map_frame(tiny_map):
    ref, X, labels = tiny_map
    real = map_frame(ref)
    assert list(real.columns) == ["x", "y", "sample", "class", "predicted", "kind"]
    assert len(real) == len(ref) and set(real["kind"]) == {"real"}
    xy = place(ref, X[:4])
    f = map_frame(
        ref,
        xy,
        new_samples=["p0", "p1", "p2", "p3"],
        new_source=labels[:4],
        new_pred=["beta"] * 4,
        real_pred=labels,
    )
    assert len(f) == len(ref) + 4
    new = f[f["kind"] == "perturbed"]
    assert new["sample"].tolist() == ["p0", "p1", "p2", "p3"]
    assert new["predicted"].tolist() == ["beta"] * 4 and new["class"].tolist() == list(labels[:4])
    np.testing.assert_allclose(new[["x", "y"]].to_numpy(), xy)
    assert f.loc[f["kind"] == "real", "predicted"].tolist() == list(labels)
    default = map_frame(ref, xy)
    assert default["sample"].iloc[-1] == "perturbed-3"
    with pytest.raises(ValueError, match="new_pred"):
        map_frame(ref, xy, new_pred=["a"])


# ------------------------------------------------------------------ demo data


@pytest.fixture(scope="module")
def demo_arrays():
    from tspg.datasets import DEMO_LABEL_KEY, demo

    adata = demo()
    X = adata.X
    X = (X - X.min(0)) / np.maximum(X.max(0) - X.min(0), 1e-8)
    return (
        X,
        adata.obs[DEMO_LABEL_KEY].astype(str).to_numpy(),
        np.asarray(adata.obs_names).astype(str),
    )


def test_demo_map_separates_classes(demo_arrays):
    """The demo's bulk labels (sorted PBMC populations) overlap: a 5-NN vote recovers ~0.78
    of them even in the 50-PC input space (the T-cell subsets mix). The map must keep
    that structure: at least 0.75, and no worse than the input space by more than 0.03."""
    X, labels, names = demo_arrays
    ref, idx = fit_class_map(X, labels, names, target="CD14+ Monocyte", max_per_class=None, seed=0)
    on_map = _knn_recovery(ref.coords, labels[idx])
    in_input = _knn_recovery(ref.project(X[idx]), labels[idx])
    assert on_map >= 0.75 and on_map >= in_input - 0.03, (on_map, in_input)
    xy = place(ref, X[idx[:50]])
    nearest = np.linalg.norm(xy[:, None] - ref.coords[None], axis=2).argmin(1)
    assert (labels[idx][nearest] == labels[idx[:50]]).mean() >= 0.8
