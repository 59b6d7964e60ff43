"""The t-SNE map kept on disk (plain arrays, no pickle) and the selected samples' moves on it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import make_tiny_adata

from tspg.embedding import (
    class_map,
    load_reference_map,
    map_cache_dir,
    place,
    place_moves,
    save_reference_map,
)
from tspg.perturbation import perturb_adata


@pytest.fixture(scope="module")
def adata():
    return make_tiny_adata()


def test_a_cached_map_is_read_back_and_places_points_exactly_as_the_fit(
    adata, tiny_bundle, tmp_path, caplog
):
    fit, rows = class_map(adata, tiny_bundle, cache_dir=tmp_path)
    [saved] = list(tmp_path.glob("*.npz"))
    with np.load(saved, allow_pickle=False) as npz:  # plain arrays: readable without pickle
        assert all(npz[k].dtype.kind != "O" for k in npz.files)
    with caplog.at_level(logging.INFO, logger="tspg.embedding"):
        read, rows2 = class_map(adata, tiny_bundle, cache_dir=tmp_path)
    assert "t-SNE map read from" in caplog.text
    np.testing.assert_array_equal(rows, rows2)
    np.testing.assert_array_equal(fit.coords, read.coords)
    assert read.samples == fit.samples and read.labels == fit.labels and read.params == fit.params
    pert = perturb_adata(adata[::7], tiny_bundle)
    np.testing.assert_allclose(place(read, pert.x_adv), place(fit, pert.x_adv), atol=1e-9)
    # another seed or other classes: another map, another file
    class_map(adata, tiny_bundle, cache_dir=tmp_path, seed=1)
    class_map(adata, tiny_bundle, cache_dir=tmp_path, classes=["alpha"])
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_other_values_are_not_taken_for_the_cached_map(adata, tiny_bundle, tmp_path):
    class_map(adata, tiny_bundle, cache_dir=tmp_path)
    changed = adata.copy()
    changed.X[0, 0] += 1.0
    class_map(changed, tiny_bundle, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_a_damaged_cache_file_is_refit_with_a_warning(adata, tiny_bundle, tmp_path, caplog):
    fit, _ = class_map(adata, tiny_bundle, cache_dir=tmp_path)
    [saved] = list(tmp_path.glob("*.npz"))
    saved.write_bytes(b"not a map")
    with caplog.at_level(logging.WARNING, logger="tspg.embedding"):
        again, _ = class_map(adata, tiny_bundle, cache_dir=tmp_path)
    assert f"ignoring the cached t-SNE map {saved}" in caplog.text
    np.testing.assert_allclose(again.coords, fit.coords)  # refit, same seed: same map
    load_reference_map(saved)  # and written again, readable


def test_save_refuses_nothing_and_load_refuses_other_files(adata, tiny_bundle, tmp_path):
    ref, rows = class_map(adata, tiny_bundle)
    path = save_reference_map(
        ref, tmp_path / "m.npz", rows=rows, Z=ref.project(tiny_bundle.scale(adata)[rows])
    )
    assert load_reference_map(path)[0].samples == ref.samples
    np.savez(other := tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved t-SNE map"):
        load_reference_map(other)


def test_cache_folder_follows_tspg_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TSPG_CACHE_DIR", str(tmp_path))
    assert map_cache_dir() == tmp_path / "maps"
    monkeypatch.delenv("TSPG_CACHE_DIR")
    assert map_cache_dir().parts[-3:] == (".cache", "tspg", "maps")


def test_moves_place_before_and_after_as_placing_each_alone(adata, tiny_bundle):
    ref, _ = class_map(adata, tiny_bundle)
    pert = perturb_adata(adata[::5], tiny_bundle)
    before, after = place_moves(ref, pert)
    assert before.shape == after.shape == (len(pert), 2)
    np.testing.assert_allclose(before, place(ref, pert.x), atol=1e-9)
    np.testing.assert_allclose(after, place(ref, pert.x_adv), atol=1e-9)
    assert np.linalg.norm(after - before, axis=1).max() > 0  # the generator moved them
