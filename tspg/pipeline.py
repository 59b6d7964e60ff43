"""From an AnnData to a trained bundle: choose genes, split, scale, fit f, fit G, measure.

This is the Python API the ``tspg-train`` command and the dashboard both call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import anndata as ad
import numpy as np
import torch

from .bundle import Bundle, new_manifest, slug
from .config import TrainConfig
from .data import Scaler, align_genes, fingerprint, stratified_split, validate_labels
from .errors import UserError
from .genesets import GeneSelection, select_genes
from .perturbation import class_probabilities, generate_perturbed
from .training import fit_generator, fit_target, resolve_device

__all__ = [
    "TARGET_MODEL_FIELDS",
    "default_names",
    "fit_target_model",
    "heldout_metrics",
    "prepare",
    "Prepared",
    "reused_config",
    "train",
    "train_all_targets",
    "train_generator",
    "verdict_classifiers",
]

logger = logging.getLogger(__name__)

# progress(stage, step, n_steps, losses); stage is "target model" or "generator <target>"
Progress = Callable[[str, int, int, dict[str, float]], None]

# The settings that made a target model and its split: with a reused target model they
# are that bundle's, whatever the new run's config says (so the new bundle can be loaded)
TARGET_MODEL_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name.startswith("target_")) + (
    "split_seed",
    "test_size",
)


@dataclass
class Prepared:
    """A labelled GEM restricted to the chosen genes, split and scaled."""

    dataset: str
    label_key: str
    classes: list[str]
    genes: list[str]
    gene_set: GeneSelection
    samples: list[str]
    y: np.ndarray  # class index per sample
    X: np.ndarray  # scaled, samples x genes
    scaler: Scaler
    train_idx: np.ndarray
    test_idx: np.ndarray
    fingerprint: str
    # the verdict's independent classifiers, fit on first use (verdict_classifiers)
    classifiers: dict | None = field(default=None, repr=False)

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise UserError(
                f"target class {name!r} is not among the {len(self.classes)} classes of {self.label_key!r}: {', '.join(self.classes)}"
            )
        return self.classes.index(name)


def prepare(
    adata: ad.AnnData,
    *,
    label_key: str,
    genes: GeneSelection | None = None,
    layer: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    dataset: str | None = None,
    reuse: Bundle | None = None,
) -> Prepared:
    """Select genes, split (stratified, seeded) and fit the scaler on the training split.

    With ``reuse`` (a bundle whose target model is to be shared), its genes, classes, split
    and scaler are taken as they are, so no held-out sample is ever seen by any model.
    """
    dataset = dataset or adata.uns.get("tspg_import", {}).get("source") or "data"
    validate_labels(adata, label_key, source=dataset)
    if reuse is not None and genes is not None and list(genes.genes) != list(reuse.genes):
        raise UserError(
            f"the target model of {reuse.name!r} was trained on its own {len(reuse.genes)} genes "
            f"(gene set {reuse.manifest['gene_set']['name']!r}); another gene set cannot be chosen with it"
        )
    genes = genes or select_genes(adata.var_names)
    if reuse is not None:
        genes = GeneSelection(
            reuse.manifest["gene_set"]["name"],
            list(reuse.genes),
            len(reuse.genes),
            [],
            reuse.manifest["gene_set"].get("source"),
        )
    X = align_genes(adata, genes.genes, layer=layer, source=dataset)
    labels = adata.obs[label_key].astype(str).to_numpy()
    samples = list(adata.obs_names)
    if reuse is not None:
        classes = list(reuse.classes)
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise UserError(
                f"{dataset}: class {unknown[0]!r} is unknown to the target model of {reuse.name!r}"
            )
        pos = {s: i for i, s in enumerate(samples)}
        missing = [s for s in reuse.split["train"] + reuse.split["test"] if s not in pos]
        if missing:
            raise UserError(
                f"{dataset}: sample {missing[0]!r} of {reuse.name!r}'s split is not in this data; the target model cannot be reused"
            )
        train_idx = np.array([pos[s] for s in reuse.split["train"]])
        test_idx = np.array([pos[s] for s in reuse.split["test"]])
        scaler = reuse.scaler
    else:
        classes = sorted(set(labels))
        train_idx, test_idx = stratified_split(labels, test_size=test_size, seed=seed)
        if not len(test_idx):
            raise UserError(
                f"{dataset}: no class has two samples, so nothing can be held out for testing"
            )
        scaler = Scaler.fit(X[train_idx])
    y = np.array([classes.index(c) for c in labels])
    return Prepared(
        dataset,
        label_key,
        classes,
        list(genes.genes),
        genes,
        samples,
        y,
        scaler.transform(X, genes=genes.genes, source=dataset),
        scaler,
        train_idx,
        test_idx,
        fingerprint(X, genes.genes, samples),
    )


def reused_config(config: TrainConfig, target_model: Bundle) -> TrainConfig:
    """``config`` with the target-model and split settings of the bundle whose target model is reused."""
    old = target_model.config
    return replace(config, **{name: getattr(old, name) for name in TARGET_MODEL_FIELDS})


def default_names(dataset: str, targets) -> list[str]:
    """Bundle names ``<dataset>-<target>`` (as folder-safe slugs)."""
    return [f"{slug(dataset)}-{slug(t)}" for t in targets]


def heldout_metrics(prep: Prepared, f, G, target: int) -> dict:
    """Target-model accuracy and perturbation accuracy on the held-out split."""
    Xte, yte = prep.X[prep.test_idx], prep.y[prep.test_idx]
    acc = float((class_probabilities(f, Xte).argmax(1) == yte).mean())
    _, x_adv = generate_perturbed(G, Xte)
    hit = class_probabilities(f, x_adv).argmax(1) == target
    non = yte != target
    per_source = {
        prep.classes[c]: float(hit[yte == c].mean())
        for c in sorted(set(yte.tolist()))
        if c != target
    }
    return {
        "target_model_accuracy": acc,
        "perturbation_accuracy": float(hit.mean()),
        "perturbation_accuracy_non_target": float(hit[non].mean()) if non.any() else None,
        "perturbation_accuracy_by_source": per_source,
        "n_test": int(len(yte)),
        "n_test_non_target": int(non.sum()),
    }


def _stage(progress: Progress | None, stage: str):
    if progress is None:
        return None
    return lambda step, n, losses: progress(stage, step, n, losses)


def fit_target_model(
    prep: Prepared,
    config: TrainConfig,
    *,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> torch.nn.Module:
    """Train the target model f on the training split of ``prep``; returns it in eval mode."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    tr = prep.train_idx
    return fit_target(
        prep.X[tr],
        prep.y[tr],
        len(prep.classes),
        config,
        device=dev,
        callback=_stage(progress, "target model"),
    )


def train(
    adata: ad.AnnData,
    *,
    label_key: str,
    target: str,
    config: TrainConfig | None = None,
    genes: GeneSelection | None = None,
    layer: str | None = None,
    dataset: str | None = None,
    target_model: Bundle | None = None,
    device: str = "auto",
    name: str | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """Train a TSPG generator for ``target`` on a labelled AnnData; returns an unsaved bundle.

    Parameters
    ----------
    adata
        Samples x genes, labels in ``obs[label_key]``.
    target
        The target class.
    config
        Hyper-parameters (default: the ``tspg+`` recipe).
    genes
        The gene set (default: all genes).
    target_model
        A bundle whose target model, split, scaler and genes to reuse instead of training
        anew; its settings of :data:`TARGET_MODEL_FIELDS` replace those of ``config`` and are
        recorded in the new bundle. ``genes`` must then be None (or the same genes).
    device
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    progress
        Called after every epoch as ``progress(stage, epoch, n_epochs, losses)``.
    """
    return train_all_targets(
        adata,
        label_key=label_key,
        targets=[target],
        config=config,
        genes=genes,
        layer=layer,
        dataset=dataset,
        target_model=target_model,
        device=device,
        names=[name] if name else None,
        progress=progress,
    )[0]


def train_all_targets(
    adata: ad.AnnData,
    *,
    label_key: str,
    targets: list[str] | None = None,
    config: TrainConfig | None = None,
    genes: GeneSelection | None = None,
    layer: str | None = None,
    dataset: str | None = None,
    target_model: Bundle | None = None,
    device: str = "auto",
    names: list[str] | None = None,
    progress: Progress | None = None,
) -> list[Bundle]:
    """Train one generator per target class (all classes by default), sharing one target model."""
    config = config or TrainConfig()
    if target_model is not None:
        config = reused_config(config, target_model)
    dev = resolve_device(device)
    prep = prepare(
        adata,
        label_key=label_key,
        genes=genes,
        layer=layer,
        test_size=config.test_size,
        seed=config.split_seed,
        dataset=dataset,
        reuse=target_model,
    )
    targets = list(targets) if targets else list(prep.classes)
    for t in targets:  # an unknown target fails before anything trains
        prep.class_index(t)
    names = names or default_names(prep.dataset, targets)

    start = time.perf_counter()
    if target_model is not None:
        f = target_model.target_model.to(dev)
        target_seconds = 0.0
    else:
        f = fit_target_model(prep, config, device=dev, progress=progress)
        target_seconds = time.perf_counter() - start
    return [
        train_generator(
            prep,
            f if len(targets) == 1 else _copy_of(f),
            target=t_name,
            config=config,
            name=bname,
            device=dev,
            target_seconds=target_seconds,
            target_model_from=target_model.name if target_model is not None else None,
            progress=progress,
        )
        for t_name, bname in zip(targets, names, strict=True)
    ]


def train_generator(
    prep: Prepared,
    target_model: torch.nn.Module,
    *,
    target: str,
    config: TrainConfig,
    name: str,
    device: str | torch.device = "auto",
    target_seconds: float = 0.0,
    target_model_from: str | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """Train the generator (and discriminator) for ``target`` against a trained target model.

    Parameters
    ----------
    prep
        The prepared data (:func:`prepare`) the target model was trained on.
    target_model
        The target model f; it becomes the new bundle's target model (pass a copy to keep
        using it elsewhere).
    target
        The target class.
    config
        The run's settings (with the target model's own, see :func:`reused_config`).
    name
        The bundle's name.
    target_seconds
        Seconds the target model took to train (stored in the metrics).
    target_model_from
        Name of the bundle whose target model is reused, if any.

    Returns
    -------
    An unsaved :class:`~tspg.bundle.Bundle`, its held-out metrics in ``metrics``.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    t = prep.class_index(target)
    tr = prep.train_idx
    fit = fit_generator(
        prep.X[tr],
        prep.y[tr],
        t,
        target_model,
        config,
        device=dev,
        callback=_stage(progress, f"generator {target}"),
    )
    f = target_model.cpu().eval()
    metrics = heldout_metrics(prep, f, fit.generator.cpu(), t)
    metrics.update(
        train_seconds_target_model=target_seconds,
        train_seconds_generator=fit.seconds,
        device=str(dev),
    )
    manifest = new_manifest(
        name=name,
        dataset={
            "name": prep.dataset,
            "fingerprint": prep.fingerprint,
            "n_samples": len(prep.samples),
        },
        label_key=prep.label_key,
        classes=prep.classes,
        target=target,
        genes=prep.genes,
        gene_set={
            "name": prep.gene_set.name,
            "source": prep.gene_set.source,
            "n_requested": prep.gene_set.n_requested,
            "n_missing": len(prep.gene_set.missing),
        },
        scaler={"minimum": prep.scaler.minimum.tolist(), "range": prep.scaler.range.tolist()},
        split={
            "train": [prep.samples[i] for i in prep.train_idx],
            "test": [prep.samples[i] for i in prep.test_idx],
        },
        config=config.to_dict(),
        target_mean=prep.X[tr][prep.y[tr] == t].mean(0).tolist(),
        covariance_used=fit.covariance,
        target_model_from=target_model_from,
        metrics=metrics,
        history=fit.history,
    )
    bundle = Bundle(manifest, fit.generator, fit.discriminator, f)
    _store_verdict(bundle, prep)
    return bundle


def verdict_classifiers(prep: Prepared) -> dict:
    """The verdict's independent classifiers, fit on a seeded subsample of the training split
    (at most :data:`tspg.verdict.MAX_TRAIN` samples); kept on ``prep`` so that every
    generator trained on it shares them (fit once per run, or per gene set in a sweep)."""
    if prep.classifiers is None:
        from .metrics import fit_classifiers, stratified_subsample
        from .verdict import MAX_TRAIN

        names = np.asarray(prep.classes, dtype=object)
        tr = prep.train_idx
        ytr = names[prep.y[tr]]
        fit = stratified_subsample(ytr, MAX_TRAIN)
        prep.classifiers = fit_classifiers(prep.X[tr][fit], ytr[fit])
    return prep.classifiers


def _store_verdict(bundle: Bundle, prep: Prepared) -> None:
    """Grade the new bundle on its held-out split into ``manifest["verdict"]`` (and the
    seconds it took, the classifiers' fit included when this bundle needed it, into its
    metrics); see :mod:`tspg.verdict`."""
    from .verdict import heldout_verdict

    start = time.perf_counter()
    names = np.asarray(prep.classes, dtype=object)
    tr, te = prep.train_idx, prep.test_idx
    bundle.manifest["verdict"] = heldout_verdict(
        bundle,
        prep.X[tr],
        names[prep.y[tr]],
        prep.X[te],
        names[prep.y[te]],
        [prep.samples[i] for i in te],
        classifiers=verdict_classifiers(prep),
    )
    bundle.manifest["metrics"]["train_seconds_verdict"] = time.perf_counter() - start


def _copy_of(f):
    import copy

    return copy.deepcopy(f).cpu().eval()
