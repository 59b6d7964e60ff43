"""TSPG Explorer: train transcriptome state perturbation generators and read what they learned."""

from __future__ import annotations

__version__ = "0.1.0"

import os  # noqa: E402
import sys  # noqa: E402

# OpenMP threads (torch's, MKL's) that wait for work sleep instead of spinning: on a busy
# machine spinning threads take the cores their siblings need, which made 2-thread training
# 10-30x slower than 1 thread on a shared 2-core machine (README, "Threads"). It must be set
# before torch (libgomp) loads; a value already in the environment is kept.
_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# True when torch's waiting threads sleep: the policy was passive when torch loaded (or will
# be, torch not being loaded yet); read by tspg.training.default_threads
OMP_PASSIVE = (
    _WAIT_POLICY or ("PASSIVE" if "torch" not in sys.modules else "")
).upper() == "PASSIVE"

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
    "train",
    "train_all_targets",
]
