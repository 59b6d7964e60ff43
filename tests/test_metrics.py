"""Metrics and baselines against hand computations; evaluate() on the tiny bundle."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_adata
from scipy.spatial.distance import cdist

from tspg.baselines import (
    Baselines,
    class_perturbations,
    de_ranked,
    differential_expression,
    fit_baselines,
    gene_overlap,
    mean_shift_perturb,
    sample_shifts,
    selection_overlap,
    split_arrays,
    training_target_mean,
)
from tspg.bundle import Bundle, load_bundle
from tspg.datasets import load_bundle_dataset
from tspg.metrics import (
    energy_distance,
    evaluate,
    evaluation_table,
    fit_classifiers,
    mean_pairwise_distance,
    pairwise_distances,
    perturbation_accuracy,
    perturbation_accuracy_table,
    spread_ratio,
    target_share,
)
from tspg.perturbation import consensus_top, discriminate, perturb_scaled

# ----------------------------------------------------------------------------- accuracy


def test_perturbation_accuracy_by_hand():
    labels = ["a", "a", "b", "b", "b", "t"]
    pred = ["t", "a", "t", "t", "b", "t"]
    acc = perturbation_accuracy(pred, labels, "t")
    assert acc["overall"] == pytest.approx(4 / 6)
    assert acc["non_target"] == pytest.approx(3 / 5)
    assert (acc["n"], acc["n_non_target"]) == (6, 5)
    assert acc["by_source"] == {
        "a": {"n": 2, "accuracy": 0.5},
        "b": {"n": 3, "accuracy": pytest.approx(2 / 3)},
    }
    table = perturbation_accuracy_table(pred, labels, "t")
    assert table["source"].tolist() == ["a", "b", "all non-target"]
    assert table["n"].tolist() == [2, 3, 5]
    assert target_share(pred, "t") == pytest.approx(4 / 6)
    assert math.isnan(perturbation_accuracy([], [], "t")["overall"])


# ----------------------------------------------------------------------------- distances


def test_energy_distance_by_hand():
    A, B = np.array([[0.0], [1.0]]), np.array([[3.0]])
    # 2 * mean(3, 2) - (0 + 1 + 1 + 0) / 4 - 0 = 5 - 0.5
    assert energy_distance(A, B) == pytest.approx(4.5)
    A2, B2 = np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([[0.0, 0.0]])
    # d(A,B) = 0, 5; d(A,A) V-statistic = (0 + 5 + 5 + 0) / 4
    assert energy_distance(A2, B2) == pytest.approx(2 * 2.5 - 2.5)
    assert energy_distance(A2, A2) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(B2, A2) == pytest.approx(energy_distance(A2, B2))
    assert math.isnan(energy_distance(np.zeros((0, 2)), B2))


def test_energy_distance_row_blocks_match_scipy():
    rng = np.random.default_rng(0)
    A, B = rng.random((1300, 3)), rng.random((40, 3)) + 0.5  # 1300 rows: more than one row block
    expected = 2 * cdist(A, B).mean() - cdist(A, A).mean() - cdist(B, B).mean()
    assert energy_distance(A, B) == pytest.approx(expected, rel=1e-9)
    D = pairwise_distances(A[:5])
    assert np.all(np.diag(D) == 0)
    np.testing.assert_allclose(D, cdist(A[:5], A[:5]), atol=1e-12)


def test_spread_ratio_by_hand():
    A = np.array([[0.0], [2.0]])  # one pair: 2
    ref = np.array([[0.0], [1.0], [2.0]])  # pairs 1, 2, 1: mean 4/3
    assert mean_pairwise_distance(A) == pytest.approx(2.0)
    assert mean_pairwise_distance(ref) == pytest.approx(4 / 3)
    assert spread_ratio(A, ref) == pytest.approx(1.5)
    assert math.isnan(mean_pairwise_distance(np.zeros((1, 3))))
    assert math.isnan(spread_ratio(A, np.zeros((3, 1))))  # a reference without spread


# ----------------------------------------------------------------------------- baselines


def test_mean_shift_exactly():
    X = np.array([[0.2, 0.0], [0.4, 0.2], [0.9, 0.1], [0.7, 0.3]])
    labels = ["s", "s", "t", "t"]  # mu_s = (0.3, 0.1), mu_t = (0.8, 0.2)
    shifts = class_perturbations(X, labels, "t", genes=["g1", "g2"])
    assert shifts.index.tolist() == ["s", "t"] and shifts.columns.tolist() == ["g1", "g2"]
    np.testing.assert_allclose(shifts.loc["s"], [0.5, 0.1])
    np.testing.assert_allclose(shifts.loc["t"], [0.0, 0.0])
    moved = mean_shift_perturb(np.array([[0.1, 0.5], [0.6, 0.95]]), ["s", "s"], shifts)
    np.testing.assert_allclose(moved, [[0.6, 0.6], [1.0, 1.0]], atol=1e-7)  # clipped at 1
    assert moved.dtype == np.float32
    with pytest.raises(ValueError, match="'u'"):
        mean_shift_perturb(X[:1], ["u"], shifts)
    with pytest.raises(ValueError, match="target class"):
        class_perturbations(X, labels, "z")
    np.testing.assert_allclose(sample_shifts(["t", "s"], shifts), [[0.0, 0.0], [0.5, 0.1]])


def test_differential_expression_direction():
    rng = np.random.default_rng(0)
    X = rng.random((40, 4)) * 0.1
    labels = np.array(["t"] * 10 + ["r"] * 30)
    X[labels == "t", 1] += 0.8  # g1 up in the target
    X[labels == "r", 3] += 0.8  # g3 down in the target
    de = differential_expression(X, labels, ["g0", "g1", "g2", "g3"], "t")
    assert list(de.columns) == ["gene", "score", "logfoldchange", "pval_adj", "direction"]
    assert de["gene"].iloc[0] == "g1" and de["direction"].iloc[0] == "up"
    assert de["gene"].iloc[-1] == "g3" and de["direction"].iloc[-1] == "down"
    assert de["score"].is_monotonic_decreasing and de["pval_adj"].iloc[0] < 1e-3
    ranked = de_ranked(de)
    assert ranked["up"][0] == "g1" and ranked["down"][0] == "g3"
    with pytest.raises(ValueError, match="at least 2"):
        differential_expression(X[:11], labels[:11], ["g0", "g1", "g2", "g3"], "t")


def test_gene_overlap_counts_and_jaccard():
    ref = {"up": ["a", "b", "c", "d"], "down": ["w", "x"]}
    base = {"de": {"up": ["b", "x", "a", "y"], "down": ["x", "w"]}}
    df = gene_overlap(ref, base, ks=(2, 4))
    up2 = df[(df["direction"] == "up") & (df["k"] == 2)].iloc[0]
    assert (up2["overlap"], up2["jaccard"], up2["genes"]) == (
        1,
        pytest.approx(1 / 3),
        "b",
    )  # {a,b} vs {b,x}
    up4 = df[(df["direction"] == "up") & (df["k"] == 4)].iloc[0]
    assert (up4["overlap"], up4["jaccard"]) == (2, pytest.approx(2 / 6))
    down4 = df[(df["direction"] == "down") & (df["k"] == 4)].iloc[0]  # lists shorter than k
    assert (down4["n_reference"], down4["overlap"], down4["jaccard"]) == (2, 2, 1.0)
    assert len(df) == 4 and set(df["baseline"]) == {"de"}


def test_selection_overlap_by_hand():
    genes = ["A", "B", "C", "D", "E"]
    # TSPG: every sample ranks A, B up and E, D down
    P = np.array(
        [
            [0.5, 0.1, 0.0, -0.2, -0.6],
            [0.4, 0.3, 0.05, -0.1, -0.5],
            [0.6, 0.2, 0.0, -0.3, -0.4],
            [0.3, 0.2, 0.1, -0.2, -0.7],
        ]
    )
    shifts = pd.DataFrame(
        [[0.05, 0.3, 0.2, -0.3, -0.1], [0.4, 0.0, 0.1, -0.05, -0.2], [0.0] * 5],
        index=pd.Index(["s", "s2", "t"], name="source"),
        columns=genes,
    )
    de = pd.DataFrame(
        {"gene": ["B", "C", "A", "D", "E"], "score": [3.0, 2.0, 1.0, -1.0, -2.0]}
    )  # up B, C, A; down E, D, A
    base = Baselines(shifts, de)
    # class "u" has no mean shift: the mean-shift lists rank the mean change x_ms - x of
    # samples s, s2, s2, all at x = (0.95, 0.5, 0.5, 0.5, 0.5). Gene A is clipped at 1 (its
    # change is +0.05, not +0.05 or +0.4), so:
    #   s:  +0.05 +0.3 +0.2 -0.3 -0.1
    #   s2: +0.05  0   +0.1 -0.05 -0.2
    #   mean over s, s2, s2: A +0.05, B +0.1, C +0.133, D -0.133, E -0.167
    # up k=1: C, k=2: C, B; down k=1: E, k=2: E, D (TSPG, mean P: up A, B; down E, D)
    X = np.array([[0.95, 0.5, 0.5, 0.5, 0.5]] * 4)
    df = selection_overlap(P, X, ["s", "s2", "s2", "u"], genes, base, ks=(2, 1))
    assert list(df.columns) == [
        "baseline",
        "direction",
        "k",
        "n_reference",
        "n_baseline",
        "overlap",
        "jaccard",
        "genes",
    ]
    got = {(r.baseline, r.direction, r.k): (r.overlap, r.genes) for r in df.itertuples()}
    assert got == {
        ("differential_expression", "up", 1): (0, ""),  # {A} vs {B}
        ("differential_expression", "up", 2): (1, "B"),  # {A,B} vs {B,C}
        ("differential_expression", "down", 1): (1, "E"),  # {E} vs {E}
        ("differential_expression", "down", 2): (2, "E,D"),  # {E,D} vs {E,D}
        ("mean_shift", "up", 1): (0, ""),  # {A} vs {C}
        ("mean_shift", "up", 2): (1, "B"),  # {A,B} vs {C,B}
        ("mean_shift", "down", 1): (1, "E"),  # {E} vs {E}
        ("mean_shift", "down", 2): (2, "E,D"),  # {E,D} vs {E,D}
    }
    assert df.loc[
        (df.baseline == "mean_shift") & (df.direction == "up") & (df.k == 2), "jaccard"
    ].item() == pytest.approx(1 / 3)
    # sorted: baseline, then up before down, then k
    assert list(zip(df.baseline, df.direction, df.k, strict=True))[:4] == [
        ("differential_expression", "up", 1),
        ("differential_expression", "up", 2),
        ("differential_expression", "down", 1),
        ("differential_expression", "down", 2),
    ]
    # no labels: no mean shift to compare with
    assert set(selection_overlap(P, X, None, genes, base, ks=(2,))["baseline"]) == {
        "differential_expression"
    }
    with pytest.raises(ValueError, match="labels for 4 samples"):
        selection_overlap(P, X, ["s"], genes, base)
    with pytest.raises(ValueError, match="shape"):
        selection_overlap(P, X[:1], None, genes, base)


def test_training_target_mean(quick_bundle):
    adata = make_tiny_adata()
    stored = quick_bundle.target_mean
    assert stored is not None and stored.shape == (len(quick_bundle.genes),)
    np.testing.assert_array_equal(
        training_target_mean(None, quick_bundle), stored
    )  # the bundle's own value, no data needed
    older = Bundle(
        {k: v for k, v in quick_bundle.manifest.items() if k != "target_mean"},
        quick_bundle.generator,
        quick_bundle.discriminator,
        quick_bundle.target_model,
    )
    assert older.target_mean is None and training_target_mean(None, older) is None
    Xs, y, _ = split_arrays(adata, quick_bundle, part="train")
    np.testing.assert_allclose(
        training_target_mean(adata, older), Xs[y == "beta"].mean(0), atol=1e-6
    )
    np.testing.assert_allclose(training_target_mean(adata, older), stored, atol=1e-5)


# ----------------------------------------------------------------------------- evaluate


def test_classifiers_are_deterministic():
    adata = make_tiny_adata()
    X, y = adata.X / adata.X.max(), adata.obs["cell_type"].astype(str).to_numpy()
    a, b = fit_classifiers(X, y), fit_classifiers(X, y)
    assert set(a) == {"logistic_regression", "knn_15"}
    assert (a["logistic_regression"].predict(X) == b["logistic_regression"].predict(X)).all()
    assert (a["knn_15"].predict(X) == y).mean() > 0.9


def test_evaluate_tiny_bundle(quick_bundle):
    adata = make_tiny_adata()
    res = evaluate(adata, quick_bundle, k=5, ks=(5, 10))
    json.dumps(res, allow_nan=False)  # plain JSON
    again = evaluate(adata, quick_bundle, k=5, ks=(5, 10))
    res.pop("seconds"), again.pop("seconds")
    assert res == again  # deterministic
    n_test = len(quick_bundle.split["test"])
    assert res["samples"] == {
        "train": len(quick_bundle.split["train"]),
        "heldout": n_test,
        "heldout_target": 4,
        "heldout_source": n_test - 4,
        "train_total": len(quick_bundle.split["train"]),
        "heldout_total": n_test,
    }
    acc = res["perturbation_accuracy"]
    assert set(acc["by_source"]) == {"alpha", "gamma"}
    stored = quick_bundle.metrics
    assert acc["non_target"] == pytest.approx(stored["perturbation_accuracy_non_target"])
    assert res["target_model"]["heldout_accuracy"] == pytest.approx(stored["target_model_accuracy"])
    for section in ("energy_distance", "spread_ratio"):
        assert set(res[section]) == {"perturbed", "unperturbed", "mean_shift", "training_target"}
    assert res["energy_distance"]["unperturbed"] > res["energy_distance"]["mean_shift"] >= 0

    # the same numbers by hand, from the bundle's split
    Xtr, ytr, _ = split_arrays(adata, quick_bundle, part="train")
    Xte, yte, ids = split_arrays(adata, quick_bundle, part="test")
    is_t, non = yte == "beta", yte != "beta"
    pert = perturb_scaled(Xte, quick_bundle, samples=ids, labels=yte)
    shifts = class_perturbations(Xtr, ytr, "beta", genes=quick_bundle.genes)
    x_ms = mean_shift_perturb(Xte[non], yte[non], shifts)
    disc = res["discriminator"]
    assert set(disc) == {"real_target", "perturbed", "unperturbed", "mean_shift"}
    assert disc["real_target"] == pytest.approx(
        float(discriminate(Xte[is_t], quick_bundle).mean()), rel=1e-6
    )
    assert disc["perturbed"] == pytest.approx(
        float(discriminate(pert.x_adv[non], quick_bundle).mean()), rel=1e-6
    )
    assert disc["mean_shift"] == pytest.approx(
        float(discriminate(x_ms, quick_bundle).mean()), rel=1e-6
    )
    clf = res["independent_classifiers"]
    assert set(clf) == {"logistic_regression", "knn_15"}
    models = fit_classifiers(Xtr, ytr, seed=0)
    for name, data in (("logistic_regression", pert.x_adv[non]), ("knn_15", x_ms)):
        share = float((models[name].predict(data) == "beta").mean())
        key = (
            "target_share_perturbed" if name == "logistic_regression" else "target_share_mean_shift"
        )
        assert clf[name][key] == pytest.approx(share)
        assert clf[name]["heldout_accuracy"] == pytest.approx(
            float((models[name].predict(Xte) == yte).mean())
        )
        assert clf[name]["target_share_real_target"] == pytest.approx(
            float((models[name].predict(Xte[is_t]) == "beta").mean())
        )
    # the reference of a perfect copy: the real training target samples against the held-out ones
    T = Xtr[ytr == "beta"]
    assert res["energy_distance"]["training_target"] == pytest.approx(
        energy_distance(T, Xte[is_t]), rel=1e-9
    )
    assert res["spread_ratio"]["training_target"] == pytest.approx(
        spread_ratio(T, Xte[is_t]), rel=1e-9
    )
    size = res["perturbation_size"]  # both the change made
    np.testing.assert_allclose(pert.x[non] + pert.P[non], pert.x_adv[non], atol=1e-6)
    assert size["tspg_mean_l2"] == pytest.approx(
        float(np.linalg.norm(pert.P[non], axis=1).mean()), rel=1e-6
    )
    assert size["mean_shift_mean_l2"] == pytest.approx(
        float(np.linalg.norm(x_ms - Xte[non], axis=1).mean()), rel=1e-6
    )

    tg = res["top_genes"]
    assert tg["consensus_up"] == consensus_top(pert.P[non], quick_bundle.genes, k=5)["up"]
    assert len(tg["consensus_up"]) == 5 and len(tg["consensus_down"]) == 5
    assert tg["unique_n_classes"] == 2 and 5 <= tg["unique_up"] <= 10
    assert {(r["baseline"], r["direction"], r["k"]) for r in tg["overlap"]} == {
        (b, d, k)
        for b in ("differential_expression", "mean_shift")
        for d in ("up", "down")
        for k in (5, 10)
    }
    ms_up5 = next(
        r
        for r in tg["overlap"]
        if (r["baseline"], r["direction"], r["k"]) == ("mean_shift", "up", 5)
    )
    expected = [
        g
        for g in tg["consensus_up"]
        if g in set(consensus_top(x_ms - Xte[non], quick_bundle.genes, k=5)["up"])
    ]
    assert ms_up5["genes"] == ",".join(expected) and ms_up5["overlap"] == len(expected)
    # beta raises genes G05..G09: TSPG finds them (30 genes: the DE top 50 is every gene here;
    # test_evaluate_demo_overlap_with_de checks the count where it is a real selection)
    assert (
        tg["de_top50_up"]
        == de_ranked(differential_expression(Xtr, ytr, quick_bundle.genes, "beta"))["up"][:50]
    )
    assert tg["overlap_up_de_top50"] == len(set(tg["consensus_up"]) & set(tg["de_top50_up"]))
    assert len(set(tg["consensus_up"]) & {f"G{j:02d}" for j in range(5, 10)}) >= 3
    table = evaluation_table(res)
    assert list(table.columns) == ["section", "metric", "value"]
    assert "perturbation accuracy by source" in set(table["section"])


def test_evaluate_demo_overlap_with_de(demo_models_dir):
    """On the demo (765 genes) the DE top 50 is a real selection: count the overlap by hand."""
    bundle = load_bundle(
        next(p for p in demo_models_dir.iterdir() if (p / "manifest.json").exists())
    )
    adata = load_bundle_dataset(bundle)
    res = evaluate(adata, bundle, k=20, ks=(20,))
    tg = res["top_genes"]
    Xtr, ytr, _ = split_arrays(adata, bundle, part="train")
    Xte, yte, ids = split_arrays(adata, bundle, part="test")
    non = yte != bundle.target
    up = consensus_top(perturb_scaled(Xte[non], bundle, predict=False).P, bundle.genes, k=20)["up"]
    de50 = de_ranked(differential_expression(Xtr, ytr, bundle.genes, bundle.target))["up"][:50]
    assert tg["consensus_up"] == up and tg["de_top50_up"] == de50
    assert tg["overlap_up_de_top50"] == len(set(up) & set(de50))
    assert (
        tg["overlap_up_de_top50"] >= 10
    )  # most of the generator's up genes are DE genes of the target


def test_evaluate_needs_the_split_and_labels(quick_bundle):
    adata = make_tiny_adata()
    with pytest.raises(ValueError, match="split are missing"):
        evaluate(adata[5:].copy(), quick_bundle)
    with pytest.raises(ValueError, match="no label column 'tissue'"):
        evaluate(adata, quick_bundle, label_key="tissue")
    base = fit_baselines(adata, quick_bundle)
    assert base.shifts.index.tolist() == ["alpha", "beta", "gamma"]
    assert base.de["gene"].iloc[0] in {f"G{j:02d}" for j in range(5, 10)}


def test_load_bundle_dataset(quick_bundle, caplog):
    with pytest.raises(ValueError, match="give that data file"):
        load_bundle_dataset(quick_bundle)
    adata = make_tiny_adata()
    with caplog.at_level(logging.WARNING):
        assert load_bundle_dataset(quick_bundle, adata) is adata
    assert "differs" not in caplog.text
    other = make_tiny_adata(seed=1)
    with caplog.at_level(logging.WARNING):
        load_bundle_dataset(quick_bundle, other)
    assert "differs from the data" in caplog.text
    demo_like = Bundle(
        {**quick_bundle.manifest, "dataset": {"name": "pbmc68k_reduced"}},
        quick_bundle.generator,
        quick_bundle.discriminator,
        quick_bundle.target_model,
    )
    demo = load_bundle_dataset(demo_like)
    assert demo.shape == (700, 765) and "bulk_labels" in demo.obs
