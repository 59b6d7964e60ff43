"""Training: the target model f, then the generator G against f and the discriminator D.

The loop is quiet: it reports each epoch through ``callback(epoch, n_epochs, losses)``;
the CLI passes a tqdm bar, the app passes ``st.progress``. Every random step draws from
generators seeded by ``TrainConfig.seed``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .errors import UserError
from .nets import Discriminator, Generator, TargetClassifier, evaluating

__all__ = [
    "FULL_COVARIANCE_BYTES",
    "cw_loss",
    "energy_distance",
    "fit_generator",
    "fit_target",
    "generator_loss",
    "GeneratorFit",
    "GeneratorLoss",
    "lsgan_discriminator_loss",
    "lsgan_generator_loss",
    "norm_loss",
    "pairwise_distances",
    "resolve_device",
    "seed_everything",
    "TargetSampler",
    "td_loss",
]

logger = logging.getLogger(__name__)

Callback = Callable[[int, int, dict[str, float]], None]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available on this machine")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("--device mps: Apple MPS is not available on this machine")
    if device not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    return torch.device(device)


# ----------------------------------------------------------------------------- losses


@dataclass
class GeneratorLoss:
    """The generator's loss and its named parts (each already weighted in ``total``)."""

    total: torch.Tensor
    gan: torch.Tensor
    adv: torch.Tensor
    norm: torch.Tensor
    td: torch.Tensor
    ed: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def lsgan_generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN: push D(x_adv) to 1."""
    return ((d_fake - 1.0) ** 2).mean()


def lsgan_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN for D: real -> 1, fake -> 0."""
    return ((d_real - 1.0) ** 2).mean() + (d_fake**2).mean()


def cw_loss(
    out: torch.Tensor, target: int, *, kappa: float = 0.0, reduce: str = "mean"
) -> torch.Tensor:
    """Carlini-Wagner margin: max(max_{i != t} out_i - out_t, -kappa), per sample, reduced.

    ``out`` is (batch, n_classes): logits, or softmax probabilities for the paper's recipe.
    """
    other = out.clone()
    other[:, target] = -math.inf
    margin = torch.clamp(other.max(dim=1).values - out[:, target], min=-kappa)
    return margin.sum() if reduce == "sum" else margin.mean()


def norm_loss(g: torch.Tensor, *, form: str = "sample") -> torch.Tensor:
    """L_norm of the generator's output g = G(x) (before clipping, as the reference computes it):
    ``sample``: mean over samples of ||g_i||_2; ``batch`` (paper): ||g||_2 of the batch + 1."""
    if form == "batch":
        return torch.linalg.vector_norm(g) + 1.0
    return torch.linalg.vector_norm(g, dim=1).mean()


def td_loss(x_adv: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between x_adv and a draw r_t of the target distribution."""
    return (x_adv - r).abs().mean()


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Euclidean distances (m, k) with a gradient that stays finite at zero distance."""
    sq = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)
    return torch.sqrt(sq.clamp_min(0.0) + eps)


def energy_distance(a: torch.Tensor, b: torch.Tensor, *, repulsion: float = 1.0) -> torch.Tensor:
    """E-distance 2 E d(A,B) - E d(A,A') - E d(B,B') (V-statistic), Euclidean.

    ``repulsion`` < 1 weakens the E d(A,A') term, so A settles nearer B's dense core than
    B's own spread (1 is the proper E-distance).
    """
    return (
        2 * pairwise_distances(a, b).mean()
        - repulsion * pairwise_distances(a, a).mean()
        - pairwise_distances(b, b).mean()
    )


# ----------------------------------------------------------------------------- target draws


FULL_COVARIANCE_BYTES = 256 * 2**20  # covariance="auto" keeps the exact draw while A fits in this


class TargetSampler:
    """Draws r_t ~ N(mu_t, Sigma_t), clipped to [0, 1], for L_td.

    ``full`` uses the exact empirical covariance without forming it: r = mu + A^T z with
    A = (X_t - mu) / sqrt(n_t - 1) and z ~ N(0, I_{n_t}); memory O(n_t * n_genes). ``lowrank``
    keeps the top ``rank`` directions of A plus each gene's remaining variance, for very large
    target classes. ``diagonal`` keeps per-gene variances only. ``auto`` takes ``full`` while
    A fits in 256 MB, ``lowrank`` beyond.
    """

    def __init__(
        self,
        X_t: torch.Tensor,
        *,
        covariance: str = "auto",
        rank: int = 64,
        generator: torch.Generator,
    ):
        n_t, n = X_t.shape
        self.mu = X_t.mean(0)
        A = (X_t - self.mu) / math.sqrt(max(n_t - 1, 1))
        if covariance == "auto":
            covariance = "full" if n_t * n * 4 <= FULL_COVARIANCE_BYTES else "lowrank"
        self.kind = covariance
        self.generator = generator
        self.A = self.V = self.resid_sd = self.sd = None
        if covariance == "full":
            self.A = A  # (n_t, n)
        elif covariance == "diagonal":
            self.sd = A.pow(2).sum(0).sqrt()  # (n,)
        elif covariance == "lowrank":
            k = min(rank, n_t, n)
            if n_t * n <= 4e7:
                _, S, Vh = torch.linalg.svd(A, full_matrices=False)
                S, Vt = S[:k], Vh[:k]
            else:
                _, S, V = torch.svd_lowrank(A, q=k)
                Vt = V.T
            self.V = S[:, None] * Vt  # (k, n)
            var = A.pow(2).sum(0) - self.V.pow(2).sum(0)
            self.resid_sd = var.clamp_min(0).sqrt()
        else:
            raise UserError(
                f"unknown covariance {covariance!r}; use auto, full, diagonal or lowrank"
            )

    def describe(self) -> str:
        return {
            "full": "full empirical covariance (exact, never formed as n x n)",
            "diagonal": "diagonal covariance",
            "lowrank": "low-rank covariance plus per-gene residual variance (memory-safe)",
        }[self.kind]

    def sample(self, m: int) -> torch.Tensor:
        dev = self.mu.device

        def z(*shape):
            return torch.randn(*shape, generator=self.generator).to(dev)

        if self.kind == "full":
            r = self.mu + z(m, self.A.shape[0]) @ self.A
        elif self.kind == "diagonal":
            r = self.mu + z(m, self.mu.shape[0]) * self.sd
        else:
            r = self.mu + z(m, self.V.shape[0]) @ self.V + z(m, self.mu.shape[0]) * self.resid_sd
        return r.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- loops


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        if len(idx) >= 2:  # BatchNorm needs two samples in training mode
            yield idx


def _check_finite(losses: dict[str, float], stage: str, epoch: int) -> None:
    """Stop with a clear message as soon as a loss is NaN or infinite."""
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise UserError(
            f"training the {stage} diverged in epoch {epoch + 1}: loss {bad[0]} is {losses[bad[0]]}; "
            "lower the learning rates or the loss weights, and check the data for extreme values"
        )


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def fit_target(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
) -> TargetClassifier:
    """Train the target model f on scaled training data; returns it in eval mode."""
    device = torch.device(device)
    gen = seed_everything(config.seed)
    f = TargetClassifier(X.shape[1], n_classes, hidden=config.target_hidden).to(device)
    opt = torch.optim.Adam(f.parameters(), lr=config.target_lr)
    Xt, yt = torch.from_numpy(X).to(device), torch.from_numpy(y.astype(np.int64)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(config.target_epochs):
        f.train()
        total, count = 0.0, 0
        for idx in _batches(len(Xt), config.target_batch_size, gen):
            idx = idx.to(device)
            loss = loss_fn(f(Xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        _check_finite({"target_loss": total}, "target model", epoch)
        if callback:
            callback(epoch + 1, config.target_epochs, {"target_loss": total / max(count, 1)})
    return f.eval()


@dataclass
class GeneratorFit:
    generator: Generator
    discriminator: Discriminator
    history: dict[str, list[float]] = field(default_factory=dict)
    covariance: str = ""
    seconds: float = 0.0


def fit_generator(
    X: np.ndarray,
    y: np.ndarray,
    target: int,
    target_model: TargetClassifier,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
) -> GeneratorFit:
    """Train G (and D) to move scaled training samples ``X`` into class ``target`` of ``f``.

    Each step first updates D on real samples and x_adv (G in inference mode), then G,
    as the paper states.
    """
    device = torch.device(device)
    gen = seed_everything(config.seed + 1)
    n_genes = X.shape[1]
    G = Generator(
        n_genes,
        encoder=config.gen_encoder,
        n_residual=config.gen_residual,
        decoder=config.gen_decoder,
    ).to(device)
    D = Discriminator(n_genes, hidden=config.disc_hidden).to(device)
    f = target_model.to(device).eval()
    for p in f.parameters():
        p.requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=config.g_lr)
    opt_d = torch.optim.Adam(D.parameters(), lr=config.d_lr)

    Xall = torch.from_numpy(X).to(device)
    is_target = torch.from_numpy(y == target).to(device)
    X_t = Xall[is_target]
    if len(X_t) < 2:
        raise UserError(f"the target class has {len(X_t)} training samples; at least 2 are needed")
    X_src = Xall[~is_target] if config.train_on == "non-target" else Xall
    sampler = None
    if config.w_td:
        sampler = TargetSampler(
            X_t, covariance=config.covariance, rank=config.cov_rank, generator=gen
        )
        logger.info("L_td draws from the %s", sampler.describe())

    history: dict[str, list[float]] = {}
    start = time.perf_counter()
    for epoch in range(config.epochs):
        sums: dict[str, float] = {}
        n_steps = 0
        for idx in _batches(len(X_src), config.batch_size, gen):
            x = X_src[idx.to(device)]  # (batch, n_genes)
            m = len(x)
            real = (
                x
                if config.disc_real == "all"
                else X_t[torch.randint(len(X_t), (m,), generator=gen).to(device)]
            )

            # 1. discriminator: real -> 1, x_adv (from G in inference mode) -> 0, one batch
            G.eval()
            with torch.no_grad():
                x_fake = (x + G(x)).clamp(0.0, 1.0)
            G.train()
            d_out = D(torch.cat([real, x_fake]))  # (2 * batch,)
            d_loss = lsgan_discriminator_loss(d_out[:m], d_out[m:])
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()

            # 2. generator, against D in inference mode
            g = G(x)
            x_adv = (x + g).clamp(0.0, 1.0)
            with evaluating(D):
                loss = generator_loss(
                    x_adv, g, f, D, target, config, sampler=sampler, X_t=X_t, generator=gen
                )
            opt_g.zero_grad()
            loss.total.backward()
            opt_g.step()

            for k, v in {**loss.floats(), "d_loss": d_loss.item()}.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
        epoch_losses = {k: v / max(n_steps, 1) for k, v in sums.items()}
        _check_finite(epoch_losses, "generator", epoch)
        for k, v in epoch_losses.items():
            history.setdefault(k, []).append(v)
        if callback:
            callback(epoch + 1, config.epochs, epoch_losses)
    G.eval()
    D.eval()
    return GeneratorFit(
        G, D, history, sampler.kind if sampler else "none (L_td off)", time.perf_counter() - start
    )


def generator_loss(
    x_adv: torch.Tensor,
    g: torch.Tensor,
    f: nn.Module,
    D: nn.Module,
    target: int,
    config: TrainConfig,
    *,
    sampler: TargetSampler | None,
    X_t: torch.Tensor,
    generator: torch.Generator,
) -> GeneratorLoss:
    """L = w_gan L_gan + w_adv L_adv + w_norm L_norm + w_td L_td + w_ed L_ed (terms with weight 0 are skipped).

    ``x_adv`` = clip(x + g, 0, 1) and ``g`` = G(x), the generator's raw output (L_norm's input).
    """
    zero = x_adv.new_zeros(())
    m = len(x_adv)
    gan = lsgan_generator_loss(D(x_adv)) if config.w_gan else zero
    out = f(x_adv)
    if config.adv_space == "probs":
        out = torch.softmax(out, dim=1)
    adv = (
        cw_loss(out, target, kappa=config.kappa, reduce=config.adv_reduce) if config.w_adv else zero
    )
    norm = norm_loss(g, form=config.norm_form) if config.w_norm else zero
    td = td_loss(x_adv, sampler.sample(m)) if config.w_td else zero
    if config.w_ed:
        # real target samples: all of them when they fit in a batch, else a random batch
        ref = (
            X_t
            if len(X_t) <= m
            else X_t[torch.randperm(len(X_t), generator=generator)[:m].to(X_t.device)]
        )
        ed = energy_distance(x_adv, ref, repulsion=config.ed_repulsion)
    else:
        ed = zero
    total = (
        config.w_gan * gan
        + config.w_adv * adv
        + config.w_norm * norm
        + config.w_td * td
        + config.w_ed * ed
    )
    return GeneratorLoss(total, gan, adv, norm, td, ed)
