"""The training configuration: every hyper-parameter of a run, its help, range and default.

``TrainConfig`` is a frozen dataclass; each field carries its own help text, allowed words
or numeric range in its metadata, so the command line (``tspg-train --help``), the
dashboard's "equivalent command" and the validation all read one source. Importing this
module does not import torch (the command line's ``--help`` stays fast).
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import UserError

__all__ = [
    "CHOICES",
    "PAPER",
    "RECIPES",
    "TrainConfig",
    "config_argv",
    "config_fields",
    "config_options",
    "config_problem",
    "field_default",
    "field_kind",
    "format_option",
    "number_problem",
    "option_name",
    "parse_option",
]

RECIPES = ("tspg+", "paper")
MAX_EPOCHS = 100_000
MAX_STEPS = 10**9
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds; larger values overflow
MAX_GENERATORS = 64  # generators of a seed ensemble (TrainConfig.seeds)
MAX_BATCH = 2**20
MIN_BATCH = 2  # BatchNorm needs two samples a batch: the loops skip smaller ones (none would run)
# loss weights and the margin: no sensible setting is larger (1e38 overflows float32)
MAX_WEIGHT = 1e6
MAX_WIDTH = 2**16


def _opt(default, help: str, *, choices=None, low=None, high=None, low_open=False, high_open=False):
    """A TrainConfig field: default, help text, and its allowed words or numeric range."""
    meta = {
        "help": help,
        "choices": choices,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a run; saved in the bundle so the run can be rebuilt.

    Defaults are the ``tspg+`` recipe; ``TrainConfig.for_recipe("paper")`` gives the
    paper's (Targonski et al. 2019) exactly. See the README for why they differ. Each
    field's help, allowed words and range are in its metadata (:func:`config_fields`).
    """

    recipe: str = _opt("tspg+", "loss recipe; the other options override it", choices=RECIPES)
    seed: int = _opt(0, "seed of initialisation, batches and draws", low=0, high=MAX_SEED)
    seeds: int = _opt(
        3,
        "generators in the ensemble, each with its own seed, all against one target model; "
        "their mean perturbation is reported (1: one generator, as the paper)",
        low=1,
        high=MAX_GENERATORS,
    )
    split_seed: int = _opt(
        0,
        "seed of the stratified train/held-out split (apart, so seeds compare on one split)",
        low=0,
        high=MAX_SEED,
    )
    test_size: float = _opt(
        0.2,
        "share of each class held out from every model",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    # target model f
    target_epochs: int = _opt(30, "epochs of the target model", low=1, high=MAX_EPOCHS)
    target_lr: float = _opt(1e-3, "Adam learning rate of the target model", low=0, low_open=True)
    target_batch_size: int = _opt(
        128, "batch size of the target model", low=MIN_BATCH, high=MAX_BATCH
    )
    target_hidden: tuple[int, ...] = _opt(
        (1024, 512, 128),
        "widths of the target model's hidden layers (the paper's; the reference code's are 512,256,128)",
        low=1,
        high=MAX_WIDTH,
    )
    target_steps: int = _opt(
        0,
        "train the target model for this many steps instead of target_epochs (0: use epochs)",
        low=0,
        high=MAX_STEPS,
    )
    # generator G and discriminator D
    epochs: int = _opt(60, "epochs of the generator and discriminator", low=1, high=MAX_EPOCHS)
    steps: int = _opt(
        0,
        "train the generator and discriminator for this many steps instead of epochs "
        "(0: use epochs); progress and loss history every pass over the data, at most every 1000 steps",
        low=0,
        high=MAX_STEPS,
    )
    sampling: Literal["uniform", "balanced"] = _opt(
        "uniform",
        "source samples of each batch: uniform (passes over the data in random order) or "
        "balanced (every class equally often, drawn with replacement)",
        choices=("uniform", "balanced"),
    )
    batch_size: int = _opt(
        128, "batch size of the generator and discriminator", low=MIN_BATCH, high=MAX_BATCH
    )
    g_lr: float = _opt(2e-4, "Adam learning rate of the generator", low=0, low_open=True)
    d_lr: float = _opt(1e-4, "Adam learning rate of the discriminator", low=0, low_open=True)
    gen_encoder: tuple[int, ...] = _opt(
        (512, 256, 128), "widths of the generator's encoder layers", low=1, high=MAX_WIDTH
    )
    gen_residual: int = _opt(
        3, "residual blocks of the generator (at the encoder's last width)", low=0, high=64
    )
    gen_decoder: tuple[int, ...] = _opt(
        (256, 512), "widths of the generator's decoder layers", low=1, high=MAX_WIDTH
    )
    disc_hidden: tuple[int, ...] = _opt(
        (512, 256, 128), "widths of the discriminator's hidden layers", low=1, high=MAX_WIDTH
    )
    # generator loss L = w_gan L_gan + w_adv L_adv + w_norm L_norm + w_td L_td + w_ed L_ed
    w_gan: float = _opt(1.0, "weight of the least-squares GAN loss", low=0, high=MAX_WEIGHT)
    w_adv: float = _opt(3.0, "weight of the Carlini-Wagner loss", low=0, high=MAX_WEIGHT)
    w_norm: float = _opt(
        0.0, "weight of the L2 norm of the generator's output G(x)", low=0, high=MAX_WEIGHT
    )
    w_td: float = _opt(
        0.0,
        "weight of the L1 distance to a draw of the target distribution",
        low=0,
        high=MAX_WEIGHT,
    )
    w_ed: float = _opt(
        30.0,
        "weight of the energy distance between x_adv and real target samples",
        low=0,
        high=MAX_WEIGHT,
    )
    ed_repulsion: float = _opt(
        0.8,
        "weight of the x_adv-to-x_adv term inside the energy distance (<1 draws x_adv to the target's core)",
        low=0,
        high=1,
    )
    kappa: float = _opt(2.0, "Carlini-Wagner confidence margin", low=0, high=MAX_WEIGHT)
    adv_space: Literal["logits", "probs"] = _opt(
        "logits",
        "take the Carlini-Wagner margin on logits or softmax probabilities",
        choices=("logits", "probs"),
    )
    adv_reduce: Literal["mean", "sum"] = _opt(
        "mean", "average or sum the Carlini-Wagner loss over the batch", choices=("mean", "sum")
    )
    norm_form: Literal["sample", "batch"] = _opt(
        "sample",
        "sample: mean ||G(x_i)||_2; batch: ||G(x)_batch||_2 + 1",
        choices=("sample", "batch"),
    )
    covariance: Literal["auto", "full", "diagonal", "lowrank"] = _opt(
        "auto",
        "covariance of the target distribution for L_td (auto: full unless too large, then lowrank)",
        choices=("auto", "full", "diagonal", "lowrank"),
    )
    cov_rank: int = _opt(64, "rank of the lowrank covariance", low=1, high=MAX_WIDTH)
    disc_real: Literal["target", "all"] = _opt(
        "target",
        "what the discriminator sees as real: target-class samples, or all samples",
        choices=("target", "all"),
    )
    train_on: Literal["non-target", "all"] = _opt(
        "non-target", "samples the generator learns to perturb", choices=("non-target", "all")
    )
    precision: Literal["float32", "bfloat16"] = _opt(
        "float32",
        "bfloat16: mixed precision (autocast) for speed, on a CUDA GPU or a CPU with native "
        "bfloat16 (avx512_bf16 or amx_bf16)",
        choices=("float32", "bfloat16"),
    )

    def __post_init__(self):
        for f in fields(self):
            problem = config_problem(f.name, getattr(self, f.name))
            if problem:
                raise UserError(f"{f.name} = {getattr(self, f.name)!r}: {problem}")
        if not (self.w_gan or self.w_adv or self.w_norm or self.w_td or self.w_ed):
            raise UserError(
                "every loss weight (w_gan, w_adv, w_norm, w_td, w_ed) is 0: the generator would learn nothing"
            )

    @classmethod
    def for_recipe(cls, recipe: str = "tspg+", **overrides) -> TrainConfig:
        """The defaults of ``recipe`` (``tspg+`` or ``paper``), with ``overrides`` (None ones ignored)."""
        if recipe not in RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        base = PAPER if recipe == "paper" else {}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A config from a manifest's ``config``; unknown keys are ignored, lists become tuples."""
        names = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        if (
            "target_batch_size" not in kw
        ):  # bundles older than the field trained f in batches of batch_size
            kw["target_batch_size"] = kw.get("batch_size", cls.batch_size)
        kw.setdefault("seeds", 1)  # bundles older than the field hold one generator
        return cls(**kw)

    def member_seeds(self) -> list[int]:
        """The seed of each generator of the ensemble: ``seed`` first (so ``seeds=1``
        trains exactly one generator as before), then ``seeds - 1`` seeds drawn from
        ``numpy.random.SeedSequence(seed)``: independent of other values of ``seed``
        (``seed + i`` would make runs with seeds 0 and 1 share members)."""
        import numpy as np

        spawned = np.random.SeedSequence(self.seed).spawn(self.seeds - 1)
        return [self.seed] + [int(s.generate_state(1)[0]) for s in spawned]


# The paper's recipe, as the reference implementation computes it (DESIGN.md); its target
# model trains for 50 epochs in batches of 32 (the reference's train-target defaults).
# covariance "auto" draws from the full empirical covariance whenever it fits in memory.
PAPER: dict[str, Any] = dict(
    recipe="paper",
    seeds=1,
    epochs=150,
    target_epochs=50,
    target_batch_size=32,
    w_gan=1.0,
    w_adv=1.0,
    w_norm=1.0,
    w_td=1.0,
    w_ed=0.0,
    ed_repulsion=1.0,
    kappa=0.0,
    adv_space="probs",
    adv_reduce="sum",
    norm_form="batch",
    covariance="auto",
    disc_real="all",
    train_on="all",
)


# The reference implementation's (ctargon/TSPG, commit ba027b4) network sizes where they differ
# from the paper's: its target model is 512-256-128 (the paper states 1024-512-128). Its
# generator and discriminator are the paper's. ``TrainConfig.for_recipe("paper",
# **REFERENCE_CODE_SIZES)`` (or ``--target-hidden 512,256,128``) runs like for like.
REFERENCE_CODE_SIZES: dict[str, Any] = dict(target_hidden=(512, 256, 128))


def config_fields() -> dict[str, Field]:
    """TrainConfig's fields by name (each with ``metadata``: help, choices, low, high)."""
    return {f.name: f for f in fields(TrainConfig)}


def field_default(name: str, recipe: str = "tspg+"):
    """The default of field ``name`` in ``recipe``."""
    if recipe == "paper" and name in PAPER:
        return PAPER[name]
    f = config_fields()[name]
    return f.default if f.default is not MISSING else None


# The allowed words of the TrainConfig fields that take one
CHOICES = {
    name: list(f.metadata["choices"])
    for name, f in config_fields().items()
    if f.metadata.get("choices")
}


def config_problem(name: str, value) -> str | None:
    """Why ``value`` is out of range for TrainConfig field ``name``; None when it is fine."""
    meta = config_fields()[name].metadata
    kind, optional = field_kind(name)
    if value is None and optional:
        return None  # an optional setting left unset
    if meta.get("choices"):
        return None if value in meta["choices"] else f"choose one of {', '.join(meta['choices'])}"
    if kind == "widths":
        return _widths_problem(value, meta)
    if kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "str":
        return None if isinstance(value, str) else "must be a word"
    return _number_problem(value, meta, integer=kind == "int")


def _widths_problem(value, meta: dict) -> str | None:
    if not isinstance(value, tuple | list):
        return "must be a list of whole numbers (layer widths)"
    if not value:
        return "give at least one width"
    for w in value:
        if isinstance(w, bool) or not isinstance(w, int):
            return "widths must be whole numbers"
        problem = _range_problem(w, meta)
        if problem:
            return f"widths must be {problem}"
    return None


def number_problem(
    value,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """Why ``value`` is not a finite number (a whole one with ``integer``) in the range from
    ``low`` to ``high`` (each excluded when open); None when it is. The command line's
    other numeric options are checked with it, in the words of the TrainConfig fields."""
    meta = dict(low=low, high=high, low_open=low_open, high_open=high_open)
    return _number_problem(value, meta, integer=integer)


def _number_problem(value, meta: dict, *, integer: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a whole number" if integer else "must be a number"
    if not math.isfinite(value):
        return "must be a finite number"
    if integer and not isinstance(value, int):
        return "must be a whole number"
    problem = _range_problem(value, meta)
    return f"must be {problem}" if problem else None


def _range_problem(v, meta: dict) -> str | None:
    """What ``v`` must be to fit the range in ``meta`` (None when it fits)."""
    low, high = meta.get("low"), meta.get("high")
    lo_open, hi_open = meta.get("low_open"), meta.get("high_open")
    too_low = low is not None and (v <= low if lo_open else v < low)
    too_high = high is not None and (v >= high if hi_open else v > high)
    if not (too_low or too_high):
        return None
    if low is not None and high is not None and high <= 1:  # shares and weights in [0, 1]
        return f"between {_n(low)} and {_n(high)}" + (" (exclusive)" if lo_open and hi_open else "")
    if too_low:
        return (
            f"more than {_n(low)}"
            if lo_open
            else "0 or more"
            if low == 0
            else f"at least {_n(low)}"
        )
    return f"less than {_n(high)}" if hi_open else f"at most {_n(high)}"


def _n(v) -> str:
    """A bound as a message writes it: whole numbers in full (4294967295, not 4.29497e+09)."""
    if isinstance(v, int) or (float(v).is_integer() and abs(v) < 1e16):
        return str(int(v))
    return f"{v:g}"


# ----------------------------------------------------------------------------- command line


def option_name(name: str) -> str:
    """The command-line option of TrainConfig field ``name``: ``target_hidden`` -> ``--target-hidden``."""
    return "--" + name.replace("_", "-")


def config_options() -> list[str]:
    """The TrainConfig fields that are hyper-parameter options of ``tspg-train``: all but the recipe."""
    return [name for name in config_fields() if name != "recipe"]


@functools.cache
def field_kind(name: str) -> tuple[str, bool]:
    """(kind, optional) of TrainConfig field ``name``, from its type annotation.

    kind is ``"bool"``, ``"int"``, ``"float"``, ``"str"`` (words, ``Literal[...]``) or
    ``"widths"`` (``tuple[int, ...]``); optional is True for ``X | None``.
    """
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    optional = type(None) in args  # X | None
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "widths", optional
    if origin is Literal:
        return "str", optional
    for kind in (bool, int, float, str):
        if hint is kind:
            return kind.__name__, optional
    raise TypeError(f"TrainConfig.{name}: no command-line form for {hint!r}")


def parse_option(name: str, text: str):
    """The value of TrainConfig field ``name`` from its command-line text (inverse of
    :func:`format_option`); ValueError when the text is not of the field's kind.

    Widths are whole numbers joined by commas (``512,256,128``); an optional field takes
    ``none``. The range is checked apart, by :func:`config_problem`.
    """
    kind, optional = field_kind(name)
    if optional and text.strip().lower() == "none":
        return None
    if kind == "widths":
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise ValueError(f"{text!r} is not a list of widths (e.g. 512,256,128)")
        return tuple(int(p) for p in parts)
    if kind == "bool":
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.strip().lower() not in words:
            raise ValueError(f"{text!r} is not true or false")
        return words[text.strip().lower()]
    return {"int": int, "float": float, "str": str}[kind](text)


def format_option(value) -> str:
    """A TrainConfig value as the command line writes it (widths joined by commas)."""
    if isinstance(value, tuple | list):
        return ",".join(str(int(w)) for w in value)
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def config_argv(config: TrainConfig) -> list[str]:
    """The ``tspg-train`` options that rebuild ``config``: ``--recipe`` unless it is
    ``tspg+``, then every field whose value differs from that recipe's default."""
    base = TrainConfig.for_recipe(config.recipe)
    argv = [] if config.recipe == "tspg+" else [option_name("recipe"), config.recipe]
    for name in config_options():
        value = getattr(config, name)
        if value == getattr(base, name):
            continue
        if isinstance(value, bool):  # a switch: --name / --no-name
            argv.append(option_name(name) if value else "--no-" + option_name(name)[2:])
        else:
            argv += [option_name(name), format_option(value)]
    return argv
