"""TSPG Explorer: train transcriptome state perturbation generators and read what they learned."""

from __future__ import annotations

__version__ = "0.1.0"

from . import sweep  # noqa: E402  (a module you can call: tspg.sweep(adata, ...))
from .bundle import Bundle, list_bundles, load_bundle, save_bundle  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .data import read_gem  # noqa: E402
from .perturb import perturb  # noqa: E402
from .pipeline import train, train_all_targets  # noqa: E402

__all__ = [
    "Bundle",
    "TrainConfig",
    "list_bundles",
    "load_bundle",
    "perturb",
    "read_gem",
    "save_bundle",
    "sweep",
    "train",
    "train_all_targets",
]
