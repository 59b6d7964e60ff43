"""From AnnData to a bundle: gene choice, split, scaler, metrics (tspg/pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SMALL_NETS, TINY_CLASSES, make_tiny_adata

from tspg.data import Scaler
from tspg.genesets import select_genes
from tspg.perturb import class_probabilities, generate_perturbed
from tspg.pipeline import heldout_metrics, prepare, train
from tspg.train import TrainConfig


@pytest.mark.parametrize("fixture", ["tiny_bundle", "quick_bundle"])
def test_bundle_fixtures_train_and_move_samples(request, fixture):
    """The smoke test of the shared fixtures: a short run on the tiny GEM does the job."""
    bundle = request.getfixturevalue(fixture)
    assert bundle.path is not None and (bundle.path / "manifest.json").exists()
    m = bundle.metrics
    assert m["target_model_accuracy"] >= 0.9
    assert m["perturbation_accuracy_non_target"] >= 0.9
    assert set(m["perturbation_accuracy_by_source"]) == {"alpha", "gamma"}
    assert m["device"] == "cpu"


def test_prepare_splits_and_scales_on_training_only():
    adata = make_tiny_adata()
    prep = prepare(adata, label_key="cell_type", seed=3, dataset="tiny")
    assert prep.classes == TINY_CLASSES and prep.genes == list(adata.var_names)
    assert len(prep.test_idx) == 12 and len(prep.train_idx) == 48
    assert np.bincount(prep.y[prep.test_idx]).tolist() == [4, 4, 4]
    raw_train = adata.X[prep.train_idx]
    np.testing.assert_allclose(prep.scaler.minimum, raw_train.min(0))
    np.testing.assert_allclose(prep.X[prep.train_idx].max(0), 1.0, atol=1e-6)
    assert prep.X.min() >= 0 and prep.X.max() <= 1
    again = prepare(adata, label_key="cell_type", seed=3, dataset="tiny")
    assert np.array_equal(again.test_idx, prep.test_idx) and again.fingerprint == prep.fingerprint
    other = prepare(make_tiny_adata(seed=1), label_key="cell_type", seed=3, dataset="tiny")
    assert other.fingerprint != prep.fingerprint


def test_prepare_with_a_gene_set(tmp_path):
    adata = make_tiny_adata()
    gmt = tmp_path / "s.gmt"
    gmt.write_text("BLOCKS\td\tG09\tG02\tG05\tNOPE\n")
    prep = prepare(adata, label_key="cell_type", genes=select_genes(adata.var_names, gene_set=f"{gmt}:BLOCKS"))
    assert prep.genes == ["G02", "G05", "G09"] and prep.X.shape == (60, 3)
    assert prep.gene_set.missing == ["NOPE"]


def test_prepare_errors():
    adata = make_tiny_adata()
    with pytest.raises(ValueError, match=r"tiny: no label column 'tissue' in obs \(columns: cell_type\)"):
        prepare(adata, label_key="tissue", dataset="tiny")
    prep = prepare(adata, label_key="cell_type", dataset="tiny")
    with pytest.raises(ValueError, match="target class 'delta' is not among the 3 classes of 'cell_type': alpha, beta, gamma"):
        prep.class_index("delta")


def test_prepare_reusing_a_bundle_takes_its_split_scaler_and_genes(quick_bundle):
    adata = make_tiny_adata()
    shuffled = adata[::-1, ::-1].copy()  # other sample and gene order
    prep = prepare(shuffled, label_key="cell_type", seed=99, reuse=quick_bundle)
    assert prep.genes == quick_bundle.genes and prep.classes == quick_bundle.classes
    assert [prep.samples[i] for i in prep.test_idx] == quick_bundle.split["test"]
    assert [prep.samples[i] for i in prep.train_idx] == quick_bundle.split["train"]
    np.testing.assert_array_equal(prep.scaler.range, quick_bundle.scaler.range)
    missing = adata[adata.obs_names != quick_bundle.split["test"][0]].copy()
    with pytest.raises(ValueError, match=f"sample '{quick_bundle.split['test'][0]}' of 'tiny-beta''s split is not in this data"):
        prepare(missing, label_key="cell_type", reuse=quick_bundle)


def test_heldout_metrics_recomputed_by_hand(quick_bundle):
    adata = make_tiny_adata()
    prep = prepare(adata, label_key="cell_type", reuse=quick_bundle)
    t = quick_bundle.target_index
    m = heldout_metrics(prep, quick_bundle.target_model, quick_bundle.generator, t)
    assert m["perturbation_accuracy_non_target"] == quick_bundle.metrics["perturbation_accuracy_non_target"]
    Xte, yte = prep.X[prep.test_idx], prep.y[prep.test_idx]
    pred = class_probabilities(quick_bundle.target_model, np.clip(Xte + generate_perturbed(quick_bundle.generator, Xte)[0], 0, 1)).argmax(1)
    assert m["perturbation_accuracy"] == pytest.approx((pred == t).mean())
    assert m["perturbation_accuracy_by_source"]["alpha"] == pytest.approx((pred[yte == 0] == t).mean())
    assert m["target_model_accuracy"] == pytest.approx((class_probabilities(quick_bundle.target_model, Xte).argmax(1) == yte).mean())


def test_train_unknown_target_is_a_clear_error():
    cfg = TrainConfig(epochs=1, target_epochs=1, **SMALL_NETS)
    with pytest.raises(ValueError, match="target class 'delta' is not among"):
        train(make_tiny_adata(), label_key="cell_type", target="delta", config=cfg, device="cpu")


def test_scaler_in_bundle_is_the_training_scaler(quick_bundle):
    adata = make_tiny_adata()
    train_x = adata[quick_bundle.split["train"], quick_bundle.genes].X
    fitted = Scaler.fit(np.asarray(train_x))
    np.testing.assert_allclose(quick_bundle.scaler.minimum, fitted.minimum)
    np.testing.assert_allclose(quick_bundle.scaler.range, fitted.range, rtol=1e-6)
