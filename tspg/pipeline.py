"""From an AnnData to a trained bundle: choose genes, split, scale, fit f, fit G, measure.

This is the Python API the ``tspg-train`` command and the dashboard both call.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from .bundle import Bundle, check_destination, models_dir, new_manifest, save_bundle, slug
from .config import TrainConfig
from .data import (
    Scaler,
    fingerprint,
    gene_matrix,
    stratified_split,
    subsample,
    validate_labels,
)
from .errors import UserError, one_line
from .genesets import HVG_FLAVOR, GeneSelection, highly_variable_genes, select_genes
from .nets import GeneratorEnsemble, uses_onednn
from .perturbation import class_probabilities, generate_perturbed
from .training import check_precision, fit_generator, fit_target, resolve_device

__all__ = [
    "MIN_TARGET_SAMPLES",
    "TARGET_MODEL_FIELDS",
    "RunPlan",
    "check_out",
    "check_run",
    "default_names",
    "fit_target_model",
    "heldout_metrics",
    "prepare",
    "Prepared",
    "reused_config",
    "split_samples",
    "train",
    "train_all_targets",
    "train_generator",
    "verdict_classifiers",
]

logger = logging.getLogger(__name__)

# progress(stage, step, n_steps, losses); stage is "target model", "generator <target>", or
# for a seed ensemble "generator <target> (2/3)"
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
    dataset = _dataset_name(adata, dataset)
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
    classes, train_idx, test_idx = split_samples(
        labels, samples, test_size=test_size, seed=seed, reuse=reuse, dataset=dataset
    )
    if reuse is not None:
        genes = GeneSelection(
            reuse.manifest["gene_set"]["name"],
            list(reuse.genes),
            len(reuse.genes),
            [],
            reuse.manifest["gene_set"].get("source"),
        )
    else:
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


def _dataset_name(adata: ad.AnnData, dataset: str | None) -> str:
    """The dataset's name in messages and default bundle names: ``dataset``, else the file
    it was read from, else ``data``."""
    return dataset or adata.uns.get("tspg_import", {}).get("source") or "data"


def split_samples(
    labels: np.ndarray,
    samples: list[str],
    *,
    test_size: float = 0.2,
    seed: int = 0,
    reuse: Bundle | None = None,
    dataset: str = "data",
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(classes, training positions, held-out positions) of a run.

    A stratified, seeded split (:func:`tspg.data.stratified_split`), or with ``reuse`` the
    split and classes of that bundle, whose samples must all be in the data. Reads labels
    only: cheap, so :func:`check_run` can make it before anything else.
    """
    if reuse is None:
        train_idx, test_idx = stratified_split(labels, test_size=test_size, seed=seed)
        if not len(test_idx):
            raise UserError(
                f"{dataset}: no class has two samples, so nothing can be held out for testing"
            )
        return sorted(set(labels.tolist())), train_idx, test_idx
    classes = list(reuse.classes)
    unknown = sorted(set(labels.tolist()) - set(classes))
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
    train_idx = np.array([pos[s] for s in reuse.split["train"]], dtype=int)
    test_idx = np.array([pos[s] for s in reuse.split["test"]], dtype=int)
    return classes, train_idx, test_idx


# ----------------------------------------------------------------------------- up-front checks

# The generator of a target class draws real target samples (the discriminator's "real",
# L_td's distribution, the energy distance) from at least this many of its training samples;
# it perturbs batches of at least this many samples (BatchNorm needs two in training mode)
MIN_TARGET_SAMPLES = 2


@dataclass(frozen=True)
class RunPlan:
    """What a training run will do, checked before its first epoch (:func:`check_run`)."""

    dataset: str
    classes: list[str]
    targets: list[str]  # the classes that get a generator, in training order
    names: list[str]  # their bundles' names
    skipped: dict[str, str]  # class -> why it gets no generator (every-class runs only)
    n_train: dict[str, int]  # training samples per class
    out: Path | None  # each bundle is saved here as soon as it is trained (None: not saved)


def check_run(
    adata: ad.AnnData,
    *,
    label_key: str,
    targets: list[str] | None = None,
    config: TrainConfig | None = None,
    dataset: str | None = None,
    target_model: Bundle | None = None,
    names: list[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> RunPlan:
    """Check everything that could stop a training run after its first epoch; write nothing.

    A run that trains a target model and ten generators must not fail at the end, so before
    any training (and before the genes are read) this checks, from the labels alone:

    - the labels (:func:`tspg.data.validate_labels`) and the split (``config.test_size``,
      ``config.split_seed``; or the split of ``target_model``), which must hold out something;
    - each target: a class of the data, with at least :data:`MIN_TARGET_SAMPLES` training
      samples, and (``train_on="non-target"``) at least as many training samples of the other
      classes for its generator to perturb;
    - the bundles' names: valid, one per target, no two alike;
    - with ``out`` (a models folder), that every bundle can be saved there
      (:func:`check_out`): a folder that is (or can be made) writable, and no bundle of the
      same name unless ``overwrite``.

    ``targets=None`` means every class (``tspg-train --all-targets``): a class that cannot be
    a target is then *skipped*, with a warning naming it and why (it still takes part in the
    target model and as a source class), and only a run left with no target is refused. A
    target named in ``targets`` is never skipped: it is refused (UserError) before training.

    Returns
    -------
    The :class:`RunPlan`: the targets to train and their names, the classes skipped and why.
    """
    config = config or TrainConfig()
    if target_model is not None:
        config = reused_config(config, target_model)
    dataset = _dataset_name(adata, dataset)
    validate_labels(adata, label_key, source=dataset)
    labels = adata.obs[label_key].astype(str).to_numpy()
    classes, train_idx, test_idx = split_samples(
        labels,
        list(adata.obs_names),
        test_size=config.test_size,
        seed=config.split_seed,
        reuse=target_model,
        dataset=dataset,
    )
    n_train = {c: 0 for c in classes}
    n_all = dict(n_train)
    for c, n in zip(*np.unique(labels[train_idx], return_counts=True), strict=True):
        n_train[str(c)] = int(n)
    in_split = labels[np.concatenate([train_idx, test_idx])]  # (a reused split may leave some out)
    for c, n in zip(*np.unique(in_split, return_counts=True), strict=True):
        n_all[str(c)] = int(n)
    asked = bool(targets)
    candidates = list(targets) if asked else list(classes)
    for t in candidates:
        if t not in n_train:
            raise UserError(
                f"target class {t!r} is not among the {len(classes)} classes of {label_key!r}: {', '.join(classes)}"
            )
    if names is not None and len(names) != len(candidates):
        raise UserError(f"{len(names)} bundle name(s) for {len(candidates)} target(s)")
    names = list(names) if names else default_names(dataset, candidates)
    how_split = (
        f"the split of {target_model.name!r}"
        if target_model is not None
        else f"--test-size {config.test_size:g}"
    )
    keep, skipped = [], {}
    for t, name in zip(candidates, names, strict=True):
        why = _target_problem(t, n_train, n_all, config, how_split)
        if why is None:
            keep.append((t, name))
        elif asked:
            raise UserError(f"{dataset}: class {t!r} cannot be a target: {why}")
        else:
            skipped[t] = why
    if not keep:
        first = next(iter(skipped))
        more = f" (and {len(skipped) - 1} more class(es) alike)" if len(skipped) > 1 else ""
        raise UserError(
            f"{dataset}: no class can be a target; class {first!r}: {skipped[first]}{more}"
        )
    for t, why in skipped.items():
        logger.warning("%s: no generator for class %r (skipped): %s", dataset, t, why)
    seen: dict[str, str] = {}
    for t, name in keep:
        if name in seen:
            raise UserError(
                f"classes {seen[name]!r} and {t!r} would both be saved as bundle {name!r}: "
                "train them one at a time with --name"
            )
        seen[name] = t
    root = None if out is None else check_out(out, [name for _, name in keep], overwrite=overwrite)
    return RunPlan(
        dataset,
        classes,
        [t for t, _ in keep],
        [name for _, name in keep],
        skipped,
        n_train,
        root,
    )


def _target_problem(
    t: str, n_train: dict, n_all: dict, config: TrainConfig, how_split: str
) -> str | None:
    """Why class ``t`` cannot be a target (None: it can)."""
    need = MIN_TARGET_SAMPLES
    n_tr, n = n_train[t], n_all[t]
    if n_tr < need:
        if n_tr < n:
            return (
                f"it keeps {n_tr} of its {n} samples for training, the others are held out "
                f"({how_split}); a generator needs at least {need}"
            )
        return (
            f"it has only {n} sample{'' if n == 1 else 's'}; a generator needs at least {need} "
            "training samples of its target class"
        )
    n_src = sum(n_train.values()) - n_tr
    if config.train_on == "non-target" and n_src < need:
        return (
            f"only {n_src} training sample(s) of the other classes are left for its generator "
            f"to perturb; at least {need} are needed"
        )
    return None


def check_out(out: str | Path | None, names: list[str], *, overwrite: bool = False) -> Path:
    """The models folder ``out`` (``tspg.bundle.models_dir``), checked so that bundles
    ``names`` can be saved in it at the end of a run: it is a folder, or can be made one;
    it is writable (a probe folder is made there, or in its nearest existing parent, and
    removed at once); no bundle of those names exists, unless ``overwrite``
    (:func:`tspg.bundle.check_destination`). Nothing else is written.
    """
    root = models_dir(out)
    here = Path(os.path.abspath(root))
    existing = next(p for p in (here, *here.parents) if os.path.lexists(p))
    if not existing.is_dir():
        shown = root if existing == here else existing
        what = "is a file" if existing.is_file() else "is not a folder"
        raise UserError(f"{one_line(shown)}: {what}; the bundles go into a folder (--out)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tspg-write-check-", dir=existing))
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise UserError(
            f"{one_line(root)}: cannot write bundles here ({why[:1].lower() + why[1:]})"
        ) from None
    for name in names:
        check_destination(root, name, overwrite=overwrite)
    return root


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
    compile: bool = False,
) -> torch.nn.Module:
    """Train the target model f on the training split of ``prep``; returns it in eval mode.

    ``X_train``: the training rows, dense or CSR (default: taken from ``prep``);
    ``compile``: run the network through ``torch.compile`` (plain torch where that fails).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if X_train is None:
        X_train = prep.X[prep.train_idx]
    return fit_target(
        X_train,
        prep.y[prep.train_idx],
        len(prep.classes),
        config,
        device=dev,
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
    n_top_genes: int | None = None,
    layer: str | None = None,
    dataset: str | None = None,
    target_model: Bundle | None = None,
    device: str = "auto",
    name: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    compile: bool = False,
) -> Bundle:
    """Train a TSPG generator for ``target`` on a labelled AnnData; returns the bundle
    (saved when ``out`` is given).

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
    out, overwrite
        A models folder to save the bundle into (checked before training, see
        :func:`check_run`); replace a bundle of the same name only with ``overwrite``.
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
        n_top_genes=n_top_genes,
        layer=layer,
        dataset=dataset,
        target_model=target_model,
        device=device,
        names=[name] if name else None,
        out=out,
        overwrite=overwrite,
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
    n_top_genes: int | None = None,
    layer: str | None = None,
    dataset: str | None = None,
    target_model: Bundle | None = None,
    device: str = "auto",
    names: list[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_bundle: Callable[[Bundle], None] | None = None,
    compile: bool = False,
) -> list[Bundle]:
    """Train one generator per target class (all classes by default), sharing one target model.

    Everything that could stop the run after its first epoch is checked before it
    (:func:`check_run`): with ``targets=None`` a class that cannot be a target (too few
    training samples) is skipped with a warning; a target named in ``targets`` is refused.
    With ``out`` (a models folder), each bundle is saved there as soon as its generator is
    trained, so a later failure loses none of the bundles that finished; ``on_bundle`` is
    called with each bundle once it is trained (and saved). The parameters are
    :func:`train`'s; ``names`` gives one bundle name per target.
    """
    plan = check_run(
        adata,
        label_key=label_key,
        targets=targets,
        config=config,
        dataset=dataset,
        target_model=target_model,
        names=names,
        out=out,
        overwrite=overwrite,
    )
    config = config or TrainConfig()
    if target_model is not None:
        config = reused_config(config, target_model)
    dev = resolve_device(device)
    check_precision(config, dev)
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
    targets, names = plan.targets, plan.names

    start = time.perf_counter()
    X_train = prep.X[prep.train_idx]  # one copy (dense or CSR), shared by every fit
    if target_model is not None:
        f = target_model.target_model.to(dev)
        target_seconds = 0.0
    else:
        f = fit_target_model(
            prep, config, device=dev, X_train=X_train, progress=progress, compile=compile
        )
        target_seconds = time.perf_counter() - start
    bundles: list[Bundle] = []
    for t_name, bname in zip(targets, names, strict=True):
        try:
            bundle = train_generator(
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
                compile=compile,
            )
            if plan.out is not None:
                save_bundle(bundle, plan.out, overwrite=overwrite)
        except UserError as err:
            raise UserError(_failed_target(t_name, err, bundles, plan.out)) from err
        bundles.append(bundle)
        if on_bundle is not None:
            on_bundle(bundle)
    return bundles


def _failed_target(target: str, err: UserError, done: list[Bundle], out: Path | None) -> str:
    """The message of a run stopped at ``target``: which target, why, and what is kept."""
    kept = ""
    if done and out is not None:
        kept = (
            f" (the {len(done)} bundle(s) trained before it are saved in {one_line(out)}: "
            f"{', '.join(b.name for b in done)})"
        )
    return f"generator for class {target!r}: {err}{kept}"


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
    compile: bool = False,
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
    compile
        Run the networks through ``torch.compile`` (plain torch where that fails).

    Returns
    -------
    An unsaved :class:`~tspg.bundle.Bundle`, its held-out metrics in ``metrics`` and its
    verdict in ``manifest["verdict"]``.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    t = prep.class_index(target)
    tr = prep.train_idx
    if X_train is None:
        X_train = prep.X[tr]
    seeds = config.member_seeds()
    fits, member_metrics = [], []
    for i, seed in enumerate(seeds):
        which = f" ({i + 1}/{len(seeds)})" if len(seeds) > 1 else ""
        try:
            fit = fit_generator(
                X_train,
                prep.y[tr],
                t,
                target_model,
                replace(config, seed=seed),
                device=dev,
                callback=_stage(progress, f"generator {target}{which}"),
                compile=compile,
            )
        except UserError as err:
            if len(seeds) == 1:
                raise
            raise UserError(f"generator {i + 1} of {len(seeds)} (seed {seed}): {err}") from err
        fits.append(fit)
    f = target_model.cpu().eval()
    generators = [fit.generator.cpu().eval() for fit in fits]
    G = generators[0] if len(generators) == 1 else GeneratorEnsemble(generators).eval()
    metrics = heldout_metrics(prep, f, G, t)
    if len(fits) > 1:
        for fit in fits:
            m = heldout_metrics(prep, f, fit.generator, t)
            m.update(train_seconds_generator=fit.seconds, train_steps_generator=fit.steps)
            member_metrics.append(m)
        metrics["members"] = member_summary(member_metrics)
    metrics.update(
        train_seconds_target_model=target_seconds,
        train_seconds_generator=sum(fit.seconds for fit in fits),
        train_steps_generator=sum(fit.steps for fit in fits),
        history_steps_per_point=fits[0].steps_per_point,
        device=str(dev),
        threads=torch.get_num_threads(),
        # which library multiplied the wide layers on the CPU: the result depends on it
        matmul="onednn" if dev.type == "cpu" and (uses_onednn(f) or uses_onednn(G)) else "torch",
    )
    fit = fits[0]
    ensemble = {}
    if len(fits) > 1:
        ensemble["generators"] = [
            {
                "seed": seed,
                "file": "generator.safetensors" if i == 0 else f"generator-{i}.safetensors",
                "discriminator": (
                    "discriminator.safetensors" if i == 0 else f"discriminator-{i}.safetensors"
                ),
                "metrics": {k: v for k, v in m.items() if k != "perturbation_accuracy_by_source"},
                "history": fit_i.history,
            }
            for i, (seed, m, fit_i) in enumerate(zip(seeds, member_metrics, fits, strict=True))
        ]
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
        **ensemble,
    )
    discs = [fit_i.discriminator.cpu().eval() for fit_i in fits]
    bundle = Bundle(manifest, G, discs[0], f, discriminators=discs if len(discs) > 1 else None)
    _store_verdict(bundle, prep)
    return bundle


# the member figures summarised by min / median / max in an ensemble's metrics["members"]
MEMBER_FIGURES = (
    "perturbation_accuracy",
    "perturbation_accuracy_non_target",
    "train_seconds_generator",
)


def member_summary(member_metrics: list[dict]) -> dict:
    """``{figure: {"min", "median", "max"}}`` over an ensemble's members (figures they all have)."""
    out = {}
    for key in MEMBER_FIGURES:
        values = [m.get(key) for m in member_metrics]
        if all(v is not None for v in values):
            a = np.asarray(values, dtype=float)
            out[key] = {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}
    return out


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
