"""From AnnData to a bundle: gene choice, split, scaler, metrics (tspg/pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SMALL_NETS, TINY_CLASSES, make_tiny_adata

from tspg.bundle import load_bundle, save_bundle
from tspg.config import TrainConfig
from tspg.data import Scaler
from tspg.genesets import select_genes
from tspg.perturbation import class_probabilities, generate_perturbed, perturb_adata
from tspg.pipeline import heldout_metrics, prepare, train


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
    assert m["matmul"] == "torch"  # layers this narrow multiply with torch's MKL


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
    prep = prepare(
        adata, label_key="cell_type", genes=select_genes(adata.var_names, gene_set=f"{gmt}:BLOCKS")
    )
    assert prep.genes == ["G02", "G05", "G09"] and prep.X.shape == (60, 3)
    assert prep.gene_set.missing == ["NOPE"]


def test_prepare_errors():
    adata = make_tiny_adata()
    with pytest.raises(
        ValueError, match=r"tiny: no label column 'tissue' in obs \(columns: cell_type\)"
    ):
        prepare(adata, label_key="tissue", dataset="tiny")
    prep = prepare(adata, label_key="cell_type", dataset="tiny")
    with pytest.raises(
        ValueError,
        match="target class 'delta' is not among the 3 classes of 'cell_type': alpha, beta, gamma",
    ):
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
    with pytest.raises(
        ValueError,
        match=f"sample '{quick_bundle.split['test'][0]}' of 'tiny-beta''s split is not in this data",
    ):
        prepare(missing, label_key="cell_type", reuse=quick_bundle)


def test_heldout_metrics_recomputed_by_hand(quick_bundle):
    adata = make_tiny_adata()
    prep = prepare(adata, label_key="cell_type", reuse=quick_bundle)
    t = quick_bundle.classes.index(quick_bundle.target)
    m = heldout_metrics(prep, quick_bundle.target_model, quick_bundle.generator, t)
    assert (
        m["perturbation_accuracy_non_target"]
        == quick_bundle.metrics["perturbation_accuracy_non_target"]
    )
    Xte, yte = prep.X[prep.test_idx], prep.y[prep.test_idx]
    pred = class_probabilities(
        quick_bundle.target_model,
        np.clip(Xte + generate_perturbed(quick_bundle.generator, Xte)[0], 0, 1),
    ).argmax(1)
    assert m["perturbation_accuracy"] == pytest.approx((pred == t).mean())
    assert m["perturbation_accuracy_by_source"]["alpha"] == pytest.approx(
        (pred[yte == 0] == t).mean()
    )
    assert m["target_model_accuracy"] == pytest.approx(
        (class_probabilities(quick_bundle.target_model, Xte).argmax(1) == yte).mean()
    )


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


def test_reusing_a_target_model_records_its_settings_and_loads(tmp_path):
    """The new bundle records the target model's own sizes and split settings, so it loads and
    reproduces its metrics; the new config's conflicting values (never used) are not stored."""
    adata = make_tiny_adata()
    first_cfg = TrainConfig(
        epochs=2,
        target_epochs=20,
        target_lr=3e-3,
        batch_size=32,
        split_seed=4,
        test_size=0.25,
        **SMALL_NETS,
    )
    first = train(
        adata, label_key="cell_type", target="alpha", config=first_cfg, device="cpu", dataset="tiny"
    )
    save_bundle(first, tmp_path)
    other = dict(
        SMALL_NETS, target_hidden=(24,), gen_encoder=(16,)
    )  # other target model and generator sizes
    new_cfg = TrainConfig(
        epochs=2,
        target_epochs=3,
        target_lr=1e-2,
        batch_size=32,
        split_seed=9,
        test_size=0.5,
        seed=7,
        **other,
    )
    second = train(
        adata,
        label_key="cell_type",
        target="gamma",
        config=new_cfg,
        device="cpu",
        dataset="tiny",
        target_model=load_bundle(tmp_path / "tiny-alpha"),
        name="second",
    )
    save_bundle(second, tmp_path)

    loaded = load_bundle(tmp_path / "second")
    cfg = loaded.config
    assert (cfg.target_hidden, cfg.target_epochs, cfg.target_lr) == ((32, 16), 20, 3e-3)
    assert (cfg.split_seed, cfg.test_size) == (4, 0.25)
    assert (cfg.seed, cfg.gen_encoder, cfg.target_batch_size) == (
        7,
        (16,),
        first_cfg.target_batch_size,
    )  # the generator's own
    assert loaded.split == first.split and len(first.split["test"]) == 15
    assert loaded.manifest["target_model_from"] == "tiny-alpha"
    held = perturb_adata(adata[loaded.split["test"]], loaded, label_key="cell_type")
    hit = held.pred_after == "gamma"
    assert loaded.metrics["perturbation_accuracy"] == pytest.approx(hit.mean())
    assert loaded.metrics["perturbation_accuracy_non_target"] == pytest.approx(
        hit[held.labels != "gamma"].mean()
    )
    assert loaded.metrics["target_model_accuracy"] == pytest.approx(
        (held.pred_before == held.labels).mean()
    )


def test_reusing_a_target_model_refuses_another_gene_set(quick_bundle, tmp_path):
    adata = make_tiny_adata()
    gmt = tmp_path / "s.gmt"
    gmt.write_text("BLOCKS\td\tG09\tG02\n")
    cfg = TrainConfig(epochs=1, **SMALL_NETS)
    with pytest.raises(
        ValueError,
        match=r"the target model of 'tiny-beta' was trained on its own 30 genes \(gene set 'all'\); another gene set cannot be chosen",
    ):
        train(
            adata,
            label_key="cell_type",
            target="gamma",
            config=cfg,
            device="cpu",
            target_model=quick_bundle,
            genes=select_genes(adata.var_names, gene_set=f"{gmt}:BLOCKS"),
        )
    prep = prepare(
        adata, label_key="cell_type", genes=select_genes(adata.var_names), reuse=quick_bundle
    )  # the same genes: fine
    assert prep.genes == quick_bundle.genes


# ----------------------------------------------------------------------------- big data


def test_prepare_sparse_and_backed_data_like_dense(tmp_path):
    import scipy.sparse as sp

    from tspg.data import read_gem
    from tspg.datasets import planted_gem

    sparse = planted_gem(
        n_samples=120, n_genes=60, n_classes=3, n_up=4, n_down=4, density=0.2, sparse=True
    )
    dense = sparse.copy()
    dense.X = sparse.X.toarray()
    path = tmp_path / "gem.h5ad"
    sparse.write_h5ad(path)
    on_disk = read_gem(path, label_key="label", backed=True)
    preps = [prepare(a, label_key="label", seed=2) for a in (dense, sparse, on_disk)]
    ref = preps[0]
    assert isinstance(ref.X, np.ndarray)
    for prep in preps[1:]:
        assert sp.issparse(prep.X) and prep.X.format == "csr"  # minima are 0: stays sparse
        np.testing.assert_allclose(prep.X.toarray(), ref.X, atol=1e-7)
        np.testing.assert_array_equal(prep.scaler.minimum, ref.scaler.minimum)
        np.testing.assert_array_equal(prep.scaler.range, ref.scaler.range)
        np.testing.assert_allclose(prep.training_mean, ref.training_mean, atol=1e-6)
        assert prep.fingerprint == ref.fingerprint  # the same data, however stored
        np.testing.assert_allclose(prep.class_mean(1), ref.class_mean(1), atol=1e-6)
    np.testing.assert_allclose(ref.training_mean, ref.X[ref.train_idx].mean(0), atol=1e-6)


def test_prepare_n_top_genes_on_the_training_split():
    from tspg.datasets import planted_gem
    from tspg.genesets import highly_variable_genes

    adata = planted_gem(n_samples=120, n_genes=80, n_classes=3, n_up=4, n_down=4, sparse=True)
    prep = prepare(adata, label_key="label", n_top_genes=15, seed=1)
    expected = highly_variable_genes(adata, 15, rows=prep.train_idx)
    assert prep.genes == expected.genes and prep.X.shape == (120, 15)
    assert prep.gene_set.name == "top 15 highly variable genes"
    with pytest.raises(ValueError, match="not both"):
        prepare(adata, label_key="label", n_top_genes=15, genes=select_genes(adata.var_names))


def test_heldout_metrics_on_a_seeded_subsample(quick_bundle):
    from tspg.data import subsample

    prep = prepare(make_tiny_adata(), label_key="cell_type", reuse=quick_bundle)
    t = quick_bundle.target_index
    m = heldout_metrics(prep, quick_bundle.target_model, quick_bundle.generator, t, max_samples=6)
    assert m["n_test"] == 6 and m["n_test_total"] == 12 and m["n_test_non_target"] == 4
    assert m == heldout_metrics(
        prep, quick_bundle.target_model, quick_bundle.generator, t, max_samples=6
    )
    used = prep.test_idx[subsample(prep.y[prep.test_idx], 6, seed=0)]
    Xte = prep.X[used]
    pred = class_probabilities(
        quick_bundle.target_model, generate_perturbed(quick_bundle.generator, Xte)[1]
    ).argmax(1)
    assert m["perturbation_accuracy"] == pytest.approx((pred == t).mean())
    full = heldout_metrics(prep, quick_bundle.target_model, quick_bundle.generator, t)
    assert full["n_test"] == full["n_test_total"] == 12


def test_tspg_train_n_top_genes_on_a_file_read_on_disk(tmp_path, capsys):
    import json

    from tspg.cli import train_main
    from tspg.datasets import planted_gem

    adata = planted_gem(n_samples=150, n_genes=100, n_classes=3, n_up=5, n_down=5, sparse=True)
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)
    code = train_main(
        [str(path), "--label-key", "label", "--target", "type-01", "--n-top-genes", "25",
         "--backed", "--epochs", "2", "--target-epochs", "2", "--out", str(tmp_path / "models"),
         "--threads", "1", "--seeds", "1", "-q"]
    )  # fmt: skip
    assert code == 0
    manifest = json.loads((tmp_path / "models" / "atlas-type-01" / "manifest.json").read_text())
    assert len(manifest["genes"]) == 25
    assert manifest["gene_set"]["name"] == "top 25 highly variable genes"
    assert manifest["gene_set"]["n_top_genes"] == 25
    assert len(manifest["training_mean"]) == 25
    assert "bundle" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_main(
            [
                str(path),
                "--label-key",
                "label",
                "--target",
                "type-01",
                "--n-top-genes",
                "5",
                "--genes",
                str(path),
            ]
        )
    assert "not two of them" in capsys.readouterr().err
