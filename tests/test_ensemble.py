"""Seed ensembles: N generators against one target model, stored in one bundle, read as
their mean P with each gene's support (real training, files and AnnData; small networks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_NETS, make_tiny_adata
from safetensors.torch import load_file, save_file

from tspg.bundle import check_weights, list_bundles, load_bundle, save_bundle
from tspg.cli import train_main
from tspg.config import TrainConfig
from tspg.nets import GeneratorEnsemble
from tspg.perturbation import (
    consensus,
    generate_perturbed,
    perturb,
    perturb_adata,
    perturb_scaled,
    top_genes,
)
from tspg.pipeline import train
from tspg.ranking import member_agreement, member_support, rank_genes

NETS = {k: v for k, v in SMALL_NETS.items() if k != "seeds"}
CONFIG = dict(epochs=3, target_epochs=5, batch_size=16, **NETS)
# the same networks as command-line options
SMALL_ARGS = ["--epochs", "3", "--target-epochs", "5", "--batch-size", "16"]
SMALL_ARGS += ["--gen-encoder", "32,16", "--gen-residual", "1", "--gen-decoder", "32"]
SMALL_ARGS += ["--disc-hidden", "32,16", "--target-hidden", "32,16", "--threads", "1", "-q"]


def _train(seeds: int, seed: int = 0):
    return train(
        make_tiny_adata(),
        label_key="cell_type",
        target="beta",
        config=TrainConfig(seeds=seeds, seed=seed, **CONFIG),
        device="cpu",
        dataset="tiny",
    )


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory) -> Path:
    """A 3-generator bundle trained by ``tspg-train --seeds 3``, saved in a models folder."""
    folder = tmp_path_factory.mktemp("ens")
    data = folder / "tiny.h5ad"
    make_tiny_adata().write_h5ad(data)
    argv = [str(data), "--label-key", "cell_type", "--target", "beta", "--seeds", "3"]
    assert train_main([*argv, *SMALL_ARGS, "--out", str(folder / "models")]) == 0
    return folder / "models" / "tiny-beta"


@pytest.fixture
def ensemble_copy(ensemble_dir, tmp_path) -> Path:
    dst = tmp_path / "models" / ensemble_dir.name
    shutil.copytree(ensemble_dir, dst)
    return dst


def _one_line_error(func, *args) -> str:
    with pytest.raises(ValueError) as err:
        func(*args)
    assert "\n" not in str(err.value), err.value
    return str(err.value)


# ----------------------------------------------------------------------------- config


def test_seeds_defaults_and_member_seeds():
    assert TrainConfig().seeds == 3 and TrainConfig.for_recipe("paper").seeds == 1
    older = {k: v for k, v in TrainConfig().to_dict().items() if k != "seeds"}
    assert TrainConfig.from_dict(older).seeds == 1  # bundles before ensembles: one generator
    seeds = TrainConfig(seed=0, seeds=3).member_seeds()
    assert seeds[0] == 0 and len(set(seeds)) == 3
    assert TrainConfig(seed=0, seeds=5).member_seeds()[:3] == seeds  # a prefix: more members
    # another --seed shares no member (seed + i would share two of three)
    assert not set(TrainConfig(seed=1, seeds=3).member_seeds()) & set(seeds)
    for bad in (0, 65):
        with pytest.raises(ValueError, match="seeds"):
            TrainConfig(seeds=bad)


# ----------------------------------------------------------------------------- training


def test_ensemble_trains_deterministically_and_member_0_is_the_one_generator():
    a, b = _train(2), _train(2)
    for ga, gb in zip(a.members, b.members, strict=True):
        assert _same(_state(ga), _state(gb))
    assert not _same(_state(a.members[0]), _state(a.members[1]))
    one = _train(1)
    assert _same(_state(one.generator), _state(a.members[0]))  # --seeds 1 = today's bundle
    assert _same(_state(one.target_model), _state(a.target_model))  # one shared target model
    assert a.member_seeds == TrainConfig(seeds=2).member_seeds()
    members = a.metrics["members"]["perturbation_accuracy_non_target"]
    assert members["min"] <= members["median"] <= members["max"]
    assert len(a.manifest["generators"]) == 2 and a.manifest["format_version"] == 2


def test_progress_names_each_member():
    stages = []
    train(
        make_tiny_adata(n_per_class=10),
        label_key="cell_type",
        target="beta",
        config=TrainConfig(seeds=2, epochs=1, target_epochs=1, batch_size=16, **NETS),
        device="cpu",
        progress=lambda stage, *_: stages.append(stage),
    )
    assert list(dict.fromkeys(stages)) == [
        "target model",
        "generator beta (1/2)",
        "generator beta (2/2)",
    ]


# ----------------------------------------------------------------------------- bundle format


def test_one_generator_bundle_keeps_the_old_layout(tmp_path):
    path = save_bundle(_train(1), tmp_path)
    names = {p.name for p in path.iterdir()}
    assert names == {
        "manifest.json",
        "generator.safetensors",
        "discriminator.safetensors",
        "target_model.safetensors",
    }
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and "generators" not in manifest
    b = load_bundle(path)
    assert b.n_generators == 1 and b.member_seeds == [0]
    assert not isinstance(b.generator, GeneratorEnsemble)


def test_format_2_round_trip(ensemble_dir):
    manifest = json.loads((ensemble_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["config"]["seeds"] == 3
    files = [(m["file"], m["discriminator"]) for m in manifest["generators"]]
    assert files[0] == ("generator.safetensors", "discriminator.safetensors")
    assert {p.name for p in ensemble_dir.iterdir()} == {
        "manifest.json",
        "target_model.safetensors",
        *(f for pair in files for f in pair),
    }
    b = load_bundle(ensemble_dir)
    assert isinstance(b.generator, GeneratorEnsemble) and b.n_generators == 3
    assert b.member_seeds == TrainConfig(seeds=3).member_seeds()
    assert len(b.member_discriminators) == 3
    for G, (gfile, _) in zip(b.members, files, strict=True):
        assert _same(_state(G), load_file(str(ensemble_dir / gfile)))
    # saved again: the same files, the same weights
    again = save_bundle(b, ensemble_dir.parent.parent / "again")
    for G, (gfile, _) in zip(b.members, files, strict=True):
        assert _same(_state(G), load_file(str(again / gfile)))
    assert list_bundles(ensemble_dir.parent)[0].error is None
    assert list_bundles(ensemble_dir.parent)[0].summary()["generators"] == 3


@pytest.mark.parametrize(
    "name, message",
    [
        ("../generator-1.safetensors", "is not a plain file name ending in .safetensors"),
        ("generator-1.pt", "is not a plain file name ending in .safetensors"),
        ("target_model.safetensors", "'target_model.safetensors' is used twice"),
    ],
)
def test_bad_member_file_name_refused(ensemble_copy, name, message):
    path = ensemble_copy / "manifest.json"
    m = json.loads(path.read_text())
    m["generators"][1]["file"] = name
    path.write_text(json.dumps(m))
    msg = _one_line_error(load_bundle, ensemble_copy)
    assert "generators" in msg and message in msg


def test_member_count_must_match_the_config(ensemble_copy):
    path = ensemble_copy / "manifest.json"
    m = json.loads(path.read_text())
    m["generators"] = m["generators"][:2]
    path.write_text(json.dumps(m))
    msg = _one_line_error(load_bundle, ensemble_copy)
    assert "says 3 generator(s) (seeds), the manifest lists 2" in msg


def test_missing_member_file_named(ensemble_copy):
    (ensemble_copy / "generator-2.safetensors").unlink()
    msg = _one_line_error(load_bundle, ensemble_copy)
    assert "missing generator-2.safetensors" in msg
    assert "generator-2.safetensors" in _one_line_error(
        check_weights, ensemble_copy, json.loads((ensemble_copy / "manifest.json").read_text())
    )


def test_nan_member_weights_refused(ensemble_copy):
    file = ensemble_copy / "discriminator-1.safetensors"
    tensors = load_file(str(file))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(file))
    msg = _one_line_error(load_bundle, ensemble_copy)
    assert "discriminator-1.safetensors" in msg and "NaN or infinite" in msg


def test_nan_member_not_saved(ensemble_dir, tmp_path):
    b = load_bundle(ensemble_dir)
    with torch.no_grad():
        next(b.members[2].parameters()).fill_(float("nan"))
    msg = _one_line_error(save_bundle, b, tmp_path)
    assert "generator 2" in msg and "not saved" in msg
    assert not any(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------- mean P, support


def test_ensemble_P_is_the_members_mean(ensemble_dir):
    b = load_bundle(ensemble_dir)
    adata = make_tiny_adata()
    x = b.scale(adata)
    P_ens, x_adv = generate_perturbed(b.generator, x)
    member_P = np.stack([generate_perturbed(G, x)[0] for G in b.members])
    np.testing.assert_allclose(P_ens, member_P.mean(0), atol=1e-6)
    np.testing.assert_allclose(x_adv, x + P_ens, atol=1e-6)
    pert = perturb_scaled(x, b)
    np.testing.assert_allclose(pert.P, member_P.mean(0), atol=1e-6)
    np.testing.assert_allclose(pert.P_members, member_P, atol=1e-6)
    assert pert.n_generators == 3
    assert perturb_scaled(x, b, members=False).P_members is None


def _direct_support(member_P: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """In how many members' own top k by mean P each gene is, by plain loops."""
    n_genes = member_P.shape[2]
    out = {"up": np.zeros(n_genes, int), "down": np.zeros(n_genes, int)}
    for P in member_P:
        mean = P.mean(0)
        order = sorted(range(n_genes), key=lambda g: (-mean[g], g))
        for g in order[:k]:
            out["up"][g] += 1
        for g in sorted(range(n_genes), key=lambda g: (mean[g], g))[:k]:
            out["down"][g] += 1
    return out


def test_support_against_a_direct_computation(ensemble_dir):
    b, adata, k = load_bundle(ensemble_dir), make_tiny_adata(), 5
    pert = perturb_adata(adata, b)
    rows = pert.source_rows()
    want = _direct_support(pert.P_members[:, rows], k)
    ranked = pert.ranking(k=k)
    for d in ("up", "down"):
        part = ranked[ranked["direction"] == d]
        idx = [b.genes.index(g) for g in part["gene"]]
        assert part["support"].tolist() == want[d][idx].tolist()
        assert set(part["n_members"]) == {3}
        assert member_support(pert.P_members[:, rows], k=k)[d].tolist() == want[d].tolist()
    # the members' mean P per gene gives the same support as their P
    means = pert.P_members[:, rows].mean(1)
    same = rank_genes(pert.P[rows], b.genes, k=k, members=means)
    assert same["support"].tolist() == ranked["support"].tolist()
    cons = consensus(pert.P[rows], b.genes, k=k, members=pert.P_members[:, rows])
    for _, r in cons.iterrows():
        assert r["support"] == want[r["direction"]][b.genes.index(r["gene"])]
    agreement = member_agreement(pert.P_members[:, rows], k=k)
    assert agreement["full_support_up"] == int((want["up"] == 3).sum())
    # per sample: in how many members' own top k of that sample the gene is
    top = top_genes(pert.P, b.genes, k=k, members=pert.P_members)
    s, j = 7, 2
    gene = top.up_index[s, j]
    direct = sum(gene in np.argsort(-P[s], kind="stable")[:k] for P in pert.P_members)
    assert top.up_support[s, j] == direct


def test_perturb_writes_support_bounded_or_not(ensemble_dir, monkeypatch):
    b, adata = load_bundle(ensemble_dir), make_tiny_adata()
    out = perturb(adata, b, copy=True, k=5)
    u = out.uns["tspg"]
    assert u["params"]["n_generators"] == 3
    assert u["params"]["member_seeds"].tolist() == b.member_seeds
    assert u["top_genes"]["up_support"].shape == (adata.n_obs, 5)
    pert = perturb_adata(adata, b)
    rows = pert.source_rows()
    want = consensus(pert.P[rows], b.genes, k=5, members=pert.P_members[:, rows])
    assert u["consensus"]["support"].tolist() == want["support"].tolist()
    # beyond the memory cap: no members' P kept, the same support from running sums
    import tspg.perturbation as tp

    monkeypatch.setattr(tp, "MEMBER_BYTES", 0)
    assert perturb_adata(adata, b).P_members is None
    bounded = perturb(adata, b, copy=True, k=5).uns["tspg"]
    assert bounded["consensus"]["support"].tolist() == want["support"].tolist()
    assert (bounded["top_genes"]["up_support"] == u["top_genes"]["up_support"]).all()


def test_verdict_grades_the_ensemble_stability(ensemble_dir):
    v = load_bundle(ensemble_dir).manifest["verdict"]["checks"]["stability"]
    assert v["figures"]["n_members"]["value"] == 3
    assert 0 <= v["figures"]["shared_up"]["value"] <= 20
    assert v["level"] in ("ok", "caution")


def test_a_diverging_member_is_named():
    config = TrainConfig(seeds=2, epochs=2, target_epochs=1, batch_size=16, g_lr=1e30, **NETS)
    with pytest.raises(ValueError) as err:
        train(make_tiny_adata(n_per_class=10), label_key="cell_type", target="beta", config=config)
    msg = str(err.value)
    assert "generator 1 of 2 (seed 0): training the generator diverged" in msg
    assert "\n" not in msg


def test_realism_is_the_median_over_members(ensemble_dir):
    """x + mean P is an average (less varied than any generator's x_adv): the realism
    figures of an ensemble are the median over its generators' own x_adv, the mean's kept
    apart as "ensemble_mean", and evaluate's spread and discriminator follow."""
    from tspg.baselines import split_arrays
    from tspg.metrics import energy_distance, evaluate, heldout_arrays

    b = load_bundle(ensemble_dir)
    adata = make_tiny_adata()
    Xtr, ytr, _ = split_arrays(adata, b, part="train")
    Xte, yte, _ = split_arrays(adata, b, part="test")
    held = heldout_arrays(b, Xtr, ytr, Xte, yte)
    assert len(held.members) == 3
    src = yte != "beta"
    real = Xte[yte == "beta"]
    own = [generate_perturbed(G, Xte[src])[1] for G in b.members]
    for mine, theirs in zip(held.members, own, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
    ed = held.figures["energy_distance"]
    each = [energy_distance(X, real) for X in own]
    assert ed["perturbed"] == pytest.approx(float(np.median(each)), rel=1e-5)
    assert ed["ensemble_mean"] == pytest.approx(energy_distance(held.sets["perturbed"], real))
    assert held.figures["samples"]["generators"] == 3
    knn = held.figures["independent_classifiers"]["knn_15"]
    assert "target_share_ensemble_mean" in knn
    assert 0 <= knn["target_share_perturbed"] <= 1
    result = evaluate(adata, b)
    assert set(result["spread_ratio"]) >= {"perturbed", "ensemble_mean"}
    assert set(result["discriminator"]) >= {"perturbed", "ensemble_mean"}
    label = result["verdict"]["checks"]["realism"]["figures"]["perturbed"]["label"]
    assert "median of the 3 generators'" in label


def test_realism_over_members_beyond_the_memory_cap(ensemble_dir, monkeypatch):
    """Where the perturbation keeps no members' P (data beyond its memory cap), the realism
    figures are still the members' median, not silently the ensemble mean's."""
    import tspg.perturbation as tp
    from tspg.baselines import split_arrays
    from tspg.metrics import heldout_arrays

    b = load_bundle(ensemble_dir)
    adata = make_tiny_adata()
    Xtr, ytr, _ = split_arrays(adata, b, part="train")
    Xte, yte, _ = split_arrays(adata, b, part="test")
    kept = heldout_arrays(b, Xtr, ytr, Xte, yte).figures
    monkeypatch.setattr(tp, "MEMBER_BYTES", 0)
    held = heldout_arrays(b, Xtr, ytr, Xte, yte)
    assert held.perturbation.P_members is None and len(held.members) == 3
    assert held.figures["energy_distance"] == pytest.approx(kept["energy_distance"])
    assert held.figures["independent_classifiers"] == kept["independent_classifiers"]


def test_evaluate_stability_reuses_the_members_P(ensemble_dir):
    """evaluate passes the members' P it already has; the figures equal a fresh run of the
    members (stability_figures without it)."""
    from tspg.baselines import split_arrays
    from tspg.metrics import evaluate
    from tspg.verdict import stability_figures

    b = load_bundle(ensemble_dir)
    adata = make_tiny_adata()
    Xte, yte, _ = split_arrays(adata, b, part="test")
    fresh = stability_figures(b, Xte[yte != "beta"])
    assert evaluate(adata, b)["stability"] == pytest.approx(fresh)
