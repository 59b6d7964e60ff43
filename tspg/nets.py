"""The three networks of TSPG as plain ``nn.Module``s, sized only by gene and class counts."""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "Discriminator",
    "evaluating",
    "Generator",
    "GeneratorEnsemble",
    "Linear",
    "ResidualBlock",
    "TargetClassifier",
]


# ----------------------------------------------------------------------------- dense layers

# On an x86 CPU, torch multiplies float32 matrices with MKL. For the layers next to the
# genes of a GTEx-sized GEM (4,386 x 512 weights; batches of 32-256), oneDNN's kernels,
# which torch also ships, compute the output and both gradients 1.0-3.1x faster; for the
# demo's 765 x 512 and narrower layers neither library is reliably faster, and MKL stays.
# ``python bench/matmul.py`` prints the measurements behind the threshold.
ONEDNN = os.environ.get("TSPG_ONEDNN", "1") != "0"  # $TSPG_ONEDNN=0: MKL (torch's default) only
ONEDNN_MIN_WEIGHTS = 2**21  # 2,097,152: 4,096 x 512 and up


def _onednn(
    a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none"
) -> torch.Tensor:
    """``act(a @ w.T + bias)`` by oneDNN (``w`` may be a transposed view; ``act`` "none" or
    "tanh", applied in the same pass)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, act, [], "")


@functools.cache
def onednn_works() -> bool:
    """Whether oneDNN's float32 products, plain and with tanh, run here and agree with
    torch's (x86 CPUs with torch's oneDNN build); checked once, on a small product."""
    if (
        platform.machine().lower() not in ("x86_64", "amd64")
        or not torch.backends.mkldnn.is_available()
    ):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a, w, b = (torch.rand(*s, generator=gen) for s in ((5, 24), (16, 24), (16,)))
        want = torch.addmm(b, a, w.t())
        return bool(
            torch.allclose(_onednn(a, w, b), want, atol=1e-5)
            and torch.allclose(_onednn(a, w, b, "tanh"), torch.tanh(want), atol=1e-5)
        )
    except (AttributeError, RuntimeError, NotImplementedError):  # no such op in this build
        return False


def _on_onednn(layer: nn.Linear) -> bool:
    """Whether ``layer`` multiplies on oneDNN on the CPU in float32 (switched on, big enough)."""
    return ONEDNN and layer.weight.numel() >= ONEDNN_MIN_WEIGHTS and onednn_works()


def uses_onednn(module: nn.Module) -> bool:
    """Whether any dense layer of ``module`` runs on oneDNN on the CPU (see :class:`Linear`)."""
    return any(isinstance(m, Linear) and _on_onednn(m) for m in module.modules())


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


class _OneDNNLinear(torch.autograd.Function):
    """act(x @ W.T + b) by oneDNN (act: "none" or "tanh"), and its gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, act):
        out = _onednn(x, weight, bias, act)
        ctx.save_for_backward(x, weight, out if act == "tanh" else None)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        if out is not None:  # tanh's derivative from its output: grad * (1 - out^2)
            grad = torch.ops.aten.tanh_backward(grad, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t())
        if ctx.needs_input_grad[1]:
            grad_w = _onednn(grad.t(), x.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


class Linear(nn.Linear):
    """``nn.Linear`` (same weights, same state dict) that runs on oneDNN on an x86 CPU in
    float32 when it has at least ``ONEDNN_MIN_WEIGHTS`` weights; everywhere else (GPU, mixed
    precision, ``torch.compile``, smaller layers, ``$TSPG_ONEDNN=0``) it is ``nn.Linear``.

    ``tanh=True`` applies tanh to the output: on oneDNN in the same pass as the product
    (a separate ``torch.tanh`` took 2-3% of a GTEx-sized generator epoch).
    """

    def __init__(self, in_features: int, out_features: int, *, tanh: bool = False, **kw):
        super().__init__(in_features, out_features, **kw)
        self.tanh = tanh

    def extra_repr(self) -> str:
        return super().extra_repr() + (", tanh=True" if self.tanh else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() == 2
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and _on_onednn(self)
            and not _autocast_on()
            and not _compiling()
        ):
            return _OneDNNLinear.apply(x, self.weight, self.bias, "tanh" if self.tanh else "none")
        out = super().forward(x)
        return torch.tanh(out) if self.tanh else out


def _dense(n_in: int, n_out: int, act: nn.Module, *, batchnorm: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [Linear(n_in, n_out)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(n_out))
    layers.append(act)
    return layers


class ResidualBlock(nn.Module):
    """Dense-BN-ReLU-Dense-BN plus the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            Linear(width, width),
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
        layers.append(Linear(width, n_genes, tanh=True))
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
        layers += [Linear(width, 1), nn.Sigmoid()]
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
        layers.append(Linear(width, n_classes))
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
