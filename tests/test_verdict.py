"""The verdict (tspg/verdict.py) on cases whose truth is known, and where it shows.

Known bad: a target model trained on shuffled labels, a generator whose last layer is
zeroed, z-scored data given for perturbation. Known good: a bundle on well separated
classes with enough held-out samples. Everywhere it shows: the manifest, ``tspg-train``,
``tspg evaluate --json`` and ``uns`` of ``tspg perturb``.
"""

from __future__ import annotations

import copy
import json
import math

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import QUICK_CONFIG, make_tiny_adata

from tspg.baselines import split_arrays
from tspg.bundle import Bundle, load_bundle, save_bundle
from tspg.cli import main, train_main
from tspg.config import TrainConfig
from tspg.metrics import evaluate, heldout_figures
from tspg.perturbation import perturb, perturb_adata
from tspg.pipeline import train
from tspg.verdict import (
    LEVELS,
    data_fit_figures,
    grade,
    heldout_verdict,
    jaccard,
    outside_range,
    selection_verdict,
    verdict_lines,
    verdict_markdown,
    verdict_table,
)

HELDOUT_CHECKS = {"target_model", "moved", "agreement", "realism", "sample_size", "stability"}


def _levels(verdict: dict) -> dict[str, str]:
    return {name: c["level"] for name, c in verdict["checks"].items()}


def _zeroed(bundle: Bundle) -> Bundle:
    """A copy of ``bundle`` whose generator's last linear layer is all zeros: G(x) = 0."""
    G = copy.deepcopy(bundle.generator)
    last = [m for m in G.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    manifest = copy.deepcopy(bundle.manifest)
    manifest["name"] = bundle.name + "-zeroed"
    manifest.pop("verdict", None)
    return Bundle(manifest, G, bundle.discriminator, bundle.target_model)


def _regrade(bundle: Bundle, adata: ad.AnnData) -> dict:
    Xtr, ytr, _ = split_arrays(adata, bundle, part="train")
    Xte, yte, ids = split_arrays(adata, bundle, part="test")
    return heldout_verdict(bundle, Xtr, ytr, Xte, yte, ids)


@pytest.fixture(scope="module")
def roomy_bundle():
    """Well separated classes with 12 held-out samples each (>= 10: the sample size is ok)."""
    adata = make_tiny_adata(n_per_class=60)
    b = train(
        adata,
        label_key="cell_type",
        target="beta",
        config=TrainConfig.for_recipe("tspg+", **QUICK_CONFIG),
        device="cpu",
        dataset="roomy",
    )
    return b, adata


# ----------------------------------------------------------------------------- known truth


def test_good_bundle_with_enough_samples_is_ok(roomy_bundle):
    bundle, _ = roomy_bundle
    v = bundle.manifest["verdict"]
    assert set(v["checks"]) == HELDOUT_CHECKS
    assert v["level"] == "ok", verdict_lines(v)
    assert v["checks"]["sample_size"]["figures"]["heldout_target"]["value"] == 12


def test_tiny_bundle_says_its_verdict_rests_on_few_samples(quick_bundle):
    """4 held-out target samples: everything else passes, the sample size cautions."""
    v = quick_bundle.manifest["verdict"]
    levels = _levels(v)
    assert levels.pop("sample_size") == "caution"
    assert set(levels.values()) == {"ok"}, verdict_lines(v)
    assert v["level"] == "caution"
    assert "only 4 held-out 'beta' samples" in v["checks"]["sample_size"]["reason"]
    # every figure says how many samples it rests on (or is a constant, chance)
    for c in v["checks"].values():
        for key, f in c["figures"].items():
            assert f["n"] is not None or key == "chance", (c["title"], key)


def test_shuffled_labels_fail_the_target_model_check(shuffled_bundle):
    b, _ = shuffled_bundle
    v = b.manifest["verdict"]
    check = v["checks"]["target_model"]
    assert check["level"] == "fail" and v["level"] == "fail"
    assert "cannot tell 'beta' apart" in check["reason"] and "means little" in check["reason"]
    recall = check["figures"]["target_recall"]["value"]
    chance = check["figures"]["chance"]["value"]
    assert recall < 0.75 and chance == pytest.approx(1 / 3)


def test_zeroed_generator_fails_the_moved_check(quick_bundle):
    adata = make_tiny_adata()
    v = _regrade(_zeroed(quick_bundle), adata)
    moved = v["checks"]["moved"]
    assert moved["level"] == "fail" and v["level"] == "fail"
    assert "collapsed" in moved["reason"]
    assert moved["figures"]["mean_abs_P"]["value"] == 0.0
    assert moved["figures"]["changed_share"]["value"] == 0.0
    # the real target model and data still pass
    assert v["checks"]["target_model"]["level"] == "ok"
    # x_adv = x: no nearer the target than the unperturbed sources
    assert v["checks"]["realism"]["level"] == "fail"


def test_zscored_data_fail_the_data_fit_check(quick_bundle):
    adata = make_tiny_adata()
    X = adata.X
    z = adata.copy()
    z.X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    v = selection_verdict(quick_bundle, perturb_adata(z, quick_bundle))
    fit = v["checks"]["data_fit"]
    assert fit["level"] == "fail" and v["level"] == "fail"
    assert fit["figures"]["outside_share"]["value"] > 0.5
    assert "outside the training range" in fit["reason"]
    # the bundle's own data fit (held-out values may leave the range a little)
    own = selection_verdict(quick_bundle, perturb_adata(adata, quick_bundle))
    assert own["checks"]["data_fit"]["level"] == "ok"
    assert own["checks"]["data_fit"]["figures"]["outside_share"]["value"] < 0.05
    # the stored held-out checks are kept beside the selection's
    assert HELDOUT_CHECKS | {"moved_selection", "data_fit"} == set(own["checks"])


def test_pbmc68k_reduced_zscored_X_fails_data_fit_on_the_demo_bundle(demo_models_dir):
    """The case of the issue: scanpy's pbmc68k_reduced .X is z-scored; the demo was trained
    on its log-normalised .raw."""
    import scanpy as sc

    from tspg.bundle import list_bundles

    bundle = load_bundle(list_bundles(demo_models_dir)[0].path)
    z = sc.datasets.pbmc68k_reduced()
    out = perturb(z, bundle, copy=True)
    v = out.uns["tspg"]["verdict"]
    fit = v["checks"]["data_fit"]
    assert v["level"] == "fail" and fit["level"] == "fail"
    assert fit["figures"]["outside_share"]["value"] > 0.5


# ----------------------------------------------------------------------------- one source of figures


def test_stored_verdict_figures_equal_evaluate(quick_bundle):
    """The verdict at training time and tspg evaluate compute each figure the same way."""
    adata = make_tiny_adata()
    res = evaluate(adata, quick_bundle)
    stored = quick_bundle.manifest["verdict"]
    assert res["verdict"] == stored
    checks = stored["checks"]
    clf = res["independent_classifiers"]
    for name in ("logistic_regression", "knn_15"):
        f = checks["agreement"]["figures"]
        assert f[f"{name}_perturbed"]["value"] == clf[name]["target_share_perturbed"]
        assert f[f"{name}_real_target"]["value"] == clf[name]["target_share_real_target"]
    for s in ("perturbed", "unperturbed", "mean_shift"):
        assert checks["realism"]["figures"][s]["value"] == res["energy_distance"][s]
    tm = checks["target_model"]["figures"]
    assert tm["heldout_accuracy"]["value"] == res["target_model"]["heldout_accuracy"]
    assert tm["heldout_accuracy"]["value"] == pytest.approx(
        quick_bundle.metrics["target_model_accuracy"]
    )
    moved = checks["moved"]["figures"]
    assert moved["mean_abs_P"]["value"] == res["movement"]["mean_abs_P"]
    assert moved["non_target_accuracy"]["value"] == pytest.approx(
        quick_bundle.metrics["perturbation_accuracy_non_target"]
    )
    assert (
        res["samples"]["heldout_target"]
        == checks["sample_size"]["figures"]["heldout_target"]["value"]
    )


def test_heldout_figures_by_hand(quick_bundle):
    adata = make_tiny_adata()
    Xtr, ytr, _ = split_arrays(adata, quick_bundle, part="train")
    Xte, yte, ids = split_arrays(adata, quick_bundle, part="test")
    fig = heldout_figures(quick_bundle, Xtr, ytr, Xte, yte, ids)
    res = perturb_adata(adata[ids], quick_bundle)
    non = yte != "beta"
    tm = fig["target_model"]
    pred = res.pred_before
    assert tm["target_recall"] == pytest.approx(np.mean(pred[yte == "beta"] == "beta"))
    assert tm["target_precision"] == pytest.approx(np.mean(yte[pred == "beta"] == "beta"))
    assert tm["majority_rate"] == pytest.approx(4 / 12) and tm["chance"] == pytest.approx(1 / 3)
    mv = fig["movement"]
    assert mv["mean_abs_P"] == pytest.approx(np.abs(res.P[non]).mean(), rel=1e-6)
    gap = np.abs(quick_bundle.target_mean - res.x[non]).mean()
    assert mv["reach"] == pytest.approx(mv["mean_abs_P"] / gap, rel=1e-6)
    # capped: stratified subsamples for the classifiers and the energy distances, and the
    # counts say so; the target model's figures still rest on every held-out sample
    small = heldout_figures(quick_bundle, Xtr, ytr, Xte, yte, ids, max_train=24, max_heldout=6)
    assert small["samples"]["classifier_train"] == 24
    assert (small["samples"]["graded_source"], small["samples"]["graded_target"]) == (6, 4)
    assert small["target_model"] == fig["target_model"] and small["movement"] == fig["movement"]
    v = grade(heldout=small, target="beta")
    assert "subsample of 10 of 12 held-out samples" in v["checks"]["sample_size"]["reason"]
    assert v["checks"]["realism"]["figures"]["perturbed"]["n"] == 6


# ----------------------------------------------------------------------------- grading rules


def _heldout(**over) -> dict:
    """Figures of a healthy bundle, with some sections replaced."""
    h = {
        "samples": {"train": 400, "heldout": 100, "heldout_target": 20, "heldout_source": 80},
        "target_model": {
            "heldout_accuracy": 0.95,
            "n": 100,
            "majority_rate": 0.3,
            "chance": 0.2,
            "target_recall": 0.95,
            "n_target": 20,
            "target_precision": 0.9,
            "n_called_target": 21,
            "target_prevalence": 0.2,
            "margin_source_median": 6.0,
        },
        "perturbation_accuracy": {"non_target": 1.0, "n_non_target": 80},
        "movement": {
            "mean_abs_P": 0.1,
            "mean_abs_gap": 0.15,
            "reach": 0.67,
            "changed_share": 1.0,
            "n": 80,
            "n_not_target_before": 79,
        },
        "independent_classifiers": {
            "logistic_regression": {
                "target_share_perturbed": 1.0,
                "target_share_real_target": 0.95,
            },
            "knn_15": {"target_share_perturbed": 0.9, "target_share_real_target": 0.9},
        },
        "energy_distance": {"perturbed": 0.5, "unperturbed": 1.5, "mean_shift": 0.6},
    }
    for k, v in over.items():
        h[k] = {**h[k], **v}
    return h


def test_grade_healthy_figures_ok_and_each_rule_trips():
    assert grade(heldout=_heldout())["level"] == "ok"
    near_chance = grade(
        heldout=_heldout(
            target_model={
                "target_recall": 0.6,
                "target_precision": 0.6,
                "chance": 0.5,
                "target_prevalence": 0.5,
            }
        )
    )
    assert _levels(near_chance)["target_model"] == "fail"  # the 0.60 on two classes
    collapsed = grade(
        heldout=_heldout(movement={"mean_abs_P": 0.0, "reach": 0.0, "changed_share": 0.0})
    )
    assert _levels(collapsed)["moved"] == "fail"
    unmoved = grade(heldout=_heldout(movement={"changed_share": 0.3}))
    assert (
        _levels(unmoved)["moved"] == "fail"
        and "does not reach" in unmoved["checks"]["moved"]["reason"]
    )
    farther = grade(heldout=_heldout(energy_distance={"perturbed": 1.6}))
    assert (
        _levels(farther)["realism"] == "fail"
        and "no nearer" in farther["checks"]["realism"]["reason"]
    )
    halfway = grade(heldout=_heldout(energy_distance={"perturbed": 1.2}))
    assert _levels(halfway)["realism"] == "caution"
    # when even the mean shift gets no nearer, the reference cannot judge (too few / no target)
    blind = grade(heldout=_heldout(energy_distance={"perturbed": 1.6, "mean_shift": 1.55}))
    assert _levels(blind)["realism"] == "caution"
    assert "cannot judge" in blind["checks"]["realism"]["reason"]
    unrecognised = grade(
        heldout=_heldout(
            independent_classifiers={
                "logistic_regression": {
                    "target_share_perturbed": 1.0,
                    "target_share_real_target": 0.0,
                },
                "knn_15": {"target_share_perturbed": 0.9, "target_share_real_target": 0.25},
            }
        )
    )
    assert _levels(unrecognised)["agreement"] == "caution"
    assert "do not recognise the real" in unrecognised["checks"]["agreement"]["reason"]
    disagree = grade(
        heldout=_heldout(
            independent_classifiers={
                "logistic_regression": {
                    "target_share_perturbed": 0.2,
                    "target_share_real_target": 1.0,
                },
                "knn_15": {"target_share_perturbed": 0.1, "target_share_real_target": 1.0},
            }
        )
    )
    assert _levels(disagree)["agreement"] == "fail"
    few = grade(heldout=_heldout(samples={"heldout_target": 6}))
    assert _levels(few)["sample_size"] == "caution" and few["level"] == "caution"
    # the overall level is the worst check, and the summary names the failing ones
    assert collapsed["level"] == "fail" and "generator moved the samples" in collapsed["summary"]


def test_paper_collapse_on_a_saturated_softmax_says_why():
    figures = _heldout(
        movement={"mean_abs_P": 0.017, "mean_abs_gap": 0.2, "reach": 0.085, "changed_share": 0.0},
        target_model={"margin_source_median": 16.0},
    )
    paper = TrainConfig.for_recipe("paper").to_dict()
    reason = grade(heldout=figures, config=paper)["checks"]["moved"]["reason"]
    assert "collapsed" in reason and "saturated" in reason and "tspg+" in reason
    # the default recipe takes the margin on logits: no such explanation
    plus = TrainConfig.for_recipe("tspg+").to_dict()
    assert "saturated" not in grade(heldout=figures, config=plus)["checks"]["moved"]["reason"]


def test_data_fit_levels_from_plain_numbers():
    def level(**kw):
        d = data_fit_figures(n_genes=100, n_samples=50, **{"outside_share": 0.0, **kw})
        return grade(data_fit=d)["checks"]["data_fit"]["level"]

    assert level() == "ok"
    assert level(outside_share=0.06) == "caution"
    assert level(outside_share=0.77) == "fail"
    assert level(n_missing=3, n_case_matched=3) == "caution"
    assert level(n_missing=40, n_case_matched=20) == "fail"


def test_outside_range_by_hand():
    from tspg.data import Scaler

    scaler = Scaler(np.zeros(2, np.float32), np.ones(2, np.float32))
    X = np.array([[0.5, 2.0], [-1.0, 1.0], [0.0, 0.2]], np.float32)
    fit = outside_range(X, scaler)
    assert fit["outside_share"] == pytest.approx(2 / 6)
    assert fit["below_share"] == pytest.approx(1 / 6) and fit["above_share"] == pytest.approx(1 / 6)
    assert fit["worst_gene_share"] == pytest.approx(1 / 3)


def _members(n_genes: int, tops: list[list[int]], k: int = 20) -> np.ndarray:
    """Members' mean P per gene (N x genes): member i's up-k are ``tops[i]`` (descending),
    its down-k the same genes shifted by n_genes // 2 (so both directions agree alike)."""
    out = np.zeros((len(tops), n_genes))
    for i, top in enumerate(tops):
        assert len(top) == k
        for r, g in enumerate(top):
            out[i, g] = 1.0 - 0.01 * r
            out[i, g + n_genes // 2] = -(1.0 - 0.01 * r)
    return out


def test_stability_levels_on_constructed_members():
    from tspg.ranking import member_agreement

    a = list(range(20))
    assert jaccard(a, a[:10]) == pytest.approx(0.5)
    one = grade(stability={"n_members": 1, "k": 20})["checks"]["stability"]
    assert one["level"] == "ok" and one["reason"].startswith("not graded")
    assert "--seeds 3" in one["reason"]
    same = member_agreement(_members(100, [a, a, a]))
    assert (same["shared_up"], same["full_support_up"]) == (20.0, 20)
    assert grade(stability=same)["checks"]["stability"]["level"] == "ok"
    # 16 of 20 shared by every pair: below 16.5 -> caution, naming the direction and figures
    b, c = a[:16] + [20, 21, 22, 23], a[:16] + [24, 25, 26, 27]
    fig = member_agreement(_members(100, [a, b, c]))
    assert fig["shared_up"] == 16.0 and fig["full_support_up"] == 16
    check = grade(stability=fig)["checks"]["stability"]
    assert check["level"] == "caution"
    assert "share 16.0 of their top-20 up genes (16 with full support)" in check["reason"]
    assert "a rerun would keep about 18" in check["reason"]  # 7.04 + 0.66 x 16
    assert check["figures"]["shared_up"]["value"] == 16.0
    # 17 of 20: ok
    b, c = a[:17] + [20, 21, 22], a[:17] + [23, 24, 25]
    assert (
        grade(stability=member_agreement(_members(100, [a, b, c])))["checks"]["stability"]["level"]
        == "ok"
    )
    # disjoint members: they learned different things
    far = member_agreement(_members(100, [a, list(range(20, 40))]))
    assert grade(stability=far)["checks"]["stability"]["level"] == "fail"
    # a broken member: fail whatever the agreement
    broken = dict(same, member_accuracy=[1.0, 0.2, 1.0], ensemble_accuracy=0.95)
    check = grade(stability=broken)["checks"]["stability"]
    assert check["level"] == "fail" and "generator 1 is broken" in check["reason"]
    # the same member accuracies with an ensemble that does not move: not a broken member
    assert (
        grade(stability=dict(broken, ensemble_accuracy=0.6))["checks"]["stability"]["level"] == "ok"
    )


def test_renderers(quick_bundle):
    v = quick_bundle.manifest["verdict"]
    lines = verdict_lines(v)
    assert lines[0] == f"verdict: {v['level'].upper()} (the worst of 6 checks)"
    assert len(lines) == 7 and all(c["title"] in "\n".join(lines) for c in v["checks"].values())
    assert len(verdict_lines(v, only=("fail",))) == 1
    md = verdict_markdown(v)
    assert md.startswith(f"**Verdict: {v['level']}**") and md.count("\n| ") == 7
    table = verdict_table(v)
    assert set(table["check"]) == HELDOUT_CHECKS and set(table["level"]) <= set(LEVELS)


# ----------------------------------------------------------------------------- where it shows


def test_verdict_round_trips_through_save_and_load(quick_bundle, tmp_path):
    path = save_bundle(copy.copy(quick_bundle), tmp_path)
    loaded = load_bundle(path)
    assert loaded.manifest["verdict"] == quick_bundle.manifest["verdict"]
    json.dumps(loaded.manifest["verdict"], allow_nan=False)  # strict JSON: no NaN anywhere


def test_tspg_train_prints_the_verdict_block(tmp_path, capsys):
    data = tmp_path / "tiny.h5ad"
    make_tiny_adata().write_h5ad(data)
    argv = [str(data), "--label-key", "cell_type", "--target", "beta", "--out", str(tmp_path)]
    assert train_main([*argv, "--epochs", "3", "--target-epochs", "3", "--seeds", "1", "-q"]) == 0
    text = capsys.readouterr().out
    assert "  verdict: " in text
    for title in ("target model", "generator moved the samples", "independent classifiers agree"):
        assert title in text
    manifest = json.loads((tmp_path / "tiny-beta" / "manifest.json").read_text())
    assert f"verdict: {manifest['verdict']['level'].upper()}" in text


def test_zeroed_generator_fails_in_tspg_evaluate_json(quick_bundle, tmp_path, capsys):
    data = tmp_path / "tiny.h5ad"
    make_tiny_adata().write_h5ad(data)
    path = save_bundle(_zeroed(quick_bundle), tmp_path / "models")
    js = tmp_path / "metrics.json"
    assert main(["evaluate", str(path), str(data), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "verdict: FAIL" in text and "[fail]    generator moved the samples" in text
    res = json.loads(js.read_text())
    assert res["verdict"]["level"] == "fail"
    assert res["verdict"]["checks"]["moved"]["level"] == "fail"
    assert res["verdict"]["checks"]["moved"]["figures"]["mean_abs_P"]["value"] == 0.0


def test_tspg_perturb_writes_the_verdict_to_uns_and_prints_failures(quick_bundle, tmp_path, capsys):
    adata = make_tiny_adata()
    good, bad = tmp_path / "good.h5ad", tmp_path / "z.h5ad"
    adata.write_h5ad(good)
    z = adata.copy()
    z.X = ((adata.X - adata.X.mean(0)) / adata.X.std(0)).astype(np.float32)
    z.write_h5ad(bad)
    out = tmp_path / "out.h5ad"
    assert main(["perturb", str(quick_bundle.path), str(good), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    v = ad.read_h5ad(out).uns["tspg"]["verdict"]
    assert v["level"] == "caution" and f"verdict: {v['level'].upper()}" in text
    assert {"moved_selection", "data_fit"} <= set(v["checks"]) and HELDOUT_CHECKS <= set(
        v["checks"]
    )
    assert "[caution] sample size" in text and "[ok]" not in text  # only what is not ok
    assert main(["perturb", str(quick_bundle.path), str(bad), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    v = ad.read_h5ad(out).uns["tspg"]["verdict"]
    assert v["level"] == "fail" and v["checks"]["data_fit"]["level"] == "fail"
    assert "verdict: FAIL" in text and "[fail]    data fit the model" in text
    # the CSV folder holds it as verdict.json
    folder = tmp_path / "csv"
    assert main(["perturb", str(quick_bundle.path), str(bad), "--csv", "-o", str(folder)]) == 0
    assert (
        json.loads((folder / "verdict.json").read_text())["checks"]["data_fit"]["level"] == "fail"
    )


def test_bundle_without_a_stored_verdict_grades_the_selection_only(quick_bundle):
    old = copy.deepcopy(quick_bundle.manifest)
    old.pop("verdict")
    b = Bundle(old, quick_bundle.generator, quick_bundle.discriminator, quick_bundle.target_model)
    v = selection_verdict(b, perturb_adata(make_tiny_adata(), b))
    assert set(v["checks"]) == {"moved_selection", "data_fit"} and v["level"] == "ok"
    assert not math.isnan(v["checks"]["moved_selection"]["figures"]["reach"]["value"])


def test_target_margin_is_the_logit_gap():
    from tspg.metrics import target_margin

    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0], [40.0, 0.0, 0.0]])
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(target_margin(proba, 0), [0.0, 3.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(target_margin(proba, 2), [3.0, 2.0, 40.0], atol=1e-6)
    # a probability that underflowed to 0 caps the margin instead of giving infinity
    assert math.isfinite(target_margin(np.array([[1.0, 0.0]], np.float32), 1)[0])
