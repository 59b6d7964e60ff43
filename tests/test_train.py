"""Networks, losses, target draws and the training loop (tspg/nets.py, tspg/training.py)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from conftest import QUICK_CONFIG, SMALL_NETS, TINY_CLASSES, make_tiny_adata
from torch import nn

from tspg.nets import Discriminator, Generator, ResidualBlock, TargetClassifier, evaluating
from tspg.pipeline import train, train_all_targets
from tspg.training import (
    TargetSampler,
    TrainConfig,
    cw_loss,
    energy_distance,
    fit_generator,
    generator_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    norm_loss,
    resolve_device,
    td_loss,
)

N_GENES = 40


def linear_widths(module: nn.Module) -> list[int]:
    return [m.out_features for m in module.modules() if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------- networks


def test_generator_layers_as_in_the_paper():
    G = Generator(N_GENES)
    #           encoder         3 residual blocks of width 128      decoder   output
    assert linear_widths(G) == [512, 256, 128] + [128, 128] * 3 + [256, 512, N_GENES]
    blocks = [m for m in G.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3
    # every Dense but the output has BatchNorm; ReLU in encoder/decoder, tanh at the end
    assert sum(isinstance(m, nn.BatchNorm1d) for m in G.modules()) == 3 + 3 * 2 + 2
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.Linear)
    assert not any(isinstance(m, nn.LeakyReLU) for m in G.modules())


def test_generator_output_shape_and_range():
    torch.manual_seed(0)
    G = Generator(N_GENES).eval()
    P = G(torch.rand(7, N_GENES) * 1000)  # huge inputs still give P in [-1, 1]
    assert P.shape == (7, N_GENES)
    assert P.min() >= -1 and P.max() <= 1


def test_residual_block_adds_its_input():
    block = ResidualBlock(8).eval()
    last_bn = block.body[-1]
    nn.init.zeros_(last_bn.weight)
    nn.init.zeros_(last_bn.bias)
    h = torch.randn(4, 8)
    assert torch.equal(block(h), h)


def test_discriminator_layers_and_output():
    D = Discriminator(N_GENES)
    assert linear_widths(D) == [512, 256, 128, 1]
    leaky = [m for m in D.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 3 and all(m.negative_slope == 0.2 for m in leaky)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in D.modules()) == 3
    assert isinstance(D.net[-1], nn.Sigmoid)
    out = D.eval()(torch.rand(5, N_GENES))
    assert out.shape == (5,)
    assert (out > 0).all() and (out < 1).all()


def test_target_classifier_layers_and_output():
    f = TargetClassifier(N_GENES, 4)
    assert linear_widths(f) == [1024, 512, 128, 4]
    assert sum(isinstance(m, nn.ReLU) for m in f.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm1d) for m in f.modules())
    assert f(torch.rand(6, N_GENES)).shape == (6, 4)


def test_networks_follow_the_config_sizes():
    assert linear_widths(Generator(10, encoder=(16, 8), n_residual=1, decoder=(16,))) == [
        16,
        8,
        8,
        8,
        16,
        10,
    ]
    assert linear_widths(Discriminator(10, hidden=(6,))) == [6, 1]
    assert linear_widths(TargetClassifier(10, 3, hidden=(5,))) == [5, 3]


# ----------------------------------------------------------------------------- losses


def test_lsgan_losses():
    assert lsgan_generator_loss(torch.tensor([0.5, 1.0])).item() == pytest.approx((0.25 + 0.0) / 2)
    d_real, d_fake = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])
    assert lsgan_discriminator_loss(d_real, d_fake).item() == pytest.approx(0.125 + 0.125)
    assert lsgan_discriminator_loss(torch.ones(3), torch.zeros(3)).item() == 0.0  # a perfect D


def test_cw_loss_on_logits_mean_and_sum():
    out = torch.tensor([[1.0, 3.0, 2.0], [4.0, 0.0, 1.0]])
    # target 2: sample 1: max(1, 3) - 2 = 1; sample 2: max(4, 0) - 1 = 3
    assert cw_loss(out, 2).item() == pytest.approx(2.0)
    assert cw_loss(out, 2, reduce="sum").item() == pytest.approx(4.0)


def test_cw_loss_excludes_target_from_max_and_clamps_at_kappa():
    out = torch.tensor([[0.0, 1.0, 5.0]])  # the target already wins by 4
    assert cw_loss(out, 2, kappa=0.0).item() == 0.0
    assert cw_loss(out, 2, kappa=2.0).item() == pytest.approx(-2.0)
    # a large kappa shows the margin itself: max over the others (1), not over all (5)
    assert cw_loss(out, 2, kappa=10.0).item() == pytest.approx(1.0 - 5.0)


def test_cw_loss_on_probabilities():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    assert cw_loss(probs, 2, reduce="sum").item() == pytest.approx((0.5 - 0.3) + 0.0)
    assert cw_loss(probs, 2, kappa=1.0, reduce="sum").item() == pytest.approx(0.2 + (0.1 - 0.8))


def test_cw_loss_gradient_raises_the_target():
    out = torch.tensor([[1.0, 3.0, 2.0]], requires_grad=True)
    cw_loss(out, 2).backward()
    assert out.grad.tolist() == [[0.0, 1.0, -1.0]]
    assert torch.equal(out.detach(), torch.tensor([[1.0, 3.0, 2.0]]))  # input not modified


def test_norm_loss_both_forms():
    P = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    assert norm_loss(P).item() == pytest.approx((5.0 + 10.0) / 2)
    assert norm_loss(P, form="batch").item() == pytest.approx(math.sqrt(9 + 16 + 36 + 64) + 1.0)
    assert norm_loss(torch.zeros(2, 2), form="batch").item() == 1.0


def test_td_loss_is_mean_absolute_error():
    x = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    r = torch.tensor([[1.0, 1.0], [0.0, 0.25]])
    assert td_loss(x, r).item() == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)


def test_energy_distance_hand_computed():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    # V-statistic over all 9 ordered pairs of each:
    #   E d(A,B)  = (0+3+4 + 1+2+sqrt17 + 1+sqrt10+3) / 9 = (14 + sqrt17 + sqrt10) / 9
    #   E d(A,A') = 2 (1 + 1 + sqrt2) / 9,   E d(B,B') = 2 (3 + 4 + 5) / 9
    #   => 2 E d(A,B) - E d(A,A') - E d(B,B') = 2 (sqrt17 + sqrt10 - sqrt2) / 9
    expected = 2 * (math.sqrt(17) + math.sqrt(10) - math.sqrt(2)) / 9
    assert energy_distance(a, b).item() == pytest.approx(expected, abs=1e-3)
    assert energy_distance(b, a).item() == pytest.approx(expected, abs=1e-3)
    assert energy_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    # repulsion weights the E d(A,A') term only
    e_aa = 2 * (2 + math.sqrt(2)) / 9
    assert energy_distance(a, b, repulsion=0.5).item() == pytest.approx(
        expected + 0.5 * e_aa, abs=1e-3
    )


def test_energy_distance_gradient_finite_at_identical_points():
    a = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.9]], requires_grad=True)
    loss = energy_distance(a, a.detach().clone())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()


def test_generator_loss_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    f = TargetClassifier(6, 3, hidden=(8,)).eval()
    D = Discriminator(6, hidden=(8,)).eval()
    x = torch.rand(5, 6)
    P = torch.rand(5, 6) - 0.5
    x_adv = (x + P).clamp(0, 1)
    X_t = torch.rand(4, 6)
    cfg = TrainConfig(
        w_gan=2.0, w_adv=3.0, w_norm=0.5, w_td=0.0, w_ed=7.0, kappa=1.0, ed_repulsion=0.8
    )
    loss = generator_loss(
        x_adv, P, f, D, 1, cfg, sampler=None, X_t=X_t, generator=torch.Generator()
    )
    gan = lsgan_generator_loss(D(x_adv))
    adv = cw_loss(f(x_adv), 1, kappa=1.0)  # logits, averaged
    norm = norm_loss(P)
    ed = energy_distance(x_adv, X_t, repulsion=0.8)  # all 4 target samples fit in the batch of 5
    for got, want in ((loss.gan, gan), (loss.adv, adv), (loss.norm, norm), (loss.ed, ed)):
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.td.item() == 0.0  # weight 0: skipped
    assert loss.total.item() == pytest.approx(
        (2 * gan + 3 * adv + 0.5 * norm + 7 * ed).item(), rel=1e-6
    )
    # the paper's form: C-W on softmax probabilities, summed; ||P_batch||_2 + 1
    paper = TrainConfig.for_recipe("paper", w_td=0.0)
    loss = generator_loss(
        x_adv, P, f, D, 1, paper, sampler=None, X_t=X_t, generator=torch.Generator()
    )
    assert loss.adv.item() == pytest.approx(
        cw_loss(torch.softmax(f(x_adv), 1), 1, reduce="sum").item(), rel=1e-6
    )
    assert loss.norm.item() == pytest.approx(torch.linalg.vector_norm(P).item() + 1.0, rel=1e-6)
    assert loss.ed.item() == 0.0


def test_evaluating_freezes_batchnorm_statistics_and_restores_the_mode():
    D = Discriminator(4, hidden=(3,)).train()
    bn = next(m for m in D.modules() if isinstance(m, nn.BatchNorm1d))
    before = bn.running_mean.clone()
    with evaluating(D):
        assert not D.training
        D(torch.rand(8, 4) * 10)
    assert D.training and torch.equal(bn.running_mean, before)
    D(torch.rand(8, 4) * 10)  # in training mode the statistics move
    assert not torch.equal(bn.running_mean, before)


def test_each_step_updates_D_on_one_batch_then_G_against_D_in_inference_mode():
    """The reference's order: D on [real, x_adv] as one batch (training mode), then G's loss
    through D in inference mode (BatchNorm uses, and keeps, its running statistics)."""
    rng = np.random.default_rng(0)
    X = rng.random((24, 6), dtype=np.float32)
    y = np.repeat([0, 1, 2], 8)
    f = TargetClassifier(6, 3, hidden=(8,)).eval()
    calls = []

    def record(module, args):
        if isinstance(module, Discriminator):
            calls.append((len(args[0]), module.training))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        fit_generator(
            X, y, 1, f, TrainConfig.for_recipe("paper", epochs=1, batch_size=8, **SMALL_NETS)
        )
    finally:
        handle.remove()
    # 24 samples, batches of 8 (the paper's G learns on every sample): 3 steps of (D, G)
    assert calls == [(16, True), (8, False)] * 3


def test_a_diverging_run_stops_with_a_clear_error():
    rng = np.random.default_rng(0)
    X = rng.random((24, 6), dtype=np.float32)
    y = np.repeat([0, 1, 2], 8)
    f = TargetClassifier(6, 3, hidden=(8,)).eval()
    cfg = TrainConfig(
        epochs=3, batch_size=8, g_lr=1e30, d_lr=1e30, **SMALL_NETS
    )  # steps of 1e30 overflow float32
    with pytest.raises(
        ValueError, match=r"training the generator diverged in epoch \d: loss \w+ is (nan|inf)"
    ):
        fit_generator(X, y, 1, f, cfg)


# ----------------------------------------------------------------------------- target draws


def target_class(
    n_t: int = 8, n_genes: int = 5, spread: float = 0.05, seed: int = 0
) -> torch.Tensor:
    """Correlated values around 0.5, narrow enough that clipping to [0, 1] hardly matters."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (n_t, 2)) @ rng.normal(0, 1, (2, n_genes)) + rng.normal(
        0, 0.3, (n_t, n_genes)
    )
    return torch.tensor(0.5 + spread * base, dtype=torch.float32)


def draw(X_t: torch.Tensor, covariance: str, m: int = 40_000, seed: int = 0, **kw) -> np.ndarray:
    sampler = TargetSampler(
        X_t, covariance=covariance, generator=torch.Generator().manual_seed(seed), **kw
    )
    assert sampler.kind == covariance
    return sampler.sample(m).numpy().astype(np.float64)


def test_full_draws_have_the_empirical_mean_and_covariance():
    X_t = target_class()
    r = draw(X_t, "full")
    X = X_t.numpy().astype(np.float64)
    cov = np.cov(X, rowvar=False)
    scale = np.abs(cov).max()
    np.testing.assert_allclose(r.mean(0), X.mean(0), atol=0.03 * math.sqrt(scale))
    np.testing.assert_allclose(np.cov(r, rowvar=False), cov, atol=0.05 * scale)
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 0.3 * scale  # the test data are correlated


def test_diagonal_draws_match_variances_only():
    X_t = target_class()
    r = draw(X_t, "diagonal")
    cov = np.cov(X_t.numpy().astype(np.float64), rowvar=False)
    scale = np.abs(cov).max()
    c = np.cov(r, rowvar=False)
    np.testing.assert_allclose(np.diag(c), np.diag(cov), atol=0.05 * scale)
    np.testing.assert_allclose(c - np.diag(np.diag(c)), 0.0, atol=0.05 * scale)


def test_lowrank_draws_keep_per_gene_variance():
    X_t = target_class(n_t=12, n_genes=20)
    r = draw(X_t, "lowrank", rank=2)
    X = X_t.numpy().astype(np.float64)
    var = X.var(0, ddof=1)
    np.testing.assert_allclose(r.var(0), var, rtol=0.1)
    np.testing.assert_allclose(r.mean(0), X.mean(0), atol=0.01)


@pytest.mark.parametrize("covariance", ["full", "diagonal", "lowrank"])
def test_draws_clipped_and_fewer_samples_than_genes(covariance):
    X_t = target_class(n_t=4, n_genes=30, spread=0.4)  # wide: many raw draws fall outside [0, 1]
    r = draw(X_t, covariance, m=500)
    assert r.shape == (500, 30)
    assert not np.isnan(r).any()
    assert r.min() == 0.0 and r.max() == 1.0


def test_draws_are_seeded_and_auto_picks_full_for_small_classes():
    X_t = target_class()
    assert np.array_equal(draw(X_t, "full", m=10, seed=3), draw(X_t, "full", m=10, seed=3))
    assert not np.array_equal(draw(X_t, "full", m=10, seed=3), draw(X_t, "full", m=10, seed=4))
    assert TargetSampler(X_t, covariance="auto", generator=torch.Generator()).kind == "full"


def test_auto_covariance_turns_lowrank_for_large_classes(monkeypatch):
    X_t = target_class(n_t=12, n_genes=20)
    # the training module (the package exports the function tspg.train)
    monkeypatch.setattr(
        sys.modules["tspg.training"], "FULL_COVARIANCE_BYTES", 12 * 20 * 4 - 1
    )  # one byte short of A
    sampler = TargetSampler(X_t, covariance="auto", generator=torch.Generator())
    assert sampler.kind == "lowrank" and "memory-safe" in sampler.describe()
    with pytest.raises(ValueError, match="unknown covariance 'fancy'"):
        TargetSampler(X_t, covariance="fancy", generator=torch.Generator())


# ----------------------------------------------------------------------------- config and device


def test_config_refuses_values_out_of_range():
    for bad, message in (
        (dict(epochs=0), "epochs = 0: must be at least 1"),
        (dict(batch_size=1), "batch_size = 1: must be at least 2"),
        (dict(w_ed=-1.0), "w_ed = -1.0: must be 0 or more"),
        (dict(g_lr=0.0), "g_lr = 0.0: must be more than 0"),
        (dict(kappa=math.nan), "kappa = nan: must be a finite number"),
        (dict(test_size=1.0), "test_size = 1.0: must be between 0 and 1"),
        (dict(ed_repulsion=1.5), "ed_repulsion = 1.5: must be between 0 and 1"),
        (dict(gen_encoder=(64, 0)), "gen_encoder = \\(64, 0\\): widths must be at least 1"),
        (dict(adv_space="prob"), "adv_space = 'prob': choose one of logits, probs"),
        (dict(recipe="fancy"), "recipe = 'fancy': choose one of tspg\\+, paper"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    assert (
        TrainConfig(w_norm=0.0, gen_residual=0, kappa=0.0).gen_residual == 0
    )  # zeros where they mean "off"


def test_recipes():
    paper = TrainConfig.for_recipe("paper")
    assert (paper.adv_space, paper.adv_reduce, paper.norm_form, paper.covariance) == (
        "probs",
        "sum",
        "batch",
        "auto",
    )
    assert paper.w_norm == 1.0 and paper.w_td == 1.0
    assert (paper.g_lr, paper.d_lr, paper.batch_size, paper.epochs) == (2e-4, 1e-4, 128, 150)
    assert (paper.target_epochs, paper.target_batch_size) == (
        50,
        32,
    )  # the reference's train-target defaults
    assert (
        TrainConfig.for_recipe("paper", epochs=3, kappa=None).epochs == 3
    )  # None keeps the recipe's value
    with pytest.raises(ValueError, match="unknown recipe 'fancy'"):
        TrainConfig.for_recipe("fancy")
    cfg = TrainConfig(gen_encoder=(64, 32), seed=5)
    assert (
        TrainConfig.from_dict(cfg.to_dict() | {"gen_encoder": [64, 32], "unknown_field": 1}) == cfg
    )
    older = {
        k: v for k, v in TrainConfig(batch_size=64).to_dict().items() if k != "target_batch_size"
    }
    assert (
        TrainConfig.from_dict(older).target_batch_size == 64
    )  # older bundles trained f in batches of batch_size


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


# ----------------------------------------------------------------------------- the loop


def tiny_train(**config):
    """Train on the tiny GEM (target 'beta') on the CPU."""
    cfg = TrainConfig.for_recipe(config.pop("recipe", "tspg+"), **config)
    return train(
        make_tiny_adata(),
        label_key="cell_type",
        target="beta",
        config=cfg,
        device="cpu",
        dataset="tiny",
    )


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("train_seconds")}


def test_short_run_reaches_high_perturbation_accuracy(quick_bundle):
    m = quick_bundle.metrics
    assert m["target_model_accuracy"] >= 0.9
    assert m["perturbation_accuracy_non_target"] >= 0.9
    assert m["n_test"] == 12 and m["n_test_non_target"] == 8
    history = quick_bundle.manifest["history"]
    assert {"total", "gan", "adv", "d_loss"} <= set(history)
    assert all(len(v) == QUICK_CONFIG["epochs"] for v in history.values())
    assert all(np.isfinite(v).all() for v in history.values())


def test_same_seed_same_run_other_seed_differs():
    a = tiny_train(epochs=3, target_epochs=3, batch_size=16, **SMALL_NETS)
    b = tiny_train(epochs=3, target_epochs=3, batch_size=16, **SMALL_NETS)
    c = tiny_train(epochs=3, target_epochs=3, batch_size=16, seed=1, **SMALL_NETS)
    assert comparable(a.metrics) == comparable(b.metrics)
    assert a.manifest["history"] == b.manifest["history"]
    for key, v in a.generator.state_dict().items():
        assert torch.equal(v, b.generator.state_dict()[key]), key
    for key, v in a.target_model.state_dict().items():
        assert torch.equal(v, b.target_model.state_dict()[key]), key
    assert a.manifest["history"] != c.manifest["history"]
    assert not torch.equal(
        a.generator.state_dict()["net.0.weight"], c.generator.state_dict()["net.0.weight"]
    )
    # the split has its own seed, so that seeds can be compared on one split
    assert a.split == c.split
    d = tiny_train(epochs=1, target_epochs=1, batch_size=16, split_seed=1, **SMALL_NETS)
    assert a.split != d.split


def test_fit_generator_is_seeded_by_the_config():
    """Same target model and data: the generator's own randomness follows config.seed."""
    rng = np.random.default_rng(0)
    X = rng.random((24, 6), dtype=np.float32)
    y = np.repeat([0, 1, 2], 8)
    f = TargetClassifier(6, 3, hidden=(8,)).eval()

    def weights(seed):
        cfg = TrainConfig(epochs=2, batch_size=8, seed=seed, **SMALL_NETS)
        return fit_generator(X, y, 1, f, cfg).generator.state_dict()["net.0.weight"]

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_paper_recipe_runs():
    b = tiny_train(recipe="paper", epochs=3, target_epochs=3, batch_size=16, **SMALL_NETS)
    assert b.config.recipe == "paper" and b.manifest["covariance_used"] == "full"
    h = b.manifest["history"]
    assert all(np.isfinite(v).all() for v in h.values())
    assert min(h["norm"]) > 1.0  # batch form: ||P||_2 + 1
    assert min(h["td"]) > 0.0 and max(h["ed"]) == 0.0
    assert b.config == TrainConfig.for_recipe(
        "paper", epochs=3, target_epochs=3, batch_size=16, **SMALL_NETS
    )


def test_train_all_targets_shares_one_target_model():
    cfg = TrainConfig.for_recipe("tspg+", epochs=2, target_epochs=2, batch_size=16, **SMALL_NETS)
    bundles = train_all_targets(
        make_tiny_adata(), label_key="cell_type", config=cfg, device="cpu", dataset="tiny"
    )
    assert [b.target for b in bundles] == TINY_CLASSES
    assert [b.name for b in bundles] == [f"tiny-{c}" for c in TINY_CLASSES]
    first = bundles[0].target_model.state_dict()
    for b in bundles[1:]:
        assert b.split == bundles[0].split
        assert b.metrics["target_model_accuracy"] == bundles[0].metrics["target_model_accuracy"]
        for key, v in b.target_model.state_dict().items():
            assert torch.equal(v, first[key]), key
    g0, g1 = (b.generator.state_dict()["net.0.weight"] for b in bundles[:2])
    assert not torch.equal(g0, g1)  # one generator per target
    # reusing a bundle's target model: same split, same weights, no new target training
    again = train_all_targets(
        make_tiny_adata(),
        label_key="cell_type",
        targets=["gamma"],
        config=cfg,
        device="cpu",
        dataset="tiny",
        target_model=bundles[0],
    )[0]
    assert again.split == bundles[0].split and again.manifest["target_model_from"] == "tiny-alpha"
    assert again.metrics["train_seconds_target_model"] == 0.0
    for key, v in again.target_model.state_dict().items():
        assert torch.equal(v, first[key]), key


def test_fit_generator_needs_two_target_samples():
    X = np.random.default_rng(0).random((10, 5), dtype=np.float32)
    y = np.array([0] * 9 + [1])
    f = TargetClassifier(5, 2, hidden=(4,))
    cfg = TrainConfig(epochs=1, **SMALL_NETS)
    with pytest.raises(
        ValueError, match="the target class has 1 training samples; at least 2 are needed"
    ):
        fit_generator(X, y, 1, f, cfg)
