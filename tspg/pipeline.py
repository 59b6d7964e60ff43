"""From an AnnData to a trained bundle: choose genes, split, scale, fit f, fit G, measure.

This is the Python API the ``tspg-train`` command and the dashboard both call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import anndata as ad
import numpy as np
import torch

from .bundle import Bundle, new_manifest, slug
from .config import TrainConfig
from .data import Scaler, align_genes, fingerprint, stratified_split, validate_labels
from .genesets import GeneSelection, select_genes
from .perturb import class_probabilities, generate_perturbed
from .training import check_precision, fit_generator, fit_target, resolve_device

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

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise ValueError(
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
        raise ValueError(
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
            raise ValueError(
                f"{dataset}: class {unknown[0]!r} is unknown to the target model of {reuse.name!r}"
            )
        pos = {s: i for i, s in enumerate(samples)}
        missing = [s for s in reuse.split["train"] + reuse.split["test"] if s not in pos]
        if missing:
            raise ValueError(
                f"{dataset}: sample {missing[0]!r} of {reuse.name!r}'s split is not in this data; the target model cannot be reused"
            )
        train_idx = np.array([pos[s] for s in reuse.split["train"]])
        test_idx = np.array([pos[s] for s in reuse.split["test"]])
        scaler = reuse.scaler
    else:
        classes = sorted(set(labels))
        train_idx, test_idx = stratified_split(labels, test_size=test_size, seed=seed)
        if not len(test_idx):
            raise ValueError(
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


def _fit_target_model(
    prep: Prepared, config: TrainConfig, device, progress, compile: bool = False
) -> torch.nn.Module:
    tr = prep.train_idx
    return fit_target(
        prep.X[tr],
        prep.y[tr],
        len(prep.classes),
        config,
        device=device,
        callback=_stage(progress, "target model"),
        compile=compile,
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
    compile: bool = False,
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
        Called after every epoch (or chunk of a step budget) as
        ``progress(stage, chunk, n_chunks, losses)``.
    compile
        Run the networks through ``torch.compile`` (plain torch where that fails).
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
        compile=compile,
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
    compile: bool = False,
) -> list[Bundle]:
    """Train one generator per target class (all classes by default), sharing one target model."""
    config = config or TrainConfig()
    if target_model is not None:
        config = reused_config(config, target_model)
    dev = resolve_device(device)
    check_precision(config, dev)
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
    target_idx = [prep.class_index(t) for t in targets]
    names = names or default_names(prep.dataset, targets)

    start = time.perf_counter()
    if target_model is not None:
        f = target_model.target_model.to(dev)
        target_seconds = 0.0
    else:
        f = _fit_target_model(prep, config, dev, progress, compile)
        target_seconds = time.perf_counter() - start
    bundles = []
    for t_name, t, bname in zip(targets, target_idx, names, strict=True):
        tr = prep.train_idx
        fit = fit_generator(
            prep.X[tr],
            prep.y[tr],
            t,
            f,
            config,
            device=dev,
            callback=_stage(progress, f"generator {t_name}"),
            compile=compile,
        )
        metrics = heldout_metrics(prep, f.cpu(), fit.generator.cpu(), t)
        f.to(dev)
        metrics.update(
            train_seconds_target_model=target_seconds,
            train_seconds_generator=fit.seconds,
            train_steps_generator=fit.steps,
            history_steps_per_point=fit.steps_per_point,
            device=str(dev),
            threads=torch.get_num_threads(),
        )
        manifest = new_manifest(
            name=bname,
            dataset={
                "name": prep.dataset,
                "fingerprint": prep.fingerprint,
                "n_samples": len(prep.samples),
            },
            label_key=prep.label_key,
            classes=prep.classes,
            target=t_name,
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
            target_model_from=target_model.name if target_model is not None else None,
            metrics=metrics,
            history=fit.history,
        )
        bundles.append(
            Bundle(
                manifest,
                fit.generator,
                fit.discriminator,
                f.cpu() if len(targets) == 1 else _copy_of(f),
            )
        )
    return bundles


def _copy_of(f):
    import copy

    return copy.deepcopy(f).cpu().eval()
