"""The three networks of TSPG as plain ``nn.Module``s, sized only by gene and class counts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "Discriminator",
    "evaluating",
    "Generator",
    "GeneratorEnsemble",
    "ResidualBlock",
    "TargetClassifier",
]


def _dense(n_in: int, n_out: int, act: nn.Module, *, batchnorm: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(n_in, n_out)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(n_out))
    layers.append(act)
    return layers


class ResidualBlock(nn.Module):
    """Dense-BN-ReLU-Dense-BN plus the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.body(h)


class Generator(nn.Module):
    """G(x) in [-1, 1]^n_genes, the raw perturbation (the change it makes is
    P = clip(x + G(x), 0, 1) - x, see :mod:`tspg.perturbation`).

    Dense 512-256-128 (each + BatchNorm + ReLU), residual blocks of width 128,
    Dense 256-512 (+ BN + ReLU), Dense n_genes + tanh.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        encoder: Sequence[int] = (512, 256, 128),
        n_residual: int = 3,
        decoder: Sequence[int] = (256, 512),
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_genes
        for w in encoder:
            layers += _dense(width, w, nn.ReLU())
            width = w
        layers += [ResidualBlock(width) for _ in range(n_residual)]
        for w in decoder:
            layers += _dense(width, w, nn.ReLU())
            width = w
        layers += [nn.Linear(width, n_genes), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, n_genes) -> (batch, n_genes)
        return self.net(x)


class GeneratorEnsemble(nn.Module):
    """Several generators of one target as one: ``forward(x) = mean_i clip(x + G_i(x), 0, 1) - x``.

    x + that lies in [0, 1], so ``clip(x + forward(x), 0, 1) - x`` is the members' mean
    perturbation P: every caller of a bundle's generator gets the ensemble's mean P.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 generators, got {len(members)}")
        self.members = nn.ModuleList(members)

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, n_genes) -> (batch, n_genes)
        total = torch.zeros_like(x)
        for G in self.members:
            total += torch.clamp(x + G(x), 0.0, 1.0)
        return total / len(self.members) - x


class Discriminator(nn.Module):
    """D(x) in (0, 1): Dense 512-256-128 (each + BatchNorm + LeakyReLU 0.2), Dense 1, sigmoid."""

    def __init__(self, n_genes: int, *, hidden: Sequence[int] = (512, 256, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_genes
        for w in hidden:
            layers += _dense(width, w, nn.LeakyReLU(0.2))
            width = w
        layers += [nn.Linear(width, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, n_genes) -> (batch,)
        return self.net(x).squeeze(-1)


class TargetClassifier(nn.Module):
    """f(x): Dense 1024-512-128 with ReLU, then class logits (softmax gives probabilities)."""

    def __init__(self, n_genes: int, n_classes: int, *, hidden: Sequence[int] = (1024, 512, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_genes
        for w in hidden:
            layers += _dense(width, w, nn.ReLU(), batchnorm=False)
            width = w
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor
    ) -> torch.Tensor:  # (batch, n_genes) -> (batch, n_classes) logits
        return self.net(x)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for a block (BatchNorm uses its running statistics and
    leaves them alone), then restore the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """No gradient for ``module``'s own weights inside the block (gradients still flow
    through it to its input); each weight's setting is restored afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
