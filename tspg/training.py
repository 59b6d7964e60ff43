"""Training: the target model f, then the generator G against f and the discriminator D.

The loop is quiet: it reports each chunk of steps (an epoch, or a slice of a step budget)
through ``callback(chunk, n_chunks, losses)``; the CLI passes a tqdm bar, the app passes
``st.progress``. Every random step draws from generators seeded by ``TrainConfig.seed``.

Where the time goes and what is done about it (README, "Where the training time goes"):
the working set lives on the device (a NumPy array on the CPU is used in place; a sparse
matrix is densified a batch at a time where the dense matrix does not fit); batch indices
are drawn on the device; losses are summed on the device and read once per chunk (the only
host synchronisation); Adam is torch's fused kernel where the device has one (called
directly: torch.optim would import torch._dynamo, 1.0-1.4 s); the dense layers next to a
large GEM's genes multiply on oneDNN on an x86 CPU (:class:`tspg.nets.Linear`); the
discriminator's weights take no gradient during the generator's step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import torch
from torch import nn

from .config import TrainConfig
from .errors import UserError
from .nets import Discriminator, Generator, TargetClassifier, evaluating, frozen

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


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (the ``avx512_bf16`` or
    ``amx_bf16`` flag in Linux's ``/proc/cpuinfo``); False where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def check_precision(config: TrainConfig, device: torch.device) -> None:
    """Refuse mixed precision where it does not pay, before anything trains: it needs a CUDA
    GPU or a CPU with native bfloat16 matrix products (emulated ones are slower than float32)."""
    if config.precision == "float32":
        return
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and cpu_has_bfloat16()):
        return
    where = "a CPU without native bfloat16 (no avx512_bf16 or amx_bf16)" if kind == "cpu" else kind
    raise UserError(
        f"--precision {config.precision}: mixed precision needs a CUDA GPU or a CPU with native "
        f"bfloat16 matrix products, and this run is on {where}; use --precision float32"
    )


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast (CUDA, or a CPU with native bfloat16) when ``config.precision`` asks
    for it, else nothing."""
    if config.precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- threads


def idle_cores(interval: float = 0.1) -> float | None:
    """How many cores were idle over the next ``interval`` seconds (Linux ``/proc/stat``);
    None where that cannot be read."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:9]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def default_threads() -> int:
    """CPU threads for torch while training: the cores idle when it starts, at least one.

    Measured on this project's shared 2-core machine (README, "Threads"): on a quiet machine
    2 threads trained the demo 1.1-1.3x faster than 1; where other work already held a core,
    the second thread made it slower. The count is chosen once per run (and stored in the
    bundle), because the result depends, slightly, on it: the same seed gives the same result
    for a given device and thread count. The environment variable ``TSPG_THREADS`` overrides.
    """
    env = os.environ.get("TSPG_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UserError(f"TSPG_THREADS={env!r}: give a whole number of threads, 1 or more")
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    idle = idle_cores()
    if idle is None:
        try:
            idle = cores - os.getloadavg()[0]
        except (AttributeError, OSError):
            idle = cores
    return max(1, min(cores, int(idle + IDLE_ROUNDING)))


IDLE_ROUNDING = 0.25  # a core counts as free when at least 75% of it is idle


def use_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads to ``threads`` (default: :func:`default_threads`); returns it."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise UserError(f"threads = {n}: give 1 or more")
    torch.set_num_threads(n)
    return n


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

    def parts(self) -> tuple[torch.Tensor, ...]:
        """total, gan, adv, norm, td, ed (the order of :data:`LOSS_NAMES`)."""
        return (self.total, self.gan, self.adv, self.norm, self.td, self.ed)

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

        def z(*shape):  # drawn where the generator lives (the device, or the CPU), no sync
            return torch.randn(*shape, generator=self.generator, device=self.generator.device).to(
                dev
            )

        if self.kind == "full":
            r = self.mu + z(m, self.A.shape[0]) @ self.A
        elif self.kind == "diagonal":
            r = self.mu + z(m, self.mu.shape[0]) * self.sd
        else:
            r = self.mu + z(m, self.V.shape[0]) @ self.V + z(m, self.mu.shape[0]) * self.resid_sd
        return r.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- samples on the device


def device_budget(device: torch.device) -> int:
    """Bytes the training data may take on ``device``: half of its free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory()) // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 2 * 2**30


class Samples:
    """Training samples, ready to be drawn in batches on ``device``.

    Where they live (``kind``) is the first of these that fits in ``budget`` bytes
    (default: :func:`device_budget`):

    - ``dense``: one float32 matrix on the device; a dense NumPy array on the CPU is used
      in place (no copy), a sparse one is densified there;
    - ``csr``: a sparse (``scipy.sparse``) matrix kept sparse on the device, each batch
      densified there (no host synchronisation);
    - ``host``: the matrix stays in host memory; each batch is gathered there and copied
      to the device (pinned, asynchronous). Its indices are drawn on the CPU.

    Parameters
    ----------
    X
        Samples x genes, a float32 NumPy array or a ``scipy.sparse`` matrix.
    labels
        Optional class index per sample, for :meth:`labels`.
    placement
        ``dense``, ``csr`` or ``host`` instead of the first that fits.
    """

    def __init__(
        self,
        X,
        device: torch.device,
        *,
        labels: np.ndarray | None = None,
        budget: int | None = None,
        placement: str | None = None,
    ):
        self.device = device = torch.device(device)
        self.n, self.n_genes = X.shape
        sparse = scipy.sparse.issparse(X)
        if sparse:
            X = scipy.sparse.csr_matrix(X, dtype=np.float32)
        else:
            X = np.asarray(X)
            if X.dtype != np.float32 or not X.flags.c_contiguous or not X.flags.writeable:
                X = np.array(X, dtype=np.float32, order="C")
        if placement is None:
            budget = device_budget(device) if budget is None else budget
            dense_bytes = self.n * self.n_genes * 4
            csr_bytes = X.nnz * 12 + (self.n + 1) * 8 if sparse else 0  # float32, int64 indices
            if (not sparse and device.type == "cpu") or dense_bytes + csr_bytes <= budget:
                placement = "dense"  # a sparse matrix is densified on the device, via CSR
            elif sparse and (device.type == "cpu" or csr_bytes <= budget):
                placement = "csr"
            else:
                placement = "host"
        if placement not in ("dense", "csr", "host"):
            raise ValueError(f"unknown placement {placement!r}; use dense, csr or host")
        self.kind = placement
        self.host = None
        if placement == "host":
            self.host = X
        elif placement == "csr" or sparse:
            self._to_device_csr(scipy.sparse.csr_matrix(X))
            if placement == "dense":
                self.X = self._densify_all()
                del self.crow, self.col, self.val
        else:
            self.X = torch.from_numpy(X).to(device)
        self.index_device = torch.device("cpu") if self.kind == "host" else device
        self._labels_np = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._labels = (
            None
            if labels is None or self.kind == "host"
            else torch.from_numpy(self._labels_np).to(device)
        )
        logger.debug("training samples: %d x %d, %s on %s", self.n, self.n_genes, self.kind, device)

    # -- sparse on the device: CSR arrays; a batch is densified by one gather and one scatter
    def _to_device_csr(self, X: scipy.sparse.csr_matrix) -> None:
        dev = self.device
        self.crow = torch.from_numpy(X.indptr.astype(np.int64)).to(dev)
        self.col = torch.from_numpy(X.indices.astype(np.int64)).to(dev)
        self.val = torch.from_numpy(X.data).to(dev)
        self.max_row_nnz = int(np.diff(X.indptr).max()) if self.n else 0

    def _densify(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the CSR matrix as a dense (len(idx), n_genes) tensor, on the device."""
        out = torch.zeros(len(idx), self.n_genes + 1, device=self.device)
        if self.max_row_nnz:
            start = self.crow[idx]  # (b,)
            length = self.crow[idx + 1] - start
            k = torch.arange(self.max_row_nnz, device=self.device)
            inside = k < length[:, None]  # (b, max_row_nnz)
            pos = torch.where(inside, start[:, None] + k, 0)
            cols = torch.where(inside, self.col[pos], self.n_genes)  # padding: a spare column
            vals = torch.where(inside, self.val[pos], 0.0)
            out.scatter_(1, cols, vals)
        return out[:, : self.n_genes].contiguous()

    def _densify_blocks(self, idx: torch.Tensor, block: int = 4096) -> torch.Tensor:
        """Many rows densified a block at a time (bounded temporaries)."""
        if not len(idx):
            return torch.zeros(0, self.n_genes, device=self.device)
        return torch.cat([self._densify(part) for part in idx.split(block)])

    def _densify_all(self) -> torch.Tensor:
        return self._densify_blocks(torch.arange(self.n, device=self.device))

    def _from_host(self, rows: np.ndarray) -> torch.Tensor:
        """Rows of the host matrix, dense, copied to the device without waiting for it."""
        batch = self.host[rows]
        if scipy.sparse.issparse(batch):
            batch = batch.toarray()
        t = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """The samples ``idx`` (on :attr:`index_device`), dense (len(idx), n_genes), on the device."""
        if self.kind == "dense":
            return self.X.index_select(0, idx)
        if self.kind == "csr":
            return self._densify(idx)
        return self._from_host(idx.numpy())

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        """The class index of the samples ``idx``, on the device."""
        if self._labels is not None:
            return self._labels.index_select(0, idx)
        return torch.from_numpy(self._labels_np[idx.numpy()]).to(self.device, non_blocking=True)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """The samples ``rows`` (a NumPy index), dense, on the device (for the target class)."""
        if self.kind == "host":
            return self._from_host(rows)
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
        return self.X.index_select(0, idx) if self.kind == "dense" else self._densify_blocks(idx)


# ----------------------------------------------------------------------------- batches


MAX_CHUNK_STEPS = 1000  # with a step budget, progress and the loss history at least this often


class Batches:
    """An endless stream of batches of sample indices, drawn with ``generator`` on its device.

    ``uniform``: passes over ``pool`` in a fresh random order each, in batches of
    ``batch_size`` (a last batch of one sample is left out: BatchNorm needs two).
    ``balanced``: each sample of a batch comes from a class drawn uniformly, then a sample of
    that class drawn uniformly (with replacement), so every class is seen equally often.

    ``per_pass`` is the number of batches in one pass over ``pool`` (an epoch).
    """

    def __init__(
        self,
        pool: np.ndarray,
        batch_size: int,
        generator: torch.Generator,
        *,
        sampling: str = "uniform",
        labels: np.ndarray | None = None,
    ):
        self.batch_size, self.generator, self.sampling = batch_size, generator, sampling
        self.device = generator.device
        n = len(pool)
        self.per_pass = n // batch_size + (n % batch_size >= 2)
        self.pool = torch.from_numpy(np.asarray(pool, dtype=np.int64)).to(self.device)
        self._queue: list[torch.Tensor] = []
        if sampling == "balanced":
            _, cls = np.unique(np.asarray(labels)[pool], return_inverse=True)
            counts = np.bincount(cls)
            self.members = self.pool[
                torch.from_numpy(np.argsort(cls, kind="stable")).to(self.device)
            ]
            self.starts = torch.from_numpy(np.cumsum(counts) - counts).to(self.device)
            self.counts = torch.from_numpy(counts).to(self.device)
        elif sampling != "uniform":
            raise UserError(f"unknown sampling {sampling!r}; use uniform or balanced")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        g, dev, b = self.generator, self.device, self.batch_size
        if self.sampling == "balanced":
            c = torch.randint(len(self.counts), (b,), generator=g, device=dev)
            u = torch.rand(b, generator=g, device=dev)
            count = self.counts[c]
            within = torch.minimum((u * count).long(), count - 1)
            return self.members[self.starts[c] + within]
        if not self._queue:
            order = self.pool[torch.randperm(len(self.pool), generator=g, device=dev)]
            self._queue = [idx for idx in order.split(b) if len(idx) >= 2][::-1]
        return self._queue.pop()


def plan_chunks(per_pass: int, *, epochs: int, steps: int = 0) -> list[int]:
    """Steps in each chunk of training (one progress report and loss-history point each).

    Without a step budget (``steps`` 0), one chunk per epoch of ``per_pass`` steps; with one,
    ``steps`` in chunks of one pass, at most :data:`MAX_CHUNK_STEPS` (the last may be shorter).
    """
    if not steps:
        return [per_pass] * epochs
    size = max(1, min(per_pass, MAX_CHUNK_STEPS))
    return [size] * (steps // size) + ([steps % size] if steps % size else [])


def _chunk_name(chunks: list[int], i: int, by_steps: bool) -> str:
    if not by_steps:
        return f"epoch {i + 1}"
    first = sum(chunks[:i]) + 1
    return f"steps {first}-{first + chunks[i] - 1}"


def _check_finite(losses: dict[str, float], stage: str, where: str) -> None:
    """Stop with a clear message when a loss is NaN or infinite (checked once per chunk)."""
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise UserError(
            f"training the {stage} diverged in {where}: loss {bad[0]} is {losses[bad[0]]}; "
            "lower the learning rates or the loss weights, and check the data for extreme values"
        )


def _accumulator(n: int, device: torch.device) -> torch.Tensor:
    """Loss sums on the device: float64 (the sums are then those of Python floats), float32
    where the device has no float64 (MPS)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.zeros(n, dtype=dtype, device=device)


def seed_everything(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Seed torch (all devices) and NumPy; returns a generator on ``device`` seeded with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return _generator(seed, device)


def _generator(seed: int, device: torch.device | str) -> torch.Generator:
    device = torch.device(device)
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # a device without its own generator: draw on the CPU
        return torch.Generator().manual_seed(seed)


class FusedAdam:
    """Adam as ``torch.optim.Adam(params, lr, fused=True)`` computes it, bit for bit: torch's
    fused kernel, one call per step. Without torch.optim's wrapper, because its first use in a
    process imports torch._dynamo, 1.0-1.4 s (a third of the demo's target model)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = [
            torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params
        ]
        self.exp_avg_sq = [
            torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params
        ]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        steps = [self.steps[i] for i in live]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            [self.params[i] for i in live],
            [self.params[i].grad for i in live],
            [self.exp_avg[i] for i in live],
            [self.exp_avg_sq[i] for i in live],
            [],
            steps,
            amsgrad=False,
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=0.0,
            eps=self.eps,
            maximize=False,
        )

    @staticmethod
    @functools.cache
    def works(device: torch.device) -> bool:
        """Whether torch has its fused Adam kernel for ``device`` (CUDA; the CPU from torch 2.4)."""
        try:
            p = torch.zeros(2, device=device, requires_grad=True)
            p.grad = torch.ones(2, device=device)
            FusedAdam([p], lr=1e-3).step()
            return True
        except (AttributeError, RuntimeError, NotImplementedError):
            return False


def make_adam(params, lr: float) -> FusedAdam | torch.optim.Adam:
    """Adam with torch's fused kernel where the parameters' device has one (:class:`FusedAdam`),
    else torch.optim's ``foreach`` Adam."""
    params = list(params)
    if params and FusedAdam.works(params[0].device):
        return FusedAdam(params, lr)
    return torch.optim.Adam(params, lr=lr, foreach=True)


def compiled(module: nn.Module, enabled: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` through ``torch.compile`` when ``enabled``; where compiling fails (no C++
    compiler, an unsupported device or Python), a warning and the plain module."""
    if not enabled:
        return module
    try:
        fast = torch.compile(module)
    except Exception as err:  # noqa: BLE001 - torch.compile unsupported here: run without it
        logger.warning("torch.compile is unavailable (%s); training without it", _first_line(err))
        return module
    state = {"fn": fast, "compiled_once": False}

    def call(x: torch.Tensor) -> torch.Tensor:
        if state["fn"] is module or state["compiled_once"]:
            return state["fn"](x)
        try:
            out = fast(x)
        except Exception as err:  # noqa: BLE001 - compiling failed before anything ran
            logger.warning("torch.compile failed (%s); training without it", _first_line(err))
            state["fn"] = module
            return module(x)
        state["compiled_once"] = True
        return out

    return call


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# ----------------------------------------------------------------------------- loops


def fit_target(
    X,
    y: np.ndarray,
    n_classes: int,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
    compile: bool = False,
    memory_budget: int | None = None,
) -> TargetClassifier:
    """Train the target model f on scaled training data; returns it in eval mode.

    Parameters
    ----------
    X
        Samples x genes, scaled to [0, 1]: a float32 NumPy array or a ``scipy.sparse`` matrix.
    y
        Class index per sample.
    config
        ``target_epochs`` (or ``target_steps``), ``target_batch_size``, ``target_lr``,
        ``target_hidden``, ``seed``, ``precision``.
    callback
        Called after each chunk (epoch, or slice of the step budget) as
        ``callback(chunk, n_chunks, {"target_loss": mean loss})``.
    compile
        Run the network through ``torch.compile`` (falls back to plain torch where it fails).
    memory_budget
        Bytes the data may take on the device (default: :func:`device_budget`).
    """
    device = torch.device(device)
    check_precision(config, device)
    gen = seed_everything(config.seed, device)
    f = TargetClassifier(X.shape[1], n_classes, hidden=config.target_hidden).to(device)
    opt = make_adam(f.parameters(), config.target_lr)
    data = Samples(X, device, labels=y, budget=memory_budget)
    if data.n < 2:
        raise UserError(f"the target model has {data.n} training samples; at least 2 are needed")
    index_gen = gen if data.index_device == gen.device else _generator(config.seed, "cpu")
    batches = Batches(np.arange(data.n), config.target_batch_size, index_gen)
    chunks = plan_chunks(batches.per_pass, epochs=config.target_epochs, steps=config.target_steps)
    forward = compiled(f, compile)
    loss_fn = nn.CrossEntropyLoss()
    f.train()
    for i, n_steps in enumerate(chunks):
        total, count = _accumulator(1, device), 0
        for _ in range(n_steps):
            idx = next(batches)
            with _autocast(config, device):
                loss = loss_fn(forward(data.batch(idx)), data.labels(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach().to(total.dtype) * len(idx)
            count += len(idx)
        total = total.item()  # the chunk's one host synchronisation
        _check_finite(
            {"target_loss": total},
            "target model",
            _chunk_name(chunks, i, bool(config.target_steps)),
        )
        if callback:
            callback(i + 1, len(chunks), {"target_loss": total / count})
    return f.eval()


@dataclass
class GeneratorFit:
    """A trained generator and discriminator with their loss history (one point per chunk:
    an epoch, or ``steps_per_point`` steps of a step budget)."""

    generator: Generator
    discriminator: Discriminator
    history: dict[str, list[float]] = field(default_factory=dict)
    covariance: str = ""
    seconds: float = 0.0
    steps: int = 0
    steps_per_point: int = 0


LOSS_NAMES = ("total", "gan", "adv", "norm", "td", "ed", "d_loss")


def fit_generator(
    X,
    y: np.ndarray,
    target: int,
    target_model: TargetClassifier,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
    compile: bool = False,
    memory_budget: int | None = None,
) -> GeneratorFit:
    """Train G (and D) to move scaled training samples ``X`` into class ``target`` of ``f``.

    Each step first updates D on real samples and x_adv (G in inference mode), then G,
    as the paper states. ``X`` is a float32 NumPy array or a ``scipy.sparse`` matrix;
    ``callback``, ``compile`` and ``memory_budget`` as in :func:`fit_target`. Losses are
    summed on the device and read once per chunk, where a NaN or infinite loss stops the run.
    """
    device = torch.device(device)
    check_precision(config, device)
    gen = seed_everything(config.seed + 1, device)
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
    opt_g = make_adam(G.parameters(), config.g_lr)
    opt_d = make_adam(D.parameters(), config.d_lr)

    y = np.asarray(y)
    data = Samples(X, device, budget=memory_budget)
    is_target = y == target
    X_t = data.rows(np.flatnonzero(is_target))  # (n_t, n_genes), dense on the device
    if len(X_t) < 2:
        raise UserError(f"the target class has {len(X_t)} training samples; at least 2 are needed")
    pool = np.flatnonzero(~is_target) if config.train_on == "non-target" else np.arange(len(y))
    if len(pool) < 2:
        raise UserError(
            f"the generator has {len(pool)} source samples to learn from; at least 2 are needed"
        )
    sampler = None
    if config.w_td:
        sampler = TargetSampler(
            X_t, covariance=config.covariance, rank=config.cov_rank, generator=gen
        )
        logger.info("L_td draws from the %s", sampler.describe())
    index_gen = gen if data.index_device == gen.device else _generator(config.seed + 1, "cpu")
    batches = Batches(pool, config.batch_size, index_gen, sampling=config.sampling, labels=y)
    chunks = plan_chunks(batches.per_pass, epochs=config.epochs, steps=config.steps)
    G_fwd, D_fwd, f_fwd = compiled(G, compile), compiled(D, compile), compiled(f, compile)
    amp = functools.partial(_autocast, config, device)  # a fresh context each use

    history: dict[str, list[float]] = {}
    start = time.perf_counter()
    for i, n_steps in enumerate(chunks):
        sums = _accumulator(len(LOSS_NAMES), device)
        for _ in range(n_steps):
            x = data.batch(next(batches))  # (batch, n_genes)
            m = len(x)
            real = (
                x
                if config.disc_real == "all"
                else X_t[torch.randint(len(X_t), (m,), generator=gen, device=gen.device).to(device)]
            )

            # 1. discriminator: real -> 1, x_adv (from G in inference mode) -> 0, one batch
            with amp():
                with evaluating(G), torch.inference_mode():
                    x_fake = (x + G_fwd(x)).clamp(0.0, 1.0)
                d_out = D_fwd(torch.cat([real, x_fake]))  # (2 * batch,)
                d_loss = lsgan_discriminator_loss(d_out[:m], d_out[m:])
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()

            # 2. generator, against D in inference mode (D's weights take no gradient)
            with amp():
                g = G_fwd(x)
                x_adv = (x + g).clamp(0.0, 1.0)
                with evaluating(D), frozen(D):
                    loss = generator_loss(
                        x_adv,
                        g,
                        f_fwd,
                        D_fwd,
                        target,
                        config,
                        sampler=sampler,
                        X_t=X_t,
                        generator=gen,
                    )
            opt_g.zero_grad()
            loss.total.backward()
            opt_g.step()
            sums += torch.stack([*loss.parts(), d_loss]).detach().to(sums.dtype)

        values = (sums / n_steps).tolist()  # the chunk's one host synchronisation
        chunk_losses = dict(zip(LOSS_NAMES, values, strict=True))
        _check_finite(chunk_losses, "generator", _chunk_name(chunks, i, bool(config.steps)))
        for k, v in chunk_losses.items():
            history.setdefault(k, []).append(v)
        if callback:
            callback(i + 1, len(chunks), chunk_losses)
    G.eval()
    D.eval()
    return GeneratorFit(
        G,
        D,
        history,
        sampler.kind if sampler else "none (L_td off)",
        time.perf_counter() - start,
        steps=sum(chunks),
        steps_per_point=chunks[0],
    )


def generator_loss(
    x_adv: torch.Tensor,
    g: torch.Tensor,
    f: Callable[[torch.Tensor], torch.Tensor],
    D: Callable[[torch.Tensor], torch.Tensor],
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
    # the draws and the distances in float32 also under mixed precision (a distance from
    # |a|^2 - 2ab + |b|^2 in bfloat16 would lose most of its digits)
    full_precision = torch.autocast(x_adv.device.type, enabled=False)
    if config.w_td:
        with full_precision:
            td = td_loss(x_adv.float(), sampler.sample(m))
    else:
        td = zero
    if config.w_ed:
        # real target samples: all of them when they fit in a batch, else a random batch
        ref = (
            X_t
            if len(X_t) <= m
            else X_t[
                torch.randperm(len(X_t), generator=generator, device=generator.device)[:m].to(
                    X_t.device
                )
            ]
        )
        with full_precision:
            ed = energy_distance(x_adv.float(), ref, repulsion=config.ed_repulsion)
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
