"""Sweeps: every target x every gene set, one generator per task, on Dask.

The paper's Table 1 trains a generator for each of MSigDB's 50 Hallmark gene sets towards
chosen targets. :func:`sweep` runs such a grid on ``dask.distributed``: one target model per
gene set (a task), shared by that gene set's generators (one task each, depending on it).
It runs on a local Dask cluster by default, on an existing scheduler, or on a batch cluster
(SLURM, PBS, SGE, LSF) through ``dask-jobqueue``; Dask is the optional extra
``pip install "tspg[sweep]"``. The module itself can be called: ``tspg.sweep(adata, ...)``
is :func:`sweep`.

How the data travel: the client reads the GEM once, cuts out each gene set's columns and
writes them as a small ``.h5ad`` into a staging folder inside the output folder; the task
that trains the gene set's target model reads that file (the output folder must be on a
file system every worker sees, as the bundles are written there anyway). The gene set's
prepared, scaled data and its target model then reach its generator tasks as a Dask result
(once per worker). Unlike data scattered into worker memory, a file survives a worker's
death, so Dask can rerun any task of the graph on another worker.

Resumable: a finished bundle is its own record (written atomically by
:func:`tspg.bundle.save_bundle`), so a rerun skips every bundle that exists with the same
genes, target, data and settings, and a gene set with some finished bundles reuses their
target model. A task whose input or settings are at fault (a ``UserError``) is recorded
with its error; any other exception is retried by Dask (``retries``), then recorded and
logged with its traceback, and a task whose worker dies is rerun on another worker; no task ever leaves a half bundle. The results table
(:data:`RESULTS_CSV`, and :data:`RESULTS_PARQUET` when pyarrow is installed) lies beside the
bundles; :func:`read_results` reads it.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from .bundle import check_weights, clean_leftovers, models_dir, read_manifest, slug
from .config import TrainConfig
from .data import dataset_fingerprint, gene_matrix, validate_labels
from .errors import UserError
from .genesets import GeneSelection, match_gene_set, read_gene_sets

__all__ = [
    "COLUMNS",
    "GeneSet",
    "JOBQUEUES",
    "RESULTS_CSV",
    "RESULTS_PARQUET",
    "STATUSES",
    "TargetModelFailure",
    "TargetModelResult",
    "bundle_name",
    "jobqueue_cluster",
    "local_cluster",
    "quiet_dask",
    "read_gene_set_files",
    "read_results",
    "sweep",
    "sweep_genes_df",
    "sweep_summaries",
    "train_generator_task",
    "train_target_model_task",
    "usable_cores",
    "write_results",
]

logger = logging.getLogger(__name__)

RESULTS_CSV = "sweep.csv"
RESULTS_PARQUET = "sweep.parquet"
JOBQUEUES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
STATUSES = ("trained", "skipped", "failed")  # skipped: finished by an earlier run
_GENE_SEP = ";"  # how the top-gene lists are joined in the results files

# The results table: one row per gene set x target.
COLUMNS = [
    "dataset",  # the GEM's name
    "gene_set",
    "genes",  # genes of the set found in the GEM (the generator's inputs)
    "genes_requested",  # genes the set lists
    "target",
    "status",  # trained (this run), skipped (finished earlier), failed
    "bundle",  # the bundle's folder name in the output folder
    "target_model_accuracy",  # held-out accuracy of the gene set's target model
    "perturbation_accuracy",  # held-out samples f labels the target after perturbation
    "perturbation_accuracy_non_target",  # the same, non-target samples only
    "verdict",  # the bundle's trust verdict (ok / caution / fail), empty if it has none
    # energy distances to the real held-out target samples, from the verdict's realism check:
    "e_distance",  # of x_adv of the held-out non-target samples
    "e_distance_unperturbed",  # of their x: how far they started
    "e_distance_mean_shift",  # of the mean-shift baseline: how near a trivial move gets
    "top_up",  # consensus top-k raised genes of the held-out non-target samples
    "top_down",  # consensus top-k lowered genes
    "wall_seconds",  # the generator task's wall time (training, metrics)
    "target_model_seconds",  # training time of the shared target model (0 when reused)
    "worker",  # Dask worker address that trained the generator
    "host",
    "device",
    "error",  # why it failed (empty otherwise)
]
_NUMERIC = [
    "genes",
    "genes_requested",
    "target_model_accuracy",
    "perturbation_accuracy",
    "perturbation_accuracy_non_target",
    "e_distance",
    "e_distance_unperturbed",
    "e_distance_mean_shift",
    "wall_seconds",
    "target_model_seconds",
]

# progress(row, counts): row None once the tasks are submitted, then each finished
# generator's row; counts holds trained, failed and total (the generators this run trains)
SweepProgress = Callable[[dict, dict], None]


# ----------------------------------------------------------------------------- gene sets


@dataclass(frozen=True)
class GeneSet:
    """A named gene set as listed (its genes are matched to the GEM when the sweep starts)."""

    name: str
    genes: tuple[str, ...]
    source: str | None = None  # the file it was read from


def read_gene_set_files(
    paths: Sequence[str | Path],
    *,
    names: Sequence[str] | None = None,
    min_genes: int | None = None,
    max_genes: int | None = None,
    gem_genes: Sequence[str] | None = None,
) -> list[GeneSet]:
    """Read the gene sets of GMT and reference-format list files, with filters.

    Parameters
    ----------
    paths
        GMT files (``.gmt``) and the reference implementation's list files (any other
        suffix), read by :func:`tspg.genesets.read_gene_sets`. A set name must be unique
        over all files.
    names
        Keep the sets whose name matches one of these (exact, or a shell pattern such as
        ``HALLMARK_*``); a name or pattern that matches nothing is an error.
    min_genes, max_genes
        Keep the sets with at least / at most this many genes; counted among ``gem_genes``
        when given (the genes a generator would see), else as listed.
    gem_genes
        The GEM's genes (``adata.var_names``).

    Returns
    -------
    The sets in file order.
    """
    if not paths:
        raise UserError("give at least one gene-set file")
    sets: list[GeneSet] = []
    where: dict[str, Path] = {}
    for path in paths:
        path = Path(path)
        for name, genes in read_gene_sets(path).items():
            if name in where:
                raise UserError(f"{path}: gene set {name!r} is also in {where[name]}")
            where[name] = path
            sets.append(GeneSet(name, tuple(genes), str(path.resolve())))
    if names:
        unmatched = [p for p in names if not any(fnmatch.fnmatchcase(s.name, p) for s in sets)]
        if unmatched:
            shown = ", ".join(s.name for s in sets[:10]) + (" ..." if len(sets) > 10 else "")
            raise UserError(f"no gene set is named {unmatched[0]!r} (sets: {shown})")
        sets = [s for s in sets if any(fnmatch.fnmatchcase(s.name, p) for p in names)]
    if min_genes is not None or max_genes is not None:
        gem = set(map(str, gem_genes)) if gem_genes is not None else None
        lo, hi = min_genes or 0, math.inf if max_genes is None else max_genes
        size = {s.name: len(gem.intersection(s.genes)) if gem else len(s.genes) for s in sets}
        kept = [s for s in sets if lo <= size[s.name] <= hi]
        if len(kept) < len(sets):
            logger.info(
                "%d of %d gene sets left out by size (%s to %s genes%s)",
                len(sets) - len(kept),
                len(sets),
                lo,
                "any" if max_genes is None else hi,
                " in the GEM" if gem else "",
            )
        sets = kept
    if not sets:
        raise UserError("no gene set is left after the name and size filters")
    return sets


def _gene_sets(gene_sets, gem_genes) -> list[GeneSet]:
    if gene_sets is None:
        return [GeneSet("all", tuple(map(str, gem_genes)))]
    if isinstance(gene_sets, Mapping):
        gene_sets = [GeneSet(str(k), tuple(v)) for k, v in gene_sets.items()]
    sets = list(gene_sets)
    if not sets:
        raise UserError("no gene set given")
    seen: set[str] = set()
    for s in sets:
        if not isinstance(s, GeneSet):
            raise TypeError(f"gene_sets: expected GeneSet items, got {type(s).__name__}")
        if s.name in seen:
            raise UserError(f"gene set {s.name!r} is given twice")
        seen.add(s.name)
    return sets


# ----------------------------------------------------------------------------- the plan


@dataclass
class _SetPlan:
    """One gene set of the grid: its genes in the GEM, its bundles, and what is left to train."""

    gene_set: GeneSet
    names: dict[str, str]  # target -> bundle name
    selection: GeneSelection | None = None
    error: str | None = None  # why the set cannot be trained at all
    fingerprint: str | None = None
    finished: dict[str, dict] | None = None  # target -> manifest of its finished bundle

    @property
    def todo(self) -> list[str]:
        if self.error:
            return []
        return [t for t in self.names if t not in (self.finished or {})]


def bundle_name(dataset: str, gene_set: str, target: str) -> str:
    """A sweep's bundle name: ``<dataset>-<gene set>-<target>`` as a folder-safe slug."""
    return f"{slug(dataset)}-{slug(gene_set)}-{slug(target)}"


def _finished_bundle(
    path: Path, *, target: str, genes: list[str], fp: str, config: TrainConfig
) -> dict | None:
    """The manifest of the bundle at ``path`` when it is this grid point, finished; None when
    there is none; UserError when another bundle holds the name (so nothing is lost)."""
    if not path.exists():
        return None
    hint = "pass overwrite=True (--overwrite) to retrain it, or write elsewhere (--out)"
    try:
        manifest = read_manifest(path)
        check_weights(path, manifest)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: exists but is not a readable bundle ({err}); {hint}") from None
    problem = None
    if manifest["target"] != target:
        problem = f"target {manifest['target']!r}, not {target!r}"
    elif list(manifest["genes"]) != list(genes):
        problem = f"other genes ({len(manifest['genes'])}, not these {len(genes)})"
    elif manifest["dataset"].get("fingerprint") != fp:
        problem = f"a model of other data (dataset {manifest['dataset'].get('name')!r})"
    else:
        try:
            old = TrainConfig.from_dict(manifest["config"]).to_dict()
        except ValueError as err:
            old = {"config": str(err)}
        new = config.to_dict()
        diff = next((k for k in new if old.get(k) != new[k]), None)
        if diff:
            problem = f"other settings ({diff} = {old.get(diff)!r}, not {new[diff]!r})"
    if problem:
        raise UserError(f"{path}: a bundle of that name holds {problem}; {hint}")
    return manifest


def _plan(
    adata: ad.AnnData,
    gene_sets: list[GeneSet],
    *,
    targets: list[str],
    label_key: str,
    dataset: str,
    layer: str | None,
    config: TrainConfig,
    out: Path,
    overwrite: bool,
) -> list[_SetPlan]:
    """Match every set to the GEM, name its bundles and find those already finished."""
    plans, owner = [], {}
    for gs in gene_sets:
        names = {t: bundle_name(dataset, gs.name, t) for t in targets}
        for t, name in names.items():
            if name in owner and owner[name] != (gs.name, t):
                other = owner[name]
                raise UserError(
                    f"gene set {gs.name!r} / target {t!r} and gene set {other[0]!r} / target {other[1]!r} "
                    f"would share the bundle name {name!r}; rename one of the gene sets"
                )
            owner[name] = (gs.name, t)
        plan = _SetPlan(gs, names, finished={})
        plans.append(plan)
        try:
            plan.selection = match_gene_set(gs.name, gs.genes, adata.var_names, source=gs.source)
        except UserError as err:
            plan.error = str(err)
            continue
        plan.fingerprint = dataset_fingerprint(
            adata, plan.selection.genes, layer=layer, source=dataset
        )
        if not overwrite:
            for t, name in names.items():
                manifest = _finished_bundle(
                    out / name,
                    target=t,
                    genes=plan.selection.genes,
                    fp=plan.fingerprint,
                    config=config,
                )
                if manifest is not None:
                    plan.finished[t] = manifest
    return plans


# ----------------------------------------------------------------------------- rows


def _row(**values) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(values)
    return row


def _row_from_manifest(manifest: dict, *, status: str) -> dict:
    """The results row of a finished bundle, read from its manifest alone."""
    metrics, info = manifest.get("metrics") or {}, manifest.get("sweep") or {}
    verdict = manifest.get("verdict")
    realism = _verdict_figures(verdict, "realism")
    return _row(
        dataset=manifest["dataset"].get("name"),
        gene_set=manifest["gene_set"]["name"],
        genes=len(manifest["genes"]),
        genes_requested=manifest["gene_set"].get("n_requested"),
        target=manifest["target"],
        status=status,
        bundle=manifest["name"],
        target_model_accuracy=metrics.get("target_model_accuracy"),
        perturbation_accuracy=metrics.get("perturbation_accuracy"),
        perturbation_accuracy_non_target=metrics.get("perturbation_accuracy_non_target"),
        verdict=verdict.get("level", "") if isinstance(verdict, dict) else "",
        e_distance=realism.get("perturbed"),
        e_distance_unperturbed=realism.get("unperturbed"),
        e_distance_mean_shift=realism.get("mean_shift"),
        top_up=_GENE_SEP.join(info.get("top_up", [])),
        top_down=_GENE_SEP.join(info.get("top_down", [])),
        wall_seconds=info.get("wall_seconds"),
        target_model_seconds=metrics.get("train_seconds_target_model"),
        worker=info.get("worker", ""),
        host=info.get("host", ""),
        device=metrics.get("device", ""),
        error="",
    )


def _verdict_figures(verdict, check: str) -> dict:
    """{figure: value} of one check of a manifest's verdict ({} when there is none)."""
    try:
        figures = verdict["checks"][check]["figures"]
        return {k: f.get("value") for k, f in figures.items() if isinstance(f, dict)}
    except (KeyError, TypeError):
        return {}


def _failed_row(plan: _SetPlan, target: str, error: str, dataset: str, **extra) -> dict:
    sel = plan.selection
    return _row(
        dataset=dataset,
        gene_set=plan.gene_set.name,
        genes=len(sel.genes) if sel else 0,
        genes_requested=len(plan.gene_set.genes),
        target=target,
        status="failed",
        bundle=plan.names[target],
        verdict="",
        top_up="",
        top_down="",
        error=error,
        **extra,
    )


def _error_text(err: BaseException) -> str:
    """One line: the message of a user error, else the exception's type and message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, UserError):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ----------------------------------------------------------------------------- the tasks


def usable_cores() -> int:
    """CPU cores this process may use (its affinity mask, which batch systems set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _worker() -> tuple[str, int]:
    """(address, task slots) of the Dask worker running this task; ("local", 1) outside one."""
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):
        return "local", 1
    return str(w.address), int(w.state.nthreads)


def _use_threads(threads: int | None) -> int:
    """Set torch's thread count for this task: ``threads``; else what the worker's environment
    says (``OMP_NUM_THREADS``, which Dask's nanny sets to 1), else the cores per task slot."""
    import torch

    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else None
        threads = threads or max(1, usable_cores() // _worker()[1])
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@dataclass
class TargetModelResult:
    """What a gene set's generator tasks receive: the prepared data and the target model."""

    prep: Any  # tspg.pipeline.Prepared
    target_model: Any  # torch.nn.Module, on the CPU
    config: TrainConfig
    seconds: float
    reused_from: str | None  # bundle whose target model is reused, if any


@dataclass
class TargetModelFailure:
    """A gene set whose target model could not be trained (its generators fail with it)."""

    error: str


def train_target_model_task(
    data_file: str,
    selection: GeneSelection,
    *,
    label_key: str,
    dataset: str,
    config: TrainConfig,
    device: str,
    threads: int | None,
    reuse: str | None = None,
) -> TargetModelResult | TargetModelFailure:
    """A Dask task: read a gene set's slice of the GEM, split, scale and train its target model.

    With ``reuse`` (the path of a finished bundle of this gene set), that bundle's target
    model, split and scaler are taken instead, so all bundles of a gene set share one
    target model across reruns. A :class:`~tspg.errors.UserError` (the data or settings at
    fault) comes back as a :class:`TargetModelFailure`; any other exception is raised, for
    Dask to retry and then report with its traceback.
    """
    from .bundle import load_bundle
    from .pipeline import fit_target_model, prepare, reused_config, verdict_classifiers

    try:
        _use_threads(threads)
        adata = ad.read_h5ad(data_file)
        start = time.perf_counter()
        if reuse:
            bundle = load_bundle(reuse)
            prep = prepare(adata, label_key=label_key, dataset=dataset, reuse=bundle)
            verdict_classifiers(prep)
            return TargetModelResult(
                prep, bundle.target_model.cpu(), reused_config(config, bundle), 0.0, bundle.name
            )
        prep = prepare(
            adata,
            label_key=label_key,
            genes=selection,
            test_size=config.test_size,
            seed=config.split_seed,
            dataset=dataset,
        )
        f = fit_target_model(prep, config, device=device)
        seconds = time.perf_counter() - start
        verdict_classifiers(prep)  # fit once here, shared by the gene set's generator tasks
        return TargetModelResult(prep, f.cpu(), config, seconds, None)
    except UserError as err:
        return TargetModelFailure(_error_text(err))


def sweep_summaries(bundle, prep, *, k: int = 20) -> dict:
    """The consensus top-``k`` raised and lowered genes (``top_up`` / ``top_down``) of the
    held-out non-target samples of a freshly trained bundle (empty lists when there are
    none); on the same seeded subsample of at most
    :data:`tspg.pipeline.HELDOUT_MAX_SAMPLES` held-out samples as its metrics.
    """
    from .data import subsample
    from .perturbation import consensus_top, generate_perturbed
    from .pipeline import HELDOUT_MAX_SAMPLES

    t = prep.class_index(bundle.target)
    test = prep.test_idx[subsample(prep.y[prep.test_idx], HELDOUT_MAX_SAMPLES, seed=0)]
    src = test[prep.y[test] != t]
    if not len(src):
        return {"top_up": [], "top_down": []}
    X = prep.X[src]
    P, _ = generate_perturbed(bundle.generator, X.toarray() if hasattr(X, "toarray") else X)
    top = consensus_top(P, prep.genes, k=k)
    return {"top_up": top["up"], "top_down": top["down"]}


def train_generator_task(
    tm: TargetModelResult | TargetModelFailure,
    *,
    target: str,
    name: str,
    out: str,
    device: str,
    threads: int | None,
    k: int = 20,
    overwrite: bool = False,
) -> dict:
    """A Dask task: train one generator against its gene set's target model and save the bundle.

    Returns the bundle's results row. A :class:`~tspg.errors.UserError` comes back as a
    failed row; any other exception is raised, for Dask to retry and then report with its
    traceback. A bundle this grid point already has
    (its task ran before its worker died) is not trained twice.
    """
    from .bundle import save_bundle
    from .pipeline import train_generator

    start = time.perf_counter()
    worker, _ = _worker()
    where = dict(worker=worker, host=socket.gethostname())
    if isinstance(tm, TargetModelFailure):
        return _row(status="failed", error=f"target model: {tm.error}", **where)
    prep = tm.prep
    try:
        if not overwrite:
            done = _finished_bundle(
                Path(out) / name,
                target=target,
                genes=prep.genes,
                fp=prep.fingerprint,
                config=tm.config,
            )
            if done is not None:
                return _row_from_manifest(done, status="trained")
        _use_threads(threads)
        bundle = train_generator(
            prep,
            copy.deepcopy(tm.target_model),  # tasks on one worker share the result object
            target=target,
            config=tm.config,
            name=name,
            device=device,
            target_seconds=tm.seconds,
            target_model_from=tm.reused_from,
        )
        info = sweep_summaries(bundle, prep, k=k)
        info.update(where, wall_seconds=time.perf_counter() - start)
        bundle.manifest["sweep"] = info
        save_bundle(bundle, out, overwrite=overwrite)
        return _row_from_manifest(bundle.manifest, status="trained")
    except UserError as err:
        wall = time.perf_counter() - start
        return _row(status="failed", error=_error_text(err), wall_seconds=wall, **where)


# ----------------------------------------------------------------------------- clusters


def _require_distributed():
    try:
        import distributed
    except ImportError as err:
        raise UserError(
            'sweeps run on Dask, which is not installed: pip install "tspg[sweep]"'
        ) from err
    return distributed


def quiet_dask() -> None:
    """Keep Dask's own log lines (cluster start and stop) out of a command's output: warnings
    and errors only, and not the nanny's note that it stopped a slow-closing worker."""
    try:
        import distributed  # noqa: F401  (it sets its loggers' levels when imported)
    except ImportError:
        return
    logging.getLogger("distributed").setLevel(logging.WARNING)
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)


def jobqueue_cluster(kind: str, **options):
    """A dask-jobqueue cluster object (SLURM, PBS, SGE or LSF) from Dask's configuration.

    ``options`` override the configuration's ``jobqueue.<kind>`` section (usually set in
    ``~/.config/dask/jobqueue.yaml``; see the README). Building the object submits no job:
    that happens on ``cluster.scale(jobs=N)``; ``cluster.job_script()`` shows the script.
    """
    if kind not in JOBQUEUES:
        raise UserError(f"unknown job queue {kind!r}; choose one of {', '.join(JOBQUEUES)}")
    _require_distributed()
    try:
        import dask_jobqueue
    except ImportError as err:
        raise UserError(
            f'--jobqueue {kind} needs dask-jobqueue: pip install "tspg[sweep]"'
        ) from err
    try:
        return getattr(dask_jobqueue, JOBQUEUES[kind])(**options)
    except (ValueError, RuntimeError) as err:  # no cores or memory set, no such interface
        line = " ".join(str(err).split())  # one line
        raise UserError(
            f"--jobqueue {kind}: {line} (set jobqueue.{kind} in ~/.config/dask/jobqueue.yaml)"
        ) from err


def local_cluster(workers: int | None = None, threads: int | None = None, *, gpu: bool = False):
    """A local Dask cluster of worker processes, one task at a time each.

    ``workers`` defaults to the usable cores divided by ``threads`` (default 1), so that
    workers x threads <= cores; each task sets torch to ``threads`` threads. Returns
    ``(cluster, threads)``.
    """
    distributed = _require_distributed()
    cores = usable_cores()
    threads = threads or (max(1, cores // workers) if workers else 1)
    workers = workers or max(1, cores // threads)
    if workers * threads > cores:
        logger.warning(
            "%d workers x %d threads is more than the %d cores: they will compete",
            workers,
            threads,
            cores,
        )
    cluster = distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,  # one task per worker process; torch gets `threads` threads
        processes=True,
        dashboard_address=":0",
        resources={"GPU": 1} if gpu else None,
    )
    return cluster, threads


@contextmanager
def _connect(
    *,
    client=None,
    scheduler: str | None,
    jobqueue: str | None,
    jobs: int,
    workers: int | None,
    threads: int | None,
    gpu: bool,
) -> Iterator[tuple[Any, int | None, str]]:
    """(client, torch threads per task or None, description) of the chosen Dask cluster."""
    distributed = _require_distributed()
    if client is not None:
        yield client, threads, f"the Dask cluster of {client.scheduler.address}"
        return
    if scheduler:
        try:
            c = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as err:
            raise UserError(f"--scheduler {scheduler}: cannot connect ({err})") from err
        with c:
            yield c, threads, f"the Dask scheduler at {scheduler}"
        return
    if jobqueue:
        cluster = jobqueue_cluster(jobqueue)
        with cluster, distributed.Client(cluster) as c:
            cluster.scale(jobs=jobs)
            yield c, threads, f"{jobs} {jobqueue} job(s) of dask-jobqueue"
        return
    cluster, threads = local_cluster(workers, threads, gpu=gpu)
    n = len(cluster.workers)
    with cluster, distributed.Client(cluster) as c:
        yield c, threads, f"a local Dask cluster of {n} workers x {threads} torch thread(s)"


def _check_gpu_workers(client) -> None:
    """Tasks asking for a GPU never run where no worker offers one: say so instead of waiting."""
    client.wait_for_workers(1)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not any((w.get("resources") or {}).get("GPU") for w in workers):
        raise UserError(
            "device cuda: no Dask worker offers a GPU resource; start each worker with "
            "--resources GPU=1 (dask worker ... --resources GPU=1)"
        )


# ----------------------------------------------------------------------------- the sweep


def sweep(
    adata: ad.AnnData,
    *,
    label_key: str,
    gene_sets: Sequence[GeneSet] | Mapping[str, Sequence[str]] | None = None,
    targets: Sequence[str] | Literal["all"] = "all",
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    dataset: str | None = None,
    layer: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    jobqueue: str | None = None,
    jobs: int = 1,
    client=None,
    retries: int = 1,
    tasks_per_gpu: int = 4,
    k: int = 20,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: SweepProgress | None = None,
) -> pd.DataFrame:
    """Train a generator for every gene set x target on Dask; write bundles and a results table.

    Parameters
    ----------
    adata
        Samples x genes, labels in ``obs[label_key]``.
    gene_sets
        :class:`GeneSet` items (:func:`read_gene_set_files` reads them from files) or a
        mapping name -> genes; default one set of all genes. A set none of whose genes are
        in the GEM is reported as failed; the others still run.
    targets
        ``"all"`` (every class) or a list of classes.
    config
        The settings of every target model and generator (default: the ``tspg+`` recipe).
    out
        The folder of the bundles and the results table (default ``$TSPG_MODELS_DIR`` or
        ``./models``); it must be on a file system every worker sees.
    dataset
        The data's name, in the bundle names (default: the imported file's name, or ``data``).
    layer
        Train on this layer instead of ``X``.
    device
        ``auto``, ``cpu``, ``cuda`` or ``mps``, resolved on each worker. With ``cuda`` every
        task asks Dask for ``1 / tasks_per_gpu`` of a ``GPU`` resource, so that many small
        generators share one GPU; the workers must offer it (``--resources GPU=1``).
    workers, threads
        The local cluster (the default): worker processes (default: cores / threads) and
        torch threads per task (default: cores / workers). With a scheduler, a job queue or
        a client, ``threads`` defaults to the worker's ``OMP_NUM_THREADS`` (Dask's nanny sets
        1), else its cores divided by its task slots.
    scheduler
        Address of a running Dask scheduler (``tcp://host:8786``) to run on instead.
    jobqueue, jobs
        Run on ``jobs`` batch jobs of a dask-jobqueue cluster (``slurm``, ``pbs``, ``sge``,
        ``lsf``) configured in Dask's configuration (:func:`jobqueue_cluster`).
    client
        A ``distributed.Client`` to use as it is (the caller closes it).
    retries
        How often Dask retries a task that raised anything but a ``UserError``. A task
        whose worker died is rerun elsewhere by the scheduler (Dask's
        ``distributed.scheduler.allowed-failures`` times) before it counts as failed.
    k
        Top genes per direction in the results table.
    overwrite
        Retrain every bundle, even finished ones (default: skip them).
    dry_run
        Plan only: return the table of what would run (status ``to train``), start nothing.
    progress
        Called as ``progress(None, counts)`` once the tasks are submitted, then after every
        finished generator as ``progress(row, counts)``; ``counts`` holds ``trained``,
        ``failed`` and ``total`` (the generators this run trains).

    Returns
    -------
    The results table (columns :data:`COLUMNS`, one row per gene set x target, ``status``
    trained / skipped / failed), also written to ``out/sweep.csv`` (and ``sweep.parquet``
    when pyarrow is installed) merged with the rows of earlier sweeps into the same folder
    that this one did not cover; ``attrs["path"]`` holds the CSV's path.
    """
    for option, value, low in (
        ("workers", workers, 1),
        ("threads", threads, 1),
        ("jobs", jobs, 1),
        ("tasks_per_gpu", tasks_per_gpu, 1),
        ("k", k, 1),
        ("retries", retries, 0),
    ):
        if value is not None and (isinstance(value, bool) or value < low):
            raise UserError(f"{option} must be at least {low}, got {value}")
    if sum(x is not None for x in (client, scheduler, jobqueue)) > 1:
        raise UserError("give one of a client, a scheduler or a job queue")
    if workers is not None and (client is not None or scheduler or jobqueue):
        raise UserError("workers sets the size of the local cluster: not with a scheduler")
    config = config or TrainConfig()
    dataset = dataset or adata.uns.get("tspg_import", {}).get("source") or "data"
    validate_labels(adata, label_key, source=dataset)
    classes = sorted(adata.obs[label_key].astype(str).unique())
    if isinstance(targets, str):
        if targets != "all":
            raise UserError(f"targets: give 'all' or a list of classes, not {targets!r}")
        targets = classes
    targets = list(dict.fromkeys(map(str, targets)))
    unknown = [t for t in targets if t not in classes]
    if unknown:
        raise UserError(
            f"target {unknown[0]!r} is not among the {len(classes)} classes of {label_key!r}: {', '.join(classes[:20])}"
        )
    root = models_dir(out)
    blocking = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{blocking}: is a file; the bundles go into a folder (out)")

    sets = _gene_sets(gene_sets, adata.var_names)
    plans = _plan(
        adata,
        sets,
        targets=targets,
        label_key=label_key,
        dataset=dataset,
        layer=layer,
        config=config,
        out=root,
        overwrite=overwrite,
    )
    rows: list[dict] = []
    for plan in plans:
        for t in plan.names:
            if plan.error:
                rows.append(_failed_row(plan, t, plan.error, dataset))
            elif t in plan.finished:
                rows.append(_row_from_manifest(plan.finished[t], status="skipped"))
    todo = [(plan, t) for plan in plans for t in plan.todo]
    logger.info(
        "sweep: %d gene sets x %d targets in %s: %d finished earlier, %d to train, %d failed before training",
        len(plans),
        len(targets),
        root,
        sum(r["status"] == "skipped" for r in rows),
        len(todo),
        sum(r["status"] == "failed" for r in rows),
    )
    if dry_run:
        planned = [_failed_row(p, t, "", dataset) | {"status": "to train"} for p, t in todo]
        return _table(rows + planned)
    try:
        if todo:
            root.mkdir(parents=True, exist_ok=True)
            obs = pd.DataFrame(
                {label_key: pd.Categorical(adata.obs[label_key].astype(str).to_numpy())},
                index=pd.Index(adata.obs_names.astype(str)),
            )
            _run(
                todo,
                adata,
                obs,
                rows,
                layer=layer,
                root=root,
                label_key=label_key,
                dataset=dataset,
                config=config,
                device=device,
                connect=dict(
                    client=client,
                    scheduler=scheduler,
                    jobqueue=jobqueue,
                    jobs=jobs,
                    workers=workers,
                    threads=threads,
                    gpu=device == "cuda",
                ),
                resources={"GPU": 1 / tasks_per_gpu} if device == "cuda" else None,
                retries=retries,
                k=k,
                overwrite=overwrite,
                progress=progress,
            )
    finally:  # also when interrupted: the table says what finished
        table = _table(rows)
        if len(table) and root.is_dir():
            table.attrs["path"] = write_results(table, root)
    n_failed = int((table["status"] == "failed").sum()) if len(table) else 0
    if n_failed:
        logger.warning(
            "%d of %d generators failed; the results table's error column says why",
            n_failed,
            len(table),
        )
    return table


def _run(
    todo: list[tuple[_SetPlan, str]],
    adata: ad.AnnData,
    obs: pd.DataFrame,
    rows: list[dict],
    *,
    layer: str | None,
    root: Path,
    label_key: str,
    dataset: str,
    config: TrainConfig,
    device: str,
    connect: dict,
    resources: dict | None,
    retries: int,
    k: int,
    overwrite: bool,
    progress: SweepProgress | None,
) -> None:
    """Submit the tasks of ``todo``; append a row per generator to ``rows`` as each finishes."""
    distributed = _require_distributed()
    staging = Path(tempfile.mkdtemp(prefix=".sweep-", dir=root))
    futures: dict = {}
    counts = {"trained": 0, "failed": 0, "total": len(todo)}
    try:
        plans = list(dict.fromkeys(plan.gene_set.name for plan, _ in todo))
        by_name = {plan.gene_set.name: plan for plan, _ in todo}
        with _connect(**connect) as (client, threads, what):
            logger.info("engine: %s", what)
            if resources:
                _check_gpu_workers(client)
            clean_leftovers(root)  # what killed saves of an earlier run left (never a bundle)
            run = uuid.uuid4().hex[:8]
            target_models = {}
            for set_name in plans:  # target models first: they unlock the generators
                plan = by_name[set_name]
                X = gene_matrix(adata, plan.selection.genes, layer=layer, source=dataset)
                data_file = _write_slice(staging, plan, X, obs)
                del X
                finished = next(iter(plan.finished.values()), None)
                target_models[set_name] = client.submit(
                    train_target_model_task,
                    str(data_file),
                    plan.selection,
                    label_key=label_key,
                    dataset=dataset,
                    config=config,
                    device=device,
                    threads=threads,
                    reuse=str(root / finished["name"]) if finished else None,
                    key=f"tspg-target-model-{slug(set_name)}-{run}",
                    retries=retries,
                    resources=resources,
                    priority=10,
                )
            for set_name in plans:
                plan = by_name[set_name]
                for t in plan.todo:
                    fut = client.submit(
                        train_generator_task,
                        target_models[set_name],
                        target=t,
                        name=plan.names[t],
                        out=str(root),
                        device=device,
                        threads=threads,
                        k=k,
                        overwrite=overwrite,
                        key=f"tspg-generator-{plan.names[t]}-{run}",
                        retries=retries,
                        resources=resources,
                    )
                    futures[fut] = (plan, t)
            del target_models  # the scheduler keeps each while its generators need it
            if progress:
                progress(None, dict(counts))
            try:
                for fut in distributed.as_completed(list(futures)):
                    plan, t = futures.pop(fut)
                    try:
                        row = fut.result()
                    except Exception as err:  # retries spent, or the workers running it died
                        _log_failure(fut, plan.names[t], err)
                        row = _failed_row(plan, t, _error_text(err), dataset)
                    if row["status"] == "failed":  # the plan knows the gene set's side
                        where = {c: row.get(c) for c in ("worker", "host", "wall_seconds")}
                        row = _failed_row(plan, t, row["error"], dataset, **where)
                    rows.append(row)
                    counts["trained" if row["status"] == "trained" else "failed"] += 1
                    fut.release()
                    if progress:
                        progress(row, dict(counts))
            except BaseException:  # interrupted: stop what has not finished
                client.cancel(list(futures))
                raise
        clean_leftovers(root)  # a worker killed while saving: its temporary folder
    finally:
        for plan, t in futures.values():  # interrupted: what never finished
            rows.append(
                _failed_row(plan, t, "the sweep stopped before this task finished", dataset)
            )
        shutil.rmtree(staging, ignore_errors=True)


def _log_failure(fut, name: str, err: BaseException) -> None:
    """A task that failed other than by a user error (a bug, a dying worker): its traceback,
    as the worker raised it, goes to the log, so a bug keeps it."""
    import traceback

    try:
        tb = fut.traceback()
    except Exception:  # no traceback kept (a cancelled task, a lost worker)
        tb = None
    text = "".join(traceback.format_exception(type(err), err, tb)) if tb else _error_text(err)
    logger.error("%s failed:\n%s", name, text.rstrip())


def _write_slice(staging: Path, plan: _SetPlan, X, obs: pd.DataFrame) -> Path:
    """Write a gene set's columns of the GEM (raw values, its genes only; sparse stays
    sparse) for its target-model task to read."""
    from .data import write_gem

    return write_gem(
        ad.AnnData(
            X=X,
            obs=obs,
            var=pd.DataFrame(index=pd.Index(plan.selection.genes, dtype=str)),
        ),
        staging / f"{slug(plan.gene_set.name)}.h5ad",
    )


# ----------------------------------------------------------------------------- results


def _table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    if len(table):
        table = table.sort_values(["gene_set", "target"], kind="stable", ignore_index=True)
    return table


def write_results(table: pd.DataFrame, folder: str | Path) -> Path:
    """Write the results table beside the bundles, merged with the earlier rows of bundles
    this table does not cover; returns the CSV's path (``sweep.parquet`` too with pyarrow)."""
    folder = Path(folder)
    table = table.reindex(columns=COLUMNS)
    try:
        old = read_results(folder, lists=False)
    except (FileNotFoundError, ValueError) as err:
        if not isinstance(err, FileNotFoundError):
            logger.warning("%s: replacing an unreadable results table (%s)", folder, err)
        old = None
    if old is not None and len(old):
        kept = old[~old["bundle"].isin(table["bundle"])]
        table = pd.concat([kept, table], ignore_index=True) if len(kept) else table
        table = _table(table.to_dict("records"))
    csv = folder / RESULTS_CSV
    _replace(csv, lambda tmp: table.to_csv(tmp, index=False))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (folder / RESULTS_PARQUET).unlink(missing_ok=True)  # never leave an older one beside
    else:
        _replace(folder / RESULTS_PARQUET, lambda tmp: _for_parquet(table).to_parquet(tmp))
    return csv


def _for_parquet(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    for c in COLUMNS:
        if c in _NUMERIC:
            table[c] = pd.to_numeric(table[c], errors="coerce").astype(float)
        else:
            table[c] = table[c].fillna("").astype(str)
    return table


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in its folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_results(folder: str | Path | None = None, *, lists: bool = True) -> pd.DataFrame:
    """The results table of the sweeps written into ``folder`` (default: the models folder).

    Reads ``sweep.parquet`` when pyarrow is installed, else ``sweep.csv``. One row per
    gene set x target, columns :data:`COLUMNS`; numbers as floats (NaN where a failed
    task has none), text as text (class and gene-set names stay text, "NA" included).
    With ``lists``, ``top_up`` and ``top_down`` are lists of genes.
    """
    folder = models_dir(folder)
    parquet, csv = folder / RESULTS_PARQUET, folder / RESULTS_CSV
    try:
        import pyarrow  # noqa: F401

        use_parquet = parquet.exists()
    except ImportError:
        use_parquet = False
    if use_parquet:
        table = pd.read_parquet(parquet)
        source = parquet
    elif csv.exists():
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
        source = csv
    else:
        raise FileNotFoundError(f"{folder}: no sweep results ({RESULTS_CSV})")
    missing = [c for c in ("gene_set", "target", "status", "bundle") if c not in table.columns]
    if missing:
        raise UserError(f"{source}: not a sweep results table (no column {missing[0]!r})")
    table = table.reindex(columns=COLUMNS)
    for c in COLUMNS:
        if c in _NUMERIC:
            table[c] = pd.to_numeric(table[c].replace("", np.nan), errors="coerce").astype(float)
        else:
            table[c] = table[c].fillna("").astype(str)
    if lists:
        for c in ("top_up", "top_down"):
            table[c] = [v.split(_GENE_SEP) if v else [] for v in table[c]]
    return table


def sweep_genes_df(results: pd.DataFrame) -> pd.DataFrame:
    """The top genes of a results table, one row per gene set, target, direction and rank.

    Columns ``gene_set``, ``target``, ``direction`` (up / down), ``rank`` (1 = most
    changed) and ``gene``: for counting how often a gene recurs across gene sets.
    """
    frames = []
    for d in ("up", "down"):
        col = results[f"top_{d}"].map(
            lambda v: v if isinstance(v, list) else (v.split(_GENE_SEP) if v else [])
        )
        long = pd.DataFrame(
            {"gene_set": results["gene_set"], "target": results["target"], "gene": col}
        ).explode("gene")
        long = long.dropna(subset=["gene"])
        long["direction"] = d
        long["rank"] = long.groupby(level=0).cumcount() + 1
        frames.append(long)
    out = pd.concat(frames, ignore_index=True)
    return out[["gene_set", "target", "direction", "rank", "gene"]]


class _SweepModule(types.ModuleType):
    """``tspg.sweep`` is this module and, called, :func:`sweep`: ``tspg.sweep(adata, ...)``
    runs a sweep, ``tspg.sweep.read_results(folder)`` reads one."""

    def __call__(self, *args, **kwargs) -> pd.DataFrame:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _SweepModule
