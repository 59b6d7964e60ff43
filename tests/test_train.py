"""Networks, losses, target draws and the training loop (tspg/nets.py, tspg/training.py)."""

from __future__ import annotations

import math
import os
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import torch
from conftest import QUICK_CONFIG, SMALL_NETS, TINY_CLASSES, make_tiny_adata
from torch import nn

import tspg.nets
from tspg.nets import (
    Discriminator,
    Generator,
    Linear,
    ResidualBlock,
    TargetClassifier,
    evaluating,
    onednn_works,
    uses_onednn,
)
from tspg.pipeline import train, train_all_targets
from tspg.training import (
    Batches,
    Samples,
    TargetSampler,
    TrainConfig,
    cpu_has_bfloat16,
    cw_loss,
    default_threads,
    energy_distance,
    fit_generator,
    fit_target,
    generator_loss,
    idle_cores,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    make_adam,
    norm_loss,
    plan_chunks,
    resolve_device,
    seed_everything,
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
    assert isinstance(G.net[-1], Linear) and G.net[-1].tanh  # Dense n_genes + tanh, one layer
    assert not any(isinstance(m, nn.LeakyReLU) for m in G.modules())


def test_generator_weights_from_before_the_fused_tanh_load_and_agree():
    """Bundles saved while tanh was a module of its own (nn.Tanh after the output layer) load
    strictly into today's generator and give the same output (bit for bit off oneDNN)."""
    torch.manual_seed(0)
    old = Generator(N_GENES)
    old.net[-1].tanh = False
    old.net.append(nn.Tanh())  # the layout before
    new = Generator(N_GENES)
    new.load_state_dict(old.state_dict())  # strict: the same keys
    x = torch.rand(6, N_GENES)
    assert torch.equal(new.eval()(x), old.eval()(x))


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


def _onednn_ran(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__.startswith("_OneDNNLinear")


needs_onednn = pytest.mark.skipif(not onednn_works(), reason="no oneDNN on this CPU")


@needs_onednn
@pytest.mark.parametrize(
    "n_in, n_out, tanh", [(4100, 512, False), (512, 4100, False), (512, 4100, True)]
)  # 2,099,200 weights; G's output layer has tanh in the same pass
def test_wide_layers_run_on_onednn_with_the_same_values_and_gradients(n_in, n_out, tanh):
    torch.manual_seed(0)
    layer = Linear(n_in, n_out, tanh=tanh)
    x = torch.rand(37, n_in, requires_grad=True)
    out = layer(x)
    assert _onednn_ran(out)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    got = (out.detach(), x.grad, layer.weight.grad, layer.bias.grad)
    x.grad = layer.weight.grad = layer.bias.grad = None
    ref = nn.functional.linear(x, layer.weight, layer.bias)
    if tanh:
        ref = torch.tanh(ref)
        assert ref.abs().max() > 0.5  # the test reaches tanh's curved part
    (ref * upstream).sum().backward()
    want = (ref.detach(), x.grad, layer.weight.grad, layer.bias.grad)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # a frozen layer (D and f during G's step): only the input's gradient, also from a
    # gradient that is one value expanded (stride 0: .sum()'s)
    layer.requires_grad_(False)
    x.grad = layer.weight.grad = layer.bias.grad = None
    layer(x).sum().backward()
    assert layer.weight.grad is None
    x_ref = x.detach().requires_grad_()
    ref = nn.functional.linear(x_ref, layer.weight, layer.bias)
    (torch.tanh(ref) if tanh else ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    if not tanh:
        torch.testing.assert_close(x.grad, layer.weight.sum(0).expand_as(x), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_onednn_only_where_it_pays_and_is_allowed(monkeypatch):
    torch.manual_seed(0)
    wide, narrow = Linear(4100, 512), Linear(1024, 512)  # 2,099,200 and 524,288 weights
    x = torch.rand(8, 4100, requires_grad=True)
    assert _onednn_ran(wide(x))
    assert not _onednn_ran(narrow(torch.rand(8, 1024, requires_grad=True)))  # MKL is as fast
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: torch's own path
        out = wide(x)
    assert out.dtype == torch.bfloat16 and not _onednn_ran(out)
    monkeypatch.setattr(tspg.nets, "ONEDNN", False)  # $TSPG_ONEDNN=0
    assert not _onednn_ran(wide(x))
    assert not uses_onednn(Generator(4100))
    monkeypatch.setattr(tspg.nets, "ONEDNN", True)
    assert uses_onednn(Generator(4100)) and not uses_onednn(Generator(765))


@needs_onednn
def test_training_on_onednn_is_seeded_and_close_to_mkl(monkeypatch):
    """The same seed gives the same weights on the oneDNN path (4,100 genes: the layers next
    to the genes run there); switched off, the run follows the same course within float32
    noise; the bundle records which library ran."""
    X, y = small_problem((12, 12, 12), n_genes=4100)
    cfg = TrainConfig(epochs=2, target_epochs=2, batch_size=12, target_batch_size=12)

    def run():
        f = fit_target(X, y, 3, cfg)
        return f, fit_generator(X, y, 1, f, cfg)

    (f1, g1), (f2, g2) = run(), run()
    assert uses_onednn(g1.generator) and uses_onednn(f1) and uses_onednn(g1.discriminator)
    assert state_equal(f1, f2) and state_equal(g1.generator, g2.generator)
    monkeypatch.setattr(tspg.nets, "ONEDNN", False)
    f3, _ = run()
    assert not state_equal(f1, f3)  # other kernels, other rounding
    for k, v in f1.state_dict().items():
        torch.testing.assert_close(v, f3.state_dict()[k], rtol=1e-3, atol=1e-4)
    monkeypatch.setattr(tspg.nets, "ONEDNN", True)
    adata = ad.AnnData(
        X,
        obs=pd.DataFrame(
            {"label": np.array(["a", "b", "c"])[y]}, index=[f"s{i}" for i in range(len(y))]
        ),
        var=pd.DataFrame(index=[f"g{i}" for i in range(X.shape[1])]),
    )
    cfg = TrainConfig(epochs=1, target_epochs=1, batch_size=12, seeds=1)
    bundle = train(adata, label_key="label", target="b", config=cfg, device="cpu")
    assert bundle.metrics["matmul"] == "onednn"


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


# ----------------------------------------------------------------------------- the loop's engine


def small_problem(n_per_class=(8, 8, 8), n_genes: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    X = rng.random((len(y), n_genes), dtype=np.float32)
    X[rng.random(X.shape) < 0.5] = 0.0  # half zeros, so a sparse copy is really sparse
    return X, y


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def reference_fit_target(X, y, n_classes, cfg):
    """The loop as it was before losses stayed on the device: a host sync (``.item()``) per
    step, the batch order drawn on the host, the data indexed per batch."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    f = TargetClassifier(X.shape[1], n_classes, hidden=cfg.target_hidden)
    opt = make_adam(f.parameters(), cfg.target_lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
    means = []
    for _ in range(cfg.target_epochs):
        total, count = 0.0, 0
        order = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), cfg.target_batch_size):
            idx = order[i : i + cfg.target_batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(f(Xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        means.append(total / count)
    return f.eval(), means


def reference_fit_generator(X, y, target, f, cfg):
    """The generator's loop as it was: every loss read with ``float()`` after every step."""
    gen = seed_everything(cfg.seed + 1)
    G = Generator(
        X.shape[1], encoder=cfg.gen_encoder, n_residual=cfg.gen_residual, decoder=cfg.gen_decoder
    )
    D = Discriminator(X.shape[1], hidden=cfg.disc_hidden)
    for p in f.parameters():
        p.requires_grad_(False)
    opt_g, opt_d = make_adam(G.parameters(), cfg.g_lr), make_adam(D.parameters(), cfg.d_lr)
    Xall = torch.from_numpy(X)
    X_t = Xall[torch.from_numpy(y == target)]
    X_src = Xall[torch.from_numpy(y != target)] if cfg.train_on == "non-target" else Xall
    sampler = TargetSampler(X_t, covariance=cfg.covariance, generator=gen) if cfg.w_td else None
    history = {}
    for _ in range(cfg.epochs):
        sums, n_steps = {}, 0
        order = torch.randperm(len(X_src), generator=gen)
        for i in range(0, len(X_src), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:
                continue
            x = X_src[idx]
            real = (
                x
                if cfg.disc_real == "all"
                else X_t[torch.randint(len(X_t), (len(x),), generator=gen)]
            )
            G.eval()
            with torch.no_grad():
                x_fake = (x + G(x)).clamp(0, 1)
            G.train()
            d_out = D(torch.cat([real, x_fake]))
            d_loss = lsgan_discriminator_loss(d_out[: len(x)], d_out[len(x) :])
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            g = G(x)
            with evaluating(D):
                loss = generator_loss(
                    (x + g).clamp(0, 1),
                    g,
                    f,
                    D,
                    target,
                    cfg,
                    sampler=sampler,
                    X_t=X_t,
                    generator=gen,
                )
            opt_g.zero_grad()
            loss.total.backward()
            opt_g.step()
            for k, v in {**loss.floats(), "d_loss": d_loss.item()}.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
        for k, v in sums.items():
            history.setdefault(k, []).append(v / n_steps)
    return G, D, history


@pytest.mark.parametrize("recipe", ["tspg+", "paper"])
def test_losses_summed_on_the_device_equal_the_per_step_host_reads(recipe):
    """One sync per epoch changes nothing: the same weights, and losses equal to the last bit
    to those summed from a ``.item()`` per step (the device sums in float64, as Python does)."""
    X, y = small_problem((9, 8, 7))  # batches of 8: last batches of 8 and 0 / of 1 (dropped)
    cfg = TrainConfig.for_recipe(
        recipe, epochs=3, target_epochs=3, batch_size=8, target_batch_size=8, **SMALL_NETS
    )
    got_losses = []
    f = fit_target(X, y, 3, cfg, callback=lambda i, n, losses: got_losses.append(losses))
    want_f, want_losses = reference_fit_target(X, y, 3, cfg)
    assert state_equal(f, want_f)
    assert [d["target_loss"] for d in got_losses] == want_losses
    fit = fit_generator(X, y, 1, f, cfg)
    G, D, history = reference_fit_generator(X, y, 1, want_f, cfg)
    assert state_equal(fit.generator, G.eval()) and state_equal(fit.discriminator, D.eval())
    assert fit.history == history
    assert (
        fit.steps == 3 * (3 if recipe == "paper" else 2) and fit.steps_per_point == fit.steps // 3
    )


def test_plan_chunks():
    assert plan_chunks(4, epochs=3) == [4, 4, 4]
    assert plan_chunks(4, epochs=3, steps=10) == [4, 4, 2]  # the budget wins over epochs
    assert plan_chunks(4, epochs=3, steps=8) == [4, 4]
    assert plan_chunks(5000, epochs=1, steps=2500) == [1000, 1000, 500]  # MAX_CHUNK_STEPS


def test_step_budget_counts_steps_exactly():
    X, y = small_problem((10, 10, 10))
    cfg = TrainConfig(
        epochs=50,
        target_epochs=50,
        steps=7,
        target_steps=5,
        batch_size=8,
        target_batch_size=8,
        **SMALL_NETS,
    )  # 30 samples in batches of 8: 4 steps per pass (the last batch holds 6)
    calls = {"f": 0, "D": 0}
    reports = {"f": [], "G": []}

    def count(module, args):
        if module.training and isinstance(module, TargetClassifier):
            calls["f"] += 1
        if module.training and isinstance(module, Discriminator):
            calls["D"] += 1  # once per step: D's own update

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        f = fit_target(X, y, 3, cfg, callback=lambda i, n, _: reports["f"].append((i, n)))
        fit = fit_generator(X, y, 1, f, cfg, callback=lambda i, n, _: reports["G"].append((i, n)))
    finally:
        handle.remove()
    assert calls == {"f": 5, "D": 7}
    assert reports["f"] == [(1, 2), (2, 2)]  # chunks of 4 + 1 steps
    # the generator learns on the 20 non-target samples: 3 steps per pass, chunks 3 + 3 + 1
    assert reports["G"] == [(1, 3), (2, 3), (3, 3)]
    assert fit.steps == 7 and fit.steps_per_point == 3
    assert all(len(v) == 3 for v in fit.history.values())


def test_a_diverging_target_model_or_step_budget_names_where():
    X, y = small_problem()
    cfg = TrainConfig(target_epochs=3, target_batch_size=8, target_lr=1e30, **SMALL_NETS)
    with pytest.raises(
        ValueError,
        match=r"training the target model diverged in epoch \d: loss target_loss is (nan|inf)",
    ):
        fit_target(X, y, 3, cfg)
    f = TargetClassifier(6, 3, hidden=(8,)).eval()
    cfg = TrainConfig(steps=9, batch_size=8, g_lr=1e30, d_lr=1e30, **SMALL_NETS)
    with pytest.raises(ValueError, match=r"diverged in steps 1-2: loss \w+ is (nan|inf)"):
        fit_generator(X, y, 1, f, cfg)


def test_balanced_sampling_draws_classes_evenly():
    labels = np.repeat([0, 1, 2], [400, 40, 4])  # 100:10:1
    pool = np.arange(len(labels))
    draws = {}
    for sampling in ("uniform", "balanced"):
        stream = Batches(
            pool, 32, torch.Generator().manual_seed(0), sampling=sampling, labels=labels
        )
        idx = torch.cat([next(stream) for _ in range(300)]).numpy()
        draws[sampling] = idx
    share = np.bincount(labels[draws["balanced"]], minlength=3) / len(draws["balanced"])
    np.testing.assert_allclose(share, 1 / 3, atol=0.02)  # 9,600 draws: 0.02 is 4 sd
    assert set(draws["balanced"][labels[draws["balanced"]] == 2]) == {440, 441, 442, 443}
    share = np.bincount(labels[draws["uniform"]], minlength=3) / len(draws["uniform"])
    np.testing.assert_allclose(share, [400 / 444, 40 / 444, 4 / 444], atol=0.01)
    # the pool is respected: non-target samples only
    stream = Batches(
        np.flatnonzero(labels != 1), 16, torch.Generator(), sampling="balanced", labels=labels
    )
    assert 1 not in labels[torch.cat([next(stream) for _ in range(50)]).numpy()]


def test_balanced_sampling_trains_and_is_seeded():
    X, y = small_problem((16, 8, 4))
    f = TargetClassifier(6, 3, hidden=(8,)).eval()

    def run(seed):
        cfg = TrainConfig(epochs=2, batch_size=8, sampling="balanced", seed=seed, **SMALL_NETS)
        return fit_generator(X, y, 1, f, cfg)

    a, b, c = run(0), run(0), run(1)
    assert state_equal(a.generator, b.generator) and a.history == b.history
    assert not state_equal(a.generator, c.generator)
    assert a.steps == 2 * 3  # 20 non-target samples in batches of 8: 3 steps per pass (8, 8, 4)


@pytest.mark.parametrize("budget", [None, 1], ids=["densified", "csr-per-batch"])
def test_sparse_input_trains_exactly_as_dense(budget):
    X, y = small_problem((9, 8, 7))
    X[3] = 0.0  # an empty row
    sparse = scipy.sparse.csr_matrix(X)
    assert Samples(sparse, torch.device("cpu"), budget=budget).kind == (
        "dense" if budget is None else "csr"
    )
    for recipe in ("tspg+", "paper"):
        cfg = TrainConfig.for_recipe(recipe, epochs=2, target_epochs=2, batch_size=8, **SMALL_NETS)
        f_dense = fit_target(X, y, 3, cfg)
        f_sparse = fit_target(sparse, y, 3, cfg, memory_budget=budget)
        assert state_equal(f_dense, f_sparse)
        dense = fit_generator(X, y, 1, f_dense, cfg)
        sparse_fit = fit_generator(sparse, y, 1, f_sparse, cfg, memory_budget=budget)
        assert state_equal(dense.generator, sparse_fit.generator)
        assert dense.history == sparse_fit.history


def test_samples_densify_csr_rows_on_the_device():
    X, _ = small_problem((5, 5, 5), n_genes=9)
    X[[0, 7]] = 0.0
    idx = torch.tensor([7, 0, 3, 3, 14])
    for matrix in (X, np.zeros_like(X)):  # also a matrix without a single non-zero
        data = Samples(scipy.sparse.csr_matrix(matrix), torch.device("cpu"), budget=0)
        assert data.kind == "csr"
        assert torch.equal(data.batch(idx), torch.from_numpy(matrix)[idx])
        assert torch.equal(data.rows(np.array([1, 2])), torch.from_numpy(matrix[[1, 2]]))
    dense = Samples(X, torch.device("cpu"))
    assert dense.kind == "dense" and dense.X.data_ptr() == X.ctypes.data  # used in place


@pytest.mark.parametrize("placement", ["dense", "csr", "host"])
@pytest.mark.parametrize("sparse", [False, True], ids=["ndarray", "csr_matrix"])
def test_samples_give_the_same_batches_wherever_they_live(placement, sparse):
    X, y = small_problem((5, 5, 5), n_genes=9)
    data = Samples(
        scipy.sparse.csr_matrix(X) if sparse else X,
        torch.device("cpu"),
        labels=y,
        placement=placement,
    )
    assert data.kind == placement
    assert data.index_device == torch.device("cpu")
    idx = torch.tensor([14, 0, 3, 3])
    assert torch.equal(data.batch(idx), torch.from_numpy(X)[idx])
    assert torch.equal(data.labels(idx), torch.from_numpy(y)[idx])
    assert torch.equal(data.rows(np.array([2, 1])), torch.from_numpy(X[[2, 1]]))


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no native bfloat16")
def test_mixed_precision_on_a_cpu_with_native_bfloat16():
    """bfloat16 autocast trains on such a CPU: finite, float32 weights, the same result for
    the same seed, and not the float32 result (the matrix products really ran in bfloat16)."""
    X, y = small_problem()
    mixed = TrainConfig(precision="bfloat16", target_epochs=3, target_batch_size=8, **SMALL_NETS)
    f = fit_target(X, y, 3, mixed, device="cpu")
    assert all(p.dtype == torch.float32 for p in f.parameters())
    assert state_equal(f, fit_target(X, y, 3, mixed, device="cpu"))
    plain = TrainConfig(target_epochs=3, target_batch_size=8, **SMALL_NETS)
    assert not state_equal(f, fit_target(X, y, 3, plain, device="cpu"))
    bundle = tiny_train(precision="bfloat16", epochs=3, target_epochs=3, **SMALL_NETS)
    assert bundle.config.precision == "bfloat16"
    assert all(np.isfinite(v).all() for v in bundle.manifest["history"].values())
    assert np.isfinite(bundle.metrics["perturbation_accuracy"])


def test_mixed_precision_is_refused_where_it_does_not_pay(monkeypatch):
    """Without a CUDA GPU or a CPU with native bfloat16 (emulated bfloat16 is slower than
    float32), --precision bfloat16 stops before anything trains, with the reason."""
    import tspg.training as training

    monkeypatch.setattr(training, "cpu_has_bfloat16", lambda: False)  # such a CPU
    X, y = small_problem()
    cfg = TrainConfig(precision="bfloat16", target_epochs=1, **SMALL_NETS)
    with pytest.raises(
        ValueError,
        match="--precision bfloat16: mixed precision needs a CUDA GPU or a CPU with native "
        r"bfloat16 matrix products, and this run is on a CPU without native bfloat16 \(no "
        "avx512_bf16 or amx_bf16\\); use --precision float32",
    ):
        fit_target(X, y, 3, cfg, device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU or a CPU with native bfloat16"):
        tiny_train(precision="bfloat16", epochs=1, target_epochs=1, **SMALL_NETS)


def test_fused_adam_is_torch_adam_bit_for_bit_without_importing_dynamo():
    """make_adam's Adam gives exactly torch.optim.Adam(fused=True)'s weights, also when a
    weight has no gradient at a step, and does not import torch._dynamo (1.0-1.4 s)."""
    code = """
import sys, torch
from torch import nn
from tspg.training import FusedAdam, make_adam
torch.manual_seed(0)
a = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
b = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
b.load_state_dict(a.state_dict())
ours = make_adam(a.parameters(), 1e-2)
assert isinstance(ours, FusedAdam), type(ours)
for step in range(6):
    x = torch.randn(4, 7)
    for net in (a, b):
        net[2].requires_grad_(step % 3 != 1)  # some steps leave the last layer without a gradient
    ours.zero_grad()
    a(x).pow(2).sum().backward()
    ours.step()
    if step == 0:
        assert "torch._dynamo" not in sys.modules
        theirs = torch.optim.Adam(b.parameters(), lr=1e-2, fused=True)
    theirs.zero_grad()
    b(x).pow(2).sum().backward()
    theirs.step()
for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
    assert torch.equal(v, w), k
print("ok")
"""
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_compile_falls_back_to_plain_torch_where_it_fails(monkeypatch, caplog):
    """No C++ compiler (a real failure of torch's compiler): a warning, then the same training
    as without compiling."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    X, y = small_problem()
    cfg = TrainConfig(target_epochs=2, target_batch_size=8, **SMALL_NETS)
    with caplog.at_level("WARNING", logger="tspg.training"):
        f = fit_target(X, y, 3, cfg, compile=True)
    assert "torch.compile failed" in caplog.text and "training without it" in caplog.text
    assert state_equal(f, fit_target(X, y, 3, cfg))


def test_default_threads(monkeypatch):
    import tspg.training as training

    monkeypatch.setenv("TSPG_THREADS", "")
    cores = len(os.sched_getaffinity(0))
    assert 1 <= default_threads() <= cores  # the idle cores, at least one
    monkeypatch.setattr(training, "idle_cores", lambda: 0.2)  # a busy machine: one thread
    assert default_threads() == 1
    monkeypatch.setattr(training, "idle_cores", lambda: cores - 0.2)  # every core nearly idle
    assert default_threads() == cores
    idle = idle_cores(0.05)
    assert idle is None or 0 <= idle <= os.cpu_count() + 1e-9
    monkeypatch.setenv("TSPG_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("TSPG_THREADS", "two")
    with pytest.raises(ValueError, match="TSPG_THREADS='two'"):
        default_threads()


@pytest.mark.parametrize(
    "env, spincount",
    [({}, "1000"), ({"GOMP_SPINCOUNT": "50"}, "50"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)],
)
def test_import_bounds_the_openmp_spin(env, spincount):
    """import tspg (before torch) bounds how long OpenMP threads spin, unless the environment
    already chose a spin count or a wait policy; libgomp reads it when torch loads."""
    import subprocess

    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, tspg, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(spincount)


def test_tspg_train_applies_the_thread_default(tmp_path, monkeypatch):
    """tspg-train sets torch's threads to the default (here $TSPG_THREADS), or to --threads,
    and records them in the bundle."""
    from tspg.bundle import load_bundle
    from tspg.cli import train_main

    make_tiny_adata().write_h5ad(tmp_path / "tiny.h5ad")
    before = torch.get_num_threads()
    args = [str(tmp_path / "tiny.h5ad"), "--label-key", "cell_type", "--target", "beta", "-q"]
    args += ["--epochs", "1", "--target-epochs", "1", "--out", str(tmp_path), "--overwrite"]
    args += ["--seeds", "1"]
    try:
        monkeypatch.setenv("TSPG_THREADS", "3")
        assert train_main(args) == 0
        assert torch.get_num_threads() == 3
        assert load_bundle(tmp_path / "tiny-beta").metrics["threads"] == 3
        assert train_main([*args, "--threads", "2"]) == 0
        assert load_bundle(tmp_path / "tiny-beta").metrics["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_same_seed_same_weights_on_the_new_paths():
    """A step budget, balanced sampling and sparse input are as deterministic as epochs."""
    X, y = small_problem((12, 9, 6))
    sparse = scipy.sparse.csr_matrix(X)
    cfg = TrainConfig(
        steps=5,
        target_steps=4,
        batch_size=8,
        target_batch_size=8,
        sampling="balanced",
        **SMALL_NETS,
    )
    runs = []
    for data, budget in ((sparse, 1), (sparse, 1), (X, None)):
        f = fit_target(data, y, 3, cfg, memory_budget=budget)
        runs.append((f, fit_generator(data, y, 1, f, cfg, memory_budget=budget)))
    for f, fit in runs[1:]:
        assert state_equal(f, runs[0][0])
        assert state_equal(fit.generator, runs[0][1].generator)
        assert fit.history == runs[0][1].history


def test_older_bundles_configs_train_as_before():
    """Configs stored before the step budget, sampling and precision existed read as epochs,
    uniform sampling and float32."""
    older = {
        k: v
        for k, v in TrainConfig().to_dict().items()
        if k not in ("steps", "target_steps", "sampling", "precision")
    }
    cfg = TrainConfig.from_dict(older)
    assert (cfg.steps, cfg.target_steps, cfg.sampling, cfg.precision) == (
        0,
        0,
        "uniform",
        "float32",
    )
