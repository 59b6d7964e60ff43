"""TSPG Explorer: train transcriptome state perturbation generators and read what they learned.

The names below are imported on first use (PEP 562), so ``import tspg`` and the command
line's ``--help`` do not import torch, anndata or scanpy::

    import tspg

    adata = tspg.read_gem("gem.h5ad", label_key="tissue")
    bundle = tspg.train(adata, label_key="tissue", target="Heart")
    tspg.save_bundle(bundle)
    out = tspg.perturb(adata, bundle, copy=True)
    metrics = tspg.evaluate(adata, bundle)
    table = tspg.sweep(adata, label_key="tissue", gene_sets=sets)  # needs tspg[sweep]

Modules: ``tspg.config`` (TrainConfig), ``tspg.data`` (GEM readers, scaler, split),
``tspg.genesets``, ``tspg.nets``, ``tspg.training`` (losses and loops), ``tspg.pipeline``
(AnnData -> bundle), ``tspg.bundle``, ``tspg.perturb``, ``tspg.baselines``,
``tspg.metrics``, ``tspg.embedding``, ``tspg.enrichment``, ``tspg.charts``,
``tspg.datasets``, ``tspg.errors``, ``tspg.cli``, ``tspg.sweep`` (gene sets x targets on
Dask; a module you can call) and the dashboard glue ``tspg.app``.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# OpenMP threads (torch's, MKL's) that wait for work spin a short while (GOMP_SPINCOUNT=1000
# rounds of a busy-wait loop) and then sleep. libgomp's own default (300,000 rounds) made
# 2-thread training up to 3x slower than 1 thread once other work took the cores of a shared
# 2-core machine; sleeping at once (OMP_WAIT_POLICY=PASSIVE) made it 1.8x slower than
# spinning on a quiet one. With the bounded spin and the idle cores as threads
# (tspg.training.default_threads), the demo was within 1.12x of the best setting on a quiet
# machine and 1.0-1.7x on a busy one (README, "Threads"; ``python bench/threads.py``). It must
# be set before torch (libgomp) loads; a policy or spin count already in the environment is kept.
SPIN_COUNT = "1000"
if not os.environ.get("OMP_WAIT_POLICY") and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

# public name -> module that defines it
_EXPORTS = {
    "Bundle": "bundle",
    "list_bundles": "bundle",
    "load_bundle": "bundle",
    "save_bundle": "bundle",
    "TrainConfig": "config",
    "UserError": "errors",
    "read_gem": "data",
    "perturb": "perturbation",
    "perturb_adata": "perturbation",
    "train": "pipeline",
    "train_all_targets": "pipeline",
    "evaluate": "metrics",
}

# modules that are public names themselves: tspg.sweep(...) runs a sweep (the module is callable)
_MODULES = {"sweep"}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)  # which also sets the attribute
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tspg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_MODULES])
