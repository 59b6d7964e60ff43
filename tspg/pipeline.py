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
import scipy.sparse as sp
import torch

from .bundle import Bundle, new_manifest, slug
from .config import TrainConfig
from .data import (
    Scaler,
    fingerprint,
    gene_matrix,
    stratified_split,
    subsample,
    validate_labels,
)
from .errors import UserError
from .genesets import HVG_FLAVOR, GeneSelection, highly_variable_genes, select_genes
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
    """A labelled GEM restricted to the chosen genes, split and scaled.

    ``X`` is dense float32, or a float32 CSR matrix when the data were sparse and scaling
    keeps zeros at zero (:attr:`tspg.data.Scaler.keeps_sparse`).
    """

    dataset: str
    label_key: str
    classes: list[str]
    genes: list[str]
    gene_set: GeneSelection
    samples: list[str]
    y: np.ndarray  # class index per sample
    X: np.ndarray | sp.csr_matrix  # scaled, samples x genes
    scaler: Scaler
    train_idx: np.ndarray
    test_idx: np.ndarray
    fingerprint: str
    training_mean: np.ndarray | None = None  # scaled, per gene, over the training split
    n_top_genes: int | None = None  # the genes are this many highly variable ones
    # the verdict's independent classifiers, fit on first use (verdict_classifiers)
    classifiers: dict | None = field(default=None, repr=False)

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise UserError(
                f"target class {name!r} is not among the {len(self.classes)} classes of {self.label_key!r}: {', '.join(self.classes)}"
            )
        return self.classes.index(name)

    def class_mean(self, c: int, *, rows: np.ndarray | None = None) -> np.ndarray:
        """Mean scaled expression of class ``c`` over ``rows`` (default: the training split)."""
        rows = self.train_idx if rows is None else rows
        return column_mean(self.X, rows[self.y[rows] == c])


def column_mean(X, rows: np.ndarray | None = None) -> np.ndarray:
    """Mean of each column over ``rows`` (default all), float32, a chunk of rows at a time."""
    rows = np.arange(X.shape[0]) if rows is None else np.asarray(rows)
    total = np.zeros(X.shape[1], dtype=np.float64)
    step = max(1, (64 * 2**20) // (4 * max(X.shape[1], 1)))
    for i in range(0, len(rows), step):
        block = X[rows[i : i + step]]
        total += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
    return (total / max(len(rows), 1)).astype(np.float32)


def prepare(
    adata: ad.AnnData,
    *,
    label_key: str,
    genes: GeneSelection | None = None,
    n_top_genes: int | None = None,
    layer: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    dataset: str | None = None,
    reuse: Bundle | None = None,
) -> Prepared:
    """Split (stratified, seeded), choose genes, and fit the scaler on the training split.

    Genes are ``genes`` (a gene set or list), else the ``n_top_genes`` highly variable
    genes of the training split (:func:`tspg.genesets.highly_variable_genes`), else all.
    Only the chosen genes are read, a chunk of rows at a time: sparse data (in memory or
    on disk) stay sparse while scaling keeps zeros at zero, so the whole GEM never is dense.

    With ``reuse`` (a bundle whose target model is to be shared), its genes, classes, split
    and scaler are taken as they are, so no held-out sample is ever seen by any model.
    """
    start = time.perf_counter()
    dataset = dataset or adata.uns.get("tspg_import", {}).get("source") or "data"
    validate_labels(adata, label_key, source=dataset)
    if reuse is not None and (
        n_top_genes or (genes is not None and list(genes.genes) != list(reuse.genes))
    ):
        raise UserError(
            f"the target model of {reuse.name!r} was trained on its own {len(reuse.genes)} genes "
            f"(gene set {reuse.manifest['gene_set']['name']!r}); another gene set cannot be chosen with it"
        )
    if genes is not None and n_top_genes:
        raise UserError("give either a gene set (or list) or --n-top-genes, not both")
    labels = adata.obs[label_key].astype(str).to_numpy()
    samples = list(adata.obs_names)
    if reuse is not None:
        genes = GeneSelection(
            reuse.manifest["gene_set"]["name"],
            list(reuse.genes),
            len(reuse.genes),
            [],
            reuse.manifest["gene_set"].get("source"),
        )
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
    else:
        classes = sorted(set(labels))
        train_idx, test_idx = stratified_split(labels, test_size=test_size, seed=seed)
        if not len(test_idx):
            raise UserError(
                f"{dataset}: no class has two samples, so nothing can be held out for testing"
            )
        if n_top_genes:
            genes = highly_variable_genes(
                adata, n_top_genes, rows=train_idx, layer=layer, source=dataset
            )
        genes = genes or select_genes(adata.var_names)
    X = gene_matrix(adata, genes.genes, layer=layer, source=dataset)
    fp = fingerprint(X, genes.genes, samples)
    scaler = reuse.scaler if reuse is not None else Scaler.fit(X, rows=train_idx)
    Xs = scaler.transform(X, genes=genes.genes, source=dataset)
    del X  # a scaled sparse matrix shares only its index arrays with it
    y = np.array([classes.index(c) for c in labels])
    logger.info(
        "%s: %d samples x %d genes (%s) ready in %.1f s",
        dataset,
        Xs.shape[0],
        Xs.shape[1],
        f"sparse, {Xs.nnz / max(Xs.shape[0] * Xs.shape[1], 1):.1%} non-zero"
        if sp.issparse(Xs)
        else "dense",
        time.perf_counter() - start,
    )
    return Prepared(
        dataset,
        label_key,
        classes,
        list(genes.genes),
        genes,
        samples,
        y,
        Xs,
        scaler,
        train_idx,
        test_idx,
        fp,
        column_mean(Xs, train_idx),
        n_top_genes or None,
    )


def reused_config(config: TrainConfig, target_model: Bundle) -> TrainConfig:
    """``config`` with the target-model and split settings of the bundle whose target model is reused."""
    old = target_model.config
    return replace(config, **{name: getattr(old, name) for name in TARGET_MODEL_FIELDS})


def default_names(dataset: str, targets) -> list[str]:
    """Bundle names ``<dataset>-<target>`` (as folder-safe slugs)."""
    return [f"{slug(dataset)}-{slug(t)}" for t in targets]


# held-out metrics at training time: perturb at most this many held-out samples (a fixed,
# seeded, class-stratified subsample, tspg.data.subsample) when the split is larger
HELDOUT_MAX_SAMPLES = 10_000


def heldout_metrics(
    prep: Prepared, f, G, target: int, *, max_samples: int | None = HELDOUT_MAX_SAMPLES
) -> dict:
    """Target-model accuracy and perturbation accuracy on the held-out split.

    On at most ``max_samples`` held-out samples (seeded, class-stratified subsample; None:
    all). ``n_test`` is the number used, ``n_test_total`` the size of the held-out split.
    """
    used = prep.test_idx[subsample(prep.y[prep.test_idx], max_samples, seed=0)]
    if len(used) < len(prep.test_idx):
        logger.info(
            "held-out metrics on a seeded subsample of %d of the %d held-out samples",
            len(used),
            len(prep.test_idx),
        )
    Xte, yte = _dense(prep.X[used]), prep.y[used]
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
        "n_test_total": int(len(prep.test_idx)),
    }


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _training_matrix(X):
    """The training rows as :func:`tspg.training.fit_target` / ``fit_generator`` take them.

    A CSR matrix goes as it is once the training loops densify a batch at a time (the
    engine work, issue 14 item 2); until then it is densified here: the training rows of
    the chosen genes only, never the whole GEM.
    """
    return X.toarray() if sp.issparse(X) and not TRAINING_TAKES_SPARSE else X


# Whether tspg.training's loops accept a scipy CSR matrix (True once they densify per batch)
TRAINING_TAKES_SPARSE = False


def _stage(progress: Progress | None, stage: str):
    if progress is None:
        return None
    return lambda step, n, losses: progress(stage, step, n, losses)


def fit_target_model(
    prep: Prepared,
    config: TrainConfig,
    *,
    device: str | torch.device = "auto",
    X_train=None,
    progress: Progress | None = None,
) -> torch.nn.Module:
    """Train the target model f on the training split of ``prep``; returns it in eval mode.

    ``X_train``: the training rows as the loops take them (default: made from ``prep``).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if X_train is None:
        X_train = _training_matrix(prep.X[prep.train_idx])
    return fit_target(
        X_train,
        prep.y[prep.train_idx],
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
    n_top_genes: int | None = None,
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
    n_top_genes
        Instead of ``genes``: this many highly variable genes of the training split
        (scanpy, flavour :data:`tspg.genesets.HVG_FLAVOR`).
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
        n_top_genes=n_top_genes,
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
    n_top_genes: int | None = None,
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
        n_top_genes=n_top_genes,
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
    X_train = _training_matrix(prep.X[prep.train_idx])  # one copy, shared by every fit
    if target_model is not None:
        f = target_model.target_model.to(dev)
        target_seconds = 0.0
    else:
        f = fit_target_model(prep, config, device=dev, X_train=X_train, progress=progress)
        target_seconds = time.perf_counter() - start
    return [
        train_generator(
            prep,
            f if len(targets) == 1 else _copy_of(f),
            target=t_name,
            config=config,
            name=bname,
            device=dev,
            X_train=X_train,
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
    X_train=None,
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
    X_train
        The training rows as the loops take them (default: made from ``prep``; pass one
        copy to several calls).
    target_seconds
        Seconds the target model took to train (stored in the metrics).
    target_model_from
        Name of the bundle whose target model is reused, if any.

    Returns
    -------
    An unsaved :class:`~tspg.bundle.Bundle`, its held-out metrics in ``metrics`` and its
    verdict in ``manifest["verdict"]``.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    t = prep.class_index(target)
    tr = prep.train_idx
    if X_train is None:
        X_train = _training_matrix(prep.X[tr])
    fit = fit_generator(
        X_train,
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
    hvg = {"n_top_genes": prep.n_top_genes, "flavor": HVG_FLAVOR} if prep.n_top_genes else {}
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
            **hvg,
        },
        scaler={"minimum": prep.scaler.minimum.tolist(), "range": prep.scaler.range.tolist()},
        split={
            "train": [prep.samples[i] for i in prep.train_idx],
            "test": [prep.samples[i] for i in prep.test_idx],
        },
        config=config.to_dict(),
        target_mean=prep.class_mean(t).tolist(),
        training_mean=prep.training_mean.tolist(),
        covariance_used=fit.covariance,
        target_model_from=target_model_from,
        metrics=metrics,
        history=fit.history,
    )
    bundle = Bundle(manifest, fit.generator, fit.discriminator, f)
    _store_verdict(bundle, prep)
    return bundle


def _verdict_training_rows(prep: Prepared) -> np.ndarray:
    """The training rows the verdict's classifiers learn from (seeded subsample)."""
    from .verdict import MAX_TRAIN

    return prep.train_idx[subsample(prep.y[prep.train_idx], MAX_TRAIN, min_per_class=1)]


def verdict_classifiers(prep: Prepared) -> dict:
    """The verdict's independent classifiers, fit on a seeded subsample of the training split
    (at most :data:`tspg.verdict.MAX_TRAIN` samples); kept on ``prep``, so every generator
    trained on it shares them (fit once per run, or once per gene set in a sweep)."""
    if prep.classifiers is None:
        from .metrics import fit_classifiers

        tr = _verdict_training_rows(prep)
        names = np.asarray(prep.classes, dtype=object)
        prep.classifiers = fit_classifiers(_dense(prep.X[tr]), names[prep.y[tr]])
    return prep.classifiers


def _store_verdict(bundle: Bundle, prep: Prepared) -> None:
    """Grade the new bundle on its held-out split into ``manifest["verdict"]`` (and the
    seconds it took, the classifiers' fit included when this bundle needed it, into its
    metrics; see :mod:`tspg.verdict`). Only seeded subsamples of both splits become dense
    (:data:`tspg.verdict.MAX_TRAIN`, :data:`HELDOUT_MAX_SAMPLES`)."""
    from .verdict import heldout_verdict

    start = time.perf_counter()
    classifiers = verdict_classifiers(prep)
    names = np.asarray(prep.classes, dtype=object)
    tr = _verdict_training_rows(prep)
    te = prep.test_idx[subsample(prep.y[prep.test_idx], HELDOUT_MAX_SAMPLES)]
    bundle.manifest["verdict"] = heldout_verdict(
        bundle,
        _dense(prep.X[tr]),
        names[prep.y[tr]],
        _dense(prep.X[te]),
        names[prep.y[te]],
        [prep.samples[i] for i in te],
        classifiers=classifiers,
    )
    bundle.manifest["metrics"]["train_seconds_verdict"] = time.perf_counter() - start


def _copy_of(f):
    import copy

    return copy.deepcopy(f).cpu().eval()
