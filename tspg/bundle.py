"""Model bundles: one folder with ``manifest.json`` and three ``.safetensors`` files.

A bundle carries everything needed to perturb new data: genes (ordered), classes
(ordered), target, scaler, the split, the training config and seed, metrics and the loss
history. Saving writes a temporary folder and renames it into place (the folder's name
says which process writes it, so leftovers of a killed save can be cleaned safely), with
the modes the user's umask gives. Reading checks everything: the manifest's JSON and
schema (:mod:`tspg.manifest`), every tensor's name, shape, type and finiteness, and the
rule for links (every path read resolves inside the models folder); it never unpickles
anything. Listing checks the same as loading and never fails for one bad folder: it
lists it with the reason (:class:`BundleEntry`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .config import TrainConfig, config_argv
from .data import (
    GeneMatch,
    Scaler,
    align_genes,
    dataset_fingerprint,
    match_genes,
    missing_gene_fill,
    subsample,
)
from .datasets import DEMO_NAME
from .errors import UserError, one_line
from .manifest import (
    FORMAT_VERSION,
    ONE_GENERATOR_FORMAT,
    manifest_json,
    parse_manifest,
    validate_manifest,
)
from .nets import Discriminator, Generator, GeneratorEnsemble, TargetClassifier
from .perturbation import class_probabilities

logger = logging.getLogger(__name__)

__all__ = [
    "Bundle",
    "BundleEntry",
    "SampleChoice",
    "check_destination",
    "check_name",
    "check_weights",
    "chosen_samples",
    "list_bundles",
    "load_bundle",
    "manifest_summary",
    "member_files",
    "models_dir",
    "new_manifest",
    "read_manifest",
    "resolve_bundle",
    "save_bundle",
    "slug",
    "train_command",
]
WEIGHT_FILES = {
    "generator": "generator.safetensors",
    "discriminator": "discriminator.safetensors",
    "target_model": "target_model.safetensors",
}
DEFAULT_MODELS_DIR = "models"


def models_dir(path: str | Path | None = None) -> Path:
    """The bundle folder: ``path``, else ``$TSPG_MODELS_DIR``, else ``./models``."""
    return Path(path or os.environ.get("TSPG_MODELS_DIR") or DEFAULT_MODELS_DIR)


@dataclass
class Bundle:
    """A trained TSPG generator with its target model, discriminator and metadata.

    ``generator`` is the one the bundle perturbs with: a :class:`~tspg.nets.Generator`, or
    for a seed ensemble a :class:`~tspg.nets.GeneratorEnsemble` whose output gives the
    members' mean perturbation. ``discriminator`` is member 0's; ``discriminators`` every
    member's (None: just ``discriminator``).
    """

    manifest: dict
    generator: Generator | GeneratorEnsemble
    discriminator: Discriminator
    target_model: TargetClassifier
    path: Path | None = None
    discriminators: list[Discriminator] | None = None

    @property
    def members(self) -> list[Generator]:
        """The ensemble's generators (one for a one-generator bundle)."""
        if isinstance(self.generator, GeneratorEnsemble):
            return list(self.generator.members)
        return [self.generator]

    @property
    def n_generators(self) -> int:
        return len(self.members)

    @property
    def member_seeds(self) -> list[int]:
        """The training seed of each generator, member 0 first."""
        return [int(m["seed"]) for m in member_files(self.manifest)]

    @property
    def member_discriminators(self) -> list[Discriminator]:
        return list(self.discriminators) if self.discriminators else [self.discriminator]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def genes(self) -> list[str]:
        return self.manifest["genes"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def target_index(self) -> int:
        """Position of the target among the classes (the target model's output column)."""
        return self.classes.index(self.target)

    @property
    def label_key(self) -> str:
        return self.manifest["label_key"]

    @property
    def scaler(self) -> Scaler:
        s = self.manifest["scaler"]
        return Scaler(np.asarray(s["minimum"], np.float32), np.asarray(s["range"], np.float32))

    @property
    def target_mean(self) -> np.ndarray | None:
        """Mean of the target class over the training split (scaled), as the heatmap shows it."""
        tm = self.manifest.get("target_mean")
        return None if tm is None else np.asarray(tm, np.float32)

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.manifest["config"])

    @property
    def split(self) -> dict[str, list[str]]:
        return self.manifest["split"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def summary(self) -> dict:
        """The bundle in one row (:func:`manifest_summary`): ``tspg list``, the Models and Home pages."""
        return manifest_summary(self.manifest)

    # ------------------------------------------------------------------------- data in, answers out

    def match_genes(
        self,
        adata: ad.AnnData,
        *,
        max_missing: float = 0.0,
        var_column: str | None = None,
        source: str = "data",
    ) -> GeneMatch:
        """Find the bundle's genes in ``adata`` (:func:`tspg.data.match_genes`): exactly, then
        ignoring case, then by a ``var`` column of symbols. Up to ``max_missing`` of them may
        be missing (0: none); :meth:`aligned` fills those (:func:`tspg.data.missing_gene_fill`)."""
        _, how = missing_gene_fill(self.scaler, self.manifest.get("training_mean"))
        return match_genes(
            adata,
            self.genes,
            max_missing=max_missing,
            var_column=var_column,
            fill=how,
            source=source,
        )

    def aligned(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        source: str = "data",
        rows=None,
        match: GeneMatch | None = None,
    ) -> np.ndarray:
        """``adata``'s raw expression of the bundle's genes, in the bundle's order (dense
        float32, samples ``rows`` (default all) x genes).

        Genes are found by ``match`` (:meth:`match_genes`; default: exact names or ignoring
        case, none missing); genes the match let be missing take the fill value. UserError
        naming the layer, gene or sample when a layer, gene or value is missing or infinite.
        """
        if layer is not None and layer not in adata.layers:
            raise UserError(
                f"{source}: no layer {layer!r}; layers are {list(adata.layers) or 'none'}"
            )
        match = match or self.match_genes(adata, source=source)
        fill = missing_gene_fill(self.scaler, self.manifest.get("training_mean"))[0]
        X = align_genes(
            adata, self.genes, layer=layer, source=source, rows=rows, match=match, fill=fill
        )
        if not np.isfinite(X).all():
            i, j = map(int, np.argwhere(~np.isfinite(X))[0])
            names = adata.obs_names if rows is None else adata.obs_names[np.asarray(rows)]
            raise UserError(
                f"{source}: missing or infinite value at sample {names[i]!r}, gene {self.genes[j]!r}"
            )
        return X

    def scale(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        source: str = "data",
        rows=None,
        match: GeneMatch | None = None,
    ) -> np.ndarray:
        """``adata``'s expression of the bundle's genes (:meth:`aligned`), scaled into the
        bundle's space with its stored minimum and range: float32, samples x genes, in [0, 1].
        The one way data enter a bundle's space (perturbation, maps, baselines, metrics)."""
        X = self.aligned(adata, layer=layer, source=source, rows=rows, match=match)
        return self.scaler.transform(X, genes=self.genes, source=source)

    def predict_proba(self, Xs: np.ndarray, *, samples=None) -> np.ndarray:
        """The target model's class probabilities (samples x classes) for scaled ``Xs``;
        a non-finite one is a UserError naming the bundle and the sample (``samples``: ids)."""
        if len(Xs) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        what = f"the target model of bundle {self.name!r}"
        return class_probabilities(self.target_model, Xs, what=what, samples=samples)

    def predict(self, Xs: np.ndarray) -> np.ndarray:
        """The target model's class (name) for each row of scaled ``Xs``."""
        return np.asarray(self.classes, dtype=object)[self.predict_proba(Xs).argmax(1)]

    def sample_pool(self, adata: ad.AnnData, *, heldout: bool = True) -> list[str]:
        """The samples of ``adata`` to choose from, in ``adata``'s order.

        With ``heldout``, the bundle's held-out samples that ``adata`` holds; when it holds
        none of them (other data than the bundle's own), every sample. Without, every sample.
        """
        names = list(map(str, adata.obs_names))
        if heldout:
            test = set(self.split.get("test", []))
            held = [s for s in names if s in test]
            if held:
                return held
        return names

    def source_samples(
        self,
        adata: ad.AnnData,
        *,
        samples: Sequence[str] | None = None,
        label_key: str | None = None,
        heldout: bool = True,
        source: str = "data",
        max_samples: int | None = None,
        seed: int = 0,
    ) -> SampleChoice:
        """The samples to perturb: ``samples`` when given (each must be in ``adata``), else
        :meth:`sample_pool` without the target class (when the labels are known), at most
        ``max_samples`` of them (a fixed, seeded, class-stratified subsample, said in the
        description).

        Parameters
        ----------
        samples
            Sample ids chosen by the user (duplicates dropped, order kept).
        label_key
            Column of ``obs`` with the classes (default: the bundle's, when present).
        heldout
            Start from the held-out split (see :meth:`sample_pool`).

        Returns
        -------
        :class:`SampleChoice`; UserError when no sample is left.
        """
        if samples:
            return SampleChoice(chosen_samples(adata, samples, source=source), "chosen samples")
        held = heldout and bool(set(self.split.get("test", [])) & set(map(str, adata.obs_names)))
        ids = self.sample_pool(adata, heldout=heldout)
        key = label_key or self.label_key
        what = "held-out samples" if held else "samples"
        if key in adata.obs:
            labels = adata.obs[key].astype(str).reindex(ids).to_numpy()
            ids = [s for s, c in zip(ids, labels, strict=True) if c != self.target]
            what = "held-out non-target samples" if held else "non-target samples"
        if not ids:
            raise UserError(
                f"{source}: no samples to use: every candidate sample is of the target class {self.target!r}; choose samples by id"
            )
        labels = adata.obs[key].astype(str).reindex(ids).to_numpy() if key in adata.obs else None
        keep = subsample(
            labels if labels is not None else np.zeros(len(ids)), max_samples, seed=seed
        )
        if len(keep) < len(ids):
            what += f" (a seeded subsample of {len(keep)} of {len(ids)})"
            ids = [ids[i] for i in keep]
        return SampleChoice(ids, what)

    def dataset_fingerprint(self, adata: ad.AnnData, *, layer: str | None = None) -> str | None:
        """:func:`tspg.data.fingerprint` of ``adata``'s values of the bundle's genes, as
        training computed it; None when some of the genes are missing."""
        if not pd.Index(self.genes).isin(adata.var_names).all():
            return None
        return dataset_fingerprint(adata, self.genes, layer=layer)  # streamed, chunk by chunk

    def is_own_dataset(self, adata: ad.AnnData, *, layer: str | None = None) -> bool | None:
        """Whether ``adata`` is the dataset the bundle was trained on (its values, genes and
        samples match the fingerprint in the manifest): True or False; None when it cannot
        be told (no fingerprint stored, or some of the bundle's genes are missing)."""
        expected = self.manifest.get("dataset", {}).get("fingerprint")
        found = self.dataset_fingerprint(adata, layer=layer) if expected else None
        return None if found is None else found == expected

    def train_command(self, *, out: str | Path | None = None) -> str:
        """The ``tspg-train`` command that rebuilds this bundle (see :func:`train_command`)."""
        return train_command(self.manifest, out=out)


@dataclass(frozen=True)
class SampleChoice:
    """Samples chosen for an analysis, and how to name them (e.g. "held-out non-target samples")."""

    ids: list[str]
    description: str

    def __len__(self) -> int:
        return len(self.ids)


def chosen_samples(adata: ad.AnnData, samples: Sequence[str], *, source: str = "data") -> list[str]:
    """The sample ids asked for, each once, in the order given; UserError listing those not in ``adata``."""
    ids = list(dict.fromkeys(map(str, samples)))
    known = set(map(str, adata.obs_names))
    unknown = [s for s in ids if s not in known]
    if unknown:
        shown = ", ".join(unknown[:10]) + (
            f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        )
        raise UserError(
            f"{source}: {len(unknown)} of the {len(ids)} sample ids given are not in the data: {shown}"
        )
    return ids


def manifest_summary(manifest: dict) -> dict:
    """A bundle's manifest in one row: name, target, dataset, gene set, genes, classes,
    recipe, epochs, the held-out accuracies and the creation time."""
    m, metrics = manifest, manifest.get("metrics", {})
    return {
        "name": m["name"],
        "target": m["target"],
        "dataset": m["dataset"]["name"],
        "gene set": m["gene_set"]["name"],
        "genes": len(m["genes"]),
        "classes": len(m["classes"]),
        "recipe": m["config"].get("recipe", ""),
        "epochs": m["config"].get("epochs"),
        "generators": len(member_files(m)),
        "target-model accuracy": metrics.get("target_model_accuracy"),
        "perturbation accuracy": metrics.get("perturbation_accuracy_non_target"),
        "created": m.get("created", ""),
    }


def train_command(manifest: dict, *, out: str | Path | None = None) -> str:
    """The ``tspg-train`` command that rebuilds a bundle from its manifest.

    The data (``--demo``, or ``<dataset>.h5ad --label-key KEY``), the target, the gene set
    (``--gene-set FILE:NAME``, ``--genes FILE``) or the reused target model, every
    TrainConfig value that differs from the recipe's default (:func:`tspg.config.config_argv`),
    the name and the models folder ``out`` (when given).
    """
    q = shlex.quote
    ds = manifest["dataset"]["name"]
    data = ["--demo"] if ds == DEMO_NAME else [f"{ds}.h5ad", "--label-key", manifest["label_key"]]
    argv = ["tspg-train", *data, "--target", manifest["target"]]
    gene_set, reused = manifest.get("gene_set", {}), manifest.get("target_model_from")
    if reused:
        argv += ["--target-model", reused]
    elif gene_set.get("source") and gene_set.get("name") != "all":
        source = gene_set["source"]
        is_list = Path(source).stem == gene_set["name"] and Path(source).suffix.lower() != ".gmt"
        argv += ["--genes", source] if is_list else ["--gene-set", f"{source}:{gene_set['name']}"]
    argv += config_argv(TrainConfig.from_dict(manifest["config"]))
    argv += ["--name", manifest["name"]] + (["--out", str(out)] if out is not None else [])
    return " ".join(q(a) for a in argv)


def new_manifest(**fields) -> dict:
    """A manifest with format version, timestamps and versions filled in: format 1 for one
    generator (today's layout, readable by older tspg), 2 with a ``generators`` list."""
    return {
        "format_version": FORMAT_VERSION if fields.get("generators") else ONE_GENERATOR_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tspg_version": __version__,
        "torch_version": torch.__version__,
        **fields,
    }


def slug(text: str) -> str:
    """A safe folder name from free text: ``CD14+ Monocyte`` -> ``cd14-monocyte``."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "bundle"


def check_name(name: str) -> str:
    """A bundle name is one plain folder name: no path separators, no leading dot."""
    if not name or name != Path(name).name or name.startswith(".") or "/" in name or "\\" in name:
        raise UserError(f"invalid bundle name {name!r}: use letters, digits, '-', '_' and '+'")
    return name


def check_destination(root: str | Path | None, name: str, *, overwrite: bool = False) -> Path:
    """``root/name``, where bundle ``name`` may be saved: nothing of that name is there, or,
    with ``overwrite``, a bundle (a folder holding a manifest.json, readable or not) that
    the save replaces. Another file or folder of that name is never replaced: ``overwrite``
    would destroy it. Touches nothing."""
    final = models_dir(root) / check_name(name)
    if not os.path.lexists(final):
        return final
    if not overwrite:
        raise UserError(
            f"{_shown(final)}: a bundle of that name exists; pass --overwrite or choose --name"
        )
    if not (final.is_dir() and os.path.lexists(final / "manifest.json")):
        what = "a folder without manifest.json" if final.is_dir() else "not a folder"
        raise UserError(
            f"{_shown(final)}: in the way and not a bundle ({what}); --overwrite replaces "
            "bundles only: move it away or choose --name"
        )
    return final


def save_bundle(
    bundle: Bundle, out_dir: str | Path | None = None, *, overwrite: bool = False
) -> Path:
    """Write ``bundle`` to ``out_dir/<name>`` atomically (temporary folder, then rename).

    Nothing is written when the manifest breaks the schema (:mod:`tspg.manifest`) or a
    weight is not finite. The temporary folder's name holds its writer's process id and
    host, so a later save or listing can tell a killed save's leftovers from a live one
    (:func:`clean_leftovers`). The bundle's folder and files get the modes the user's umask
    gives new ones: readable by the group and others as far as it allows.
    """
    root = models_dir(out_dir)
    final = root / check_name(bundle.name)
    # before anything is written: a bad field or weight leaves nothing behind
    text = manifest_json(bundle.manifest)
    validate_manifest(json.loads(text), f"bundle {bundle.name!r}: manifest")
    tensors = _bundle_tensors(bundle)
    if os.path.lexists(root) and not root.is_dir():
        raise UserError(f"{_shown(root)}: cannot write a bundle here (not a folder)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(root)
        check_destination(root, bundle.name, overwrite=overwrite)
        prefix = f".{bundle.name}.tmp-{os.getpid()}-{_HOST}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    except OSError as err:
        raise UserError(f"{_shown(root)}: cannot write a bundle here ({_why(err)})") from None
    try:
        fd = os.open(tmp / "manifest.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            file_mode = os.fstat(fh.fileno()).st_mode & 0o777  # 0o666 less the umask
        # a folder also gets x where the umask leaves r (umask 022: 0o644 -> 0o755)
        dir_mode = file_mode | (file_mode & 0o444) >> 2
        for fname, tensor_dict in tensors.items():
            save_file(tensor_dict, str(tmp / fname))
        for file in tmp.iterdir():
            file.chmod(file_mode)
        tmp.chmod(dir_mode)  # (mkdtemp made it 0o700)
        if os.path.lexists(final):
            old = root / f".{bundle.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)  # put the previous bundle back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{_shown(final)}: cannot write the bundle ({_why(err)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundle.path = final
    return final


def member_files(manifest: dict) -> list[dict]:
    """Per generator of a bundle: ``seed``, ``file`` (its weights) and ``discriminator``
    (its discriminator's weights), member 0 first. A one-generator bundle (format 1) has
    no ``generators`` list: its member is ``generator.safetensors`` with the config's seed."""
    members = manifest.get("generators")
    if members:
        return members
    seed = manifest.get("config", {}).get("seed", 0)
    return [
        {
            "seed": seed,
            "file": WEIGHT_FILES["generator"],
            "discriminator": WEIGHT_FILES["discriminator"],
        }
    ]


def _weight_layout(manifest: dict) -> list[tuple[str, str, str]]:
    """Every weight file of a bundle: (file name, network kind, what to call it), in order."""
    members = member_files(manifest)
    out = []
    for i, m in enumerate(members):
        which = f" {i}" if len(members) > 1 else ""
        out += [(m["file"], "generator", f"generator{which}")]
        out += [(m["discriminator"], "discriminator", f"discriminator{which}")]
    return out + [(WEIGHT_FILES["target_model"], "target_model", "target model")]


def _bundle_tensors(bundle: Bundle) -> dict[str, dict[str, torch.Tensor]]:
    """Per weight file of ``bundle``, its tensors on the CPU; UserError for a non-finite one
    or for networks that do not match the manifest's list of generators."""
    layout = _weight_layout(bundle.manifest)
    members, discs = bundle.members, bundle.member_discriminators
    if len(members) != len(layout) // 2 or len(discs) != len(members):
        raise UserError(
            f"bundle {bundle.name!r}: {len(members)} generator(s) and {len(discs)} "
            f"discriminator(s) for the manifest's {len(layout) // 2}; not saved"
        )
    modules = [net for pair in zip(members, discs, strict=True) for net in pair]
    modules.append(bundle.target_model)
    return {
        fname: _state_tensors(bundle.name, module, what)
        for (fname, _, what), module in zip(layout, modules, strict=True)
    }


def _state_tensors(name: str, module: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    """The tensors of network ``module``, on the CPU; UserError for a non-finite one."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(
                f"bundle {name!r}: the {what}'s tensor {k!r} holds NaN or infinite values; not saved"
            )
    return tensors


# ----------------------------------------------------------------------------- leftovers

STALE_AFTER_S = 30 * 60  # a leftover whose writer cannot be asked is stale after this idle time
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
# while saving: ".<name>.tmp-<pid>-<host>-<8 characters of mkdtemp>" (the writer is in the
# name, so no moment exists when a temporary folder does not say who writes it); earlier
# versions of tspg wrote ".<name>.<8 characters>"; while replacing: ".<name>.old"
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]{8}")
_OLDER_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}")
_PREVIOUS = re.compile(r"\.(?P<name>.+)\.old")
_BUNDLE_FILES = frozenset({"manifest.json", *WEIGHT_FILES.values()})
_SAVER_TEMP_FILE = re.compile(r"\.tmp\w+")  # safetensors writes a file under such a name first
_MEMBER_FILE = re.compile(r"(generator|discriminator)-\d+\.safetensors")  # an ensemble's


def _writer_alive(pid: int, host: str) -> bool | None:
    """Whether process ``pid`` of ``host`` runs; None when that cannot be told here
    (another host, or Windows, where ``os.kill(pid, 0)`` would stop the process)."""
    if host != _HOST or os.name == "nt" or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it runs, as another user
        return True
    return True


def _leftover_files(folder: Path) -> list[Path] | None:
    """The files of a leftover folder, or None when it holds anything a save never writes
    (a sub-folder, a link, another file): such a folder is never touched."""
    try:
        files = list(folder.iterdir())
        ok = all(
            (
                f.name in _BUNDLE_FILES
                or _SAVER_TEMP_FILE.fullmatch(f.name)
                or _MEMBER_FILE.fullmatch(f.name)
            )
            and stat.S_ISREG(f.lstat().st_mode)
            for f in files
        )
    except OSError:
        return None
    return files if ok else None


def clean_leftovers(root: str | Path | None = None) -> list[Path]:
    """Remove what killed saves left in the models folder; return the folders removed.

    A temporary folder is removed when its writer process is gone (same host), or, when
    that cannot be told (another host; a folder of an older tspg, whose name does not say),
    after :data:`STALE_AFTER_S` seconds without a change. A ``.<name>.old`` folder (the
    previous bundle, while an overwrite renames the new one into place) is removed when
    ``<name>`` exists, and renamed back to ``<name>`` when the save was killed before the
    new bundle got there; never while a live save of ``<name>`` runs. Only folders holding
    nothing but a bundle's files are touched; failures (another user's folder, say) are
    logged and skipped.
    """
    root = models_dir(root)
    try:
        hidden = sorted(p for p in root.iterdir() if p.name.startswith("."))
    except OSError:
        return []
    removed, busy, previous = [], set(), []
    now = time.time()
    for folder in hidden:
        temp = _TEMP.fullmatch(folder.name) or _OLDER_TEMP.fullmatch(folder.name)
        prev = _PREVIOUS.fullmatch(folder.name)
        if not (temp or prev) or folder.is_symlink() or not folder.is_dir():
            continue
        files = _leftover_files(folder)
        if files is None:
            continue
        if prev:
            previous.append((folder, prev["name"]))
            continue
        pid = temp.groupdict().get("pid")
        alive = _writer_alive(int(pid), temp["host"]) if pid else None
        try:
            idle = now - max(p.lstat().st_mtime for p in [folder, *files])
        except OSError:
            idle = 0.0
        if alive or (alive is None and idle < STALE_AFTER_S):
            busy.add(temp["name"])
        elif _remove(folder):
            removed.append(folder)
    for folder, name in previous:
        if name in busy:
            continue
        if os.path.lexists(root / name):
            if _remove(folder):
                removed.append(folder)
            continue
        try:
            folder.rename(root / name)
            logger.warning(
                "%s: restored from %s, left by a save that was stopped", root / name, folder.name
            )
        except OSError as err:
            logger.info("could not restore %s: %s", folder, err)
    return removed


def _remove(folder: Path) -> bool:
    try:
        shutil.rmtree(folder)
    except OSError as err:
        logger.info("could not remove the leftover folder %s: %s", folder, err)
        return False
    logger.info("removed %s, left by a save that was stopped", folder)
    return True


# ----------------------------------------------------------------------------- reading

# The one rule for links: a bundle folder and every file read from it are resolved, and the
# resolved path must lie inside the (resolved) models folder: the folder the bundle is in.
# A link from models/a to models/b is fine; one leading out of models/ is refused.


def _shown(path) -> str:
    """A path (or any text) for a one-line message: control characters escaped."""
    return one_line(path)


def _why(err: BaseException) -> str:
    """An OS error's reason in words: ``permission denied``, ``is a directory``."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[:1].lower() + err.strerror[1:]
    return _shown(err) or type(err).__name__


def _models_root(path: Path, root: str | Path | None) -> Path:
    """The resolved models folder of the bundle at ``path``: ``root``, else its parent."""
    return Path(
        os.path.abspath(root if root is not None else Path(path).absolute().parent)
    ).resolve()


def _inside(path: Path, root: Path) -> Path:
    """``path`` resolved; UserError when that leads outside ``root`` (resolved)."""
    try:
        real = Path(os.path.abspath(path)).resolve()
    except RuntimeError:  # Python < 3.13: a loop of links
        raise UserError(f"{_shown(path)}: unreadable (a loop of symbolic links)") from None
    except OSError as err:
        raise UserError(f"{_shown(path)}: unreadable ({_why(err)})") from None
    if real != root and root not in real.parents:
        link = "" if real == Path(os.path.abspath(path)) else f"a link to {_shown(real)}, "
        raise UserError(f"{_shown(path)}: {link}outside the models folder {_shown(root)}: refused")
    return real


def _open(path: Path, real: Path, missing: str) -> int:
    """A read-only descriptor of the regular file ``real`` (shown as ``path``).

    UserError (``missing`` when it does not exist) for anything else: a dangling link, a
    folder, a named pipe or device (opened without blocking, so a pipe never hangs), a file
    the user may not read.
    """
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(
                f"{_shown(path)}: a link to {_shown(real)}, which does not exist"
            ) from None
        raise UserError(missing) from None
    except OSError as err:
        raise UserError(f"{_shown(path)}: unreadable ({_why(err)})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a named pipe"
            if stat.S_ISFIFO(mode)
            else "a device or socket"
        )
        raise UserError(f"{_shown(path)}: unreadable (not a file but {kind})")
    return fd


def _folder(path: Path, root: Path) -> Path:
    """The resolved bundle folder ``path``; UserError when it is not a folder inside ``root``."""
    real = _inside(path, root)
    try:
        is_dir = stat.S_ISDIR(real.stat().st_mode)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(
                f"{_shown(path)}: a link to {_shown(real)}, which does not exist"
            ) from None
        raise UserError(f"{_shown(path)}: no such bundle folder") from None
    except OSError as err:
        raise UserError(f"{_shown(path)}: unreadable ({_why(err)})") from None
    if not is_dir:
        raise UserError(f"{_shown(path)}: not a bundle (not a folder)")
    return real


# A manifest holds a few numbers per gene and an id per sample: tens of MB for a million
# samples. A larger file is not read (it could exhaust the memory of a listing).
MAX_MANIFEST_BYTES = 512 * 2**20


def read_manifest(path: str | Path, *, root: str | Path | None = None) -> dict:
    """Read and check a bundle's manifest.json (:func:`tspg.manifest.parse_manifest`).

    ``root`` is the models folder the bundle and its files must lie in (default: the
    folder that holds ``path``).
    """
    path = Path(path)
    real_root = _models_root(path, root)
    _folder(path, real_root)
    mf = path / "manifest.json"
    fd = _open(mf, _inside(mf, real_root), f"{_shown(path)}: not a bundle (no manifest.json)")
    try:
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise UserError(
                    f"{_shown(mf)}: unreadable ({size / 2**20:,.0f} MiB, larger than any "
                    f"manifest tspg writes: at most {MAX_MANIFEST_BYTES // 2**20} MiB)"
                )
            data = fh.read()
    except OSError as err:
        raise UserError(f"{_shown(mf)}: unreadable ({_why(err)})") from None
    return parse_manifest(data, _shown(mf))


def _networks(manifest: dict, path: Path, device: torch.device | str = "cpu") -> dict:
    """The three networks the manifest's gene count, class count and config describe."""
    n_genes, n_classes = len(manifest["genes"]), len(manifest["classes"])
    try:
        cfg = TrainConfig.from_dict(manifest["config"])
        with torch.device(device):
            return {
                "generator": Generator(
                    n_genes,
                    encoder=cfg.gen_encoder,
                    n_residual=cfg.gen_residual,
                    decoder=cfg.gen_decoder,
                ),
                "discriminator": Discriminator(n_genes, hidden=cfg.disc_hidden),
                "target_model": TargetClassifier(n_genes, n_classes, hidden=cfg.target_hidden),
            }
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(
            f"{_shown(path / 'manifest.json')}: config does not describe valid networks ({_shown(err)})"
        ) from None


def _expected_tensors(manifest: dict, path: Path) -> dict[str, dict[str, tuple]]:
    """Per network, ``{tensor name: (shape, safetensors dtype)}`` the manifest implies
    (networks of one shape are built once, on the ``meta`` device: no memory)."""
    cfg = TrainConfig.from_dict(manifest["config"])
    shape = (cfg.gen_encoder, cfg.gen_residual, cfg.gen_decoder, cfg.disc_hidden, cfg.target_hidden)
    key = (len(manifest["genes"]), len(manifest["classes"]), shape)
    if key not in _EXPECTED:
        nets = _networks(manifest, path, "meta")
        if len(_EXPECTED) > 256:
            _EXPECTED.clear()
        _EXPECTED[key] = {
            name: {
                k: (tuple(v.shape), _DTYPES.get(v.dtype, str(v.dtype)))
                for k, v in net.state_dict().items()
            }
            for name, net in nets.items()
        }
    return _EXPECTED[key]


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.int64: "I64"}
# Files whose every value was read and found finite (or not), by the file's identity: a
# listing reads each version of a weight file once, later listings only stat it.
_VALUES_CHECKED: dict[tuple, str | None] = {}
_EXPECTED: dict[tuple, dict[str, dict[str, tuple]]] = {}


def _weight_file(
    path: Path, key: str, expected: dict, root: Path, *, values: bool, fname: str | None = None
) -> Path:
    """Check weight file ``fname`` (default: network ``key``'s usual file) of the bundle at
    ``path``; return its resolved path.

    It must be a regular file inside ``root`` holding exactly the ``expected`` tensors
    (names, shapes, types; read from the header only) and, with ``values``, finite values.
    """
    fname = fname or WEIGHT_FILES[key]
    file = path / fname
    real = _inside(file, root)
    fd = _open(file, real, f"{_shown(path)}: missing {fname}")
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        with safe_open(str(real), framework="pt") as f:
            found = {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
            }
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise UserError(f"{_shown(file)}: unreadable weights ({_shown(err)})") from None
    for k, (shape, dtype) in expected.items():
        if k not in found:
            raise UserError(f"{_shown(file)}: tensor {k!r} is missing")
        if found[k][0] != shape:
            raise UserError(
                f"{_shown(file)}: tensor {k!r} has shape {found[k][0]}, the manifest implies {shape}"
            )
        if found[k][1] != dtype:
            raise UserError(f"{_shown(file)}: tensor {k!r} holds {found[k][1]} values, not {dtype}")
    extra = set(found) - set(expected)
    if extra:
        raise UserError(f"{_shown(file)}: unexpected tensor(s) {sorted(extra)[:3]}")
    if values:
        ident = (str(real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if ident not in _VALUES_CHECKED:
            if len(_VALUES_CHECKED) > 10_000:
                _VALUES_CHECKED.clear()
            _VALUES_CHECKED[ident] = _non_finite_tensor(real)
        if _VALUES_CHECKED[ident] is not None:
            raise UserError(f"{_shown(file)}: {_VALUES_CHECKED[ident]}")
    return real


def _non_finite_tensor(real: Path) -> str | None:
    """What is wrong with the values of a weight file (its header already checked), or None."""
    try:
        with safe_open(str(real), framework="numpy") as f:
            for k in sorted(f.keys()):
                t = f.get_tensor(k)
                if t.dtype.kind == "f" and not np.isfinite(t).all():
                    return f"tensor {k!r} holds NaN or infinite values"
    except Exception as err:  # data cut short after an intact header
        return f"unreadable weights ({_shown(err)})"
    return None


def check_weights(path: str | Path, manifest: dict, *, root: str | Path | None = None) -> None:
    """Check every weight file of the bundle at ``path`` against its (checked) manifest.

    Each must be a regular file inside the models folder ``root`` (default: the folder
    holding ``path``), hold exactly the tensors the manifest implies (names, shapes, types)
    and finite values only. Values are read once per version of a file (its identity and
    modification time), so listing a models folder again costs a ``stat`` per file.
    UserError naming the file and tensor at fault.
    """
    path = Path(path)
    real_root = _models_root(path, root)
    expected = _expected_tensors(manifest, path)
    for fname, key, _ in _weight_layout(manifest):
        _weight_file(path, key, expected[key], real_root, values=True, fname=fname)


def load_bundle(
    path: str | Path, *, device: torch.device | str = "cpu", root: str | Path | None = None
) -> Bundle:
    """Load a bundle folder (safetensors only; nothing is unpickled).

    The manifest is checked (:func:`read_manifest`), then each weight file (as
    :func:`check_weights`) and the values loaded: a NaN or infinite weight is an error.
    ``root`` is the models folder every file must lie in (default: the folder holding
    ``path``; see the module's rule for links).
    """
    path = Path(path)
    real_root = _models_root(path, root)
    manifest = read_manifest(path, root=real_root)
    expected = _expected_tensors(manifest, path)
    layout = _weight_layout(manifest)
    nets = [_networks(manifest, path) for _ in range(len(layout) // 2)]
    modules = [net for n in nets for net in (n["generator"], n["discriminator"])]
    modules.append(nets[0]["target_model"])
    for (fname, key, _), module in zip(layout, modules, strict=True):
        file = path / fname
        real = _weight_file(path, key, expected[key], real_root, values=False, fname=fname)
        try:
            tensors = load_file(str(real))
        except Exception as err:  # the header was fine, the data are not
            raise UserError(f"{_shown(file)}: unreadable weights ({_shown(err)})") from None
        bad = next(
            (
                k
                for k, t in sorted(tensors.items())
                if t.is_floating_point() and not bool(torch.isfinite(t).all())
            ),
            None,
        )
        if bad is not None:
            raise UserError(f"{_shown(file)}: tensor {bad!r} holds NaN or infinite values")
        module.load_state_dict(tensors)
        module.to(device).eval()
    generators, discs = modules[0:-1:2], modules[1:-1:2]
    generator = generators[0] if len(generators) == 1 else GeneratorEnsemble(generators).eval()
    return Bundle(
        manifest,
        generator,
        discs[0],
        modules[-1],
        path,
        discriminators=discs if len(discs) > 1 else None,
    )


@dataclass(frozen=True)
class BundleEntry:
    """One folder of the models directory: its manifest, or why it cannot be read."""

    name: str
    path: Path
    manifest: dict | None
    error: str | None = None

    def summary(self) -> dict:
        """:func:`manifest_summary` with ``status`` ("ok" or "unreadable") and ``error``."""
        if self.error is not None:
            return {"name": self.name, "status": "unreadable", "error": self.error}
        return {**manifest_summary(self.manifest), "name": self.name, "status": "ok", "error": ""}


def list_bundles(root: str | Path | None = None) -> list[BundleEntry]:
    """Every bundle folder under ``root`` (sorted by name); unreadable ones carry ``error``.

    Each manifest is read and checked, and each weight file checked against it
    (:func:`check_weights`). One bad folder (unreadable, damaged, a link leading out of
    ``root``) never stops the listing: it is listed with the reason. Hidden entries and
    plain files are skipped; leftovers of killed saves are cleaned first
    (:func:`clean_leftovers`). A missing ``root`` lists nothing; an unreadable one is a
    UserError.
    """
    root = models_dir(root)
    try:
        if not root.is_dir():
            return []
        real_root = Path(os.path.abspath(root)).resolve()
        clean_leftovers(root)
        children = sorted(root.iterdir())
    except OSError as err:
        raise UserError(f"{_shown(root)}: the models folder is unreadable ({_why(err)})") from None
    entries = []
    for p in children:
        if p.name.startswith("."):
            continue
        try:
            if not p.is_symlink() and not p.is_dir():
                continue  # a plain file (a README)
            if p.is_symlink() and not os.path.isdir(p) and os.path.exists(p):
                _inside(p, real_root)  # a link to a file: skipped, unless it leads outside
                continue
            manifest = read_manifest(p, root=real_root)
            check_weights(p, manifest, root=real_root)
            entries.append(BundleEntry(p.name, p, manifest))
        except (ValueError, OSError) as err:
            entries.append(BundleEntry(p.name, p, None, _shown(err)))
        except Exception as err:  # a bug in tspg: logged in full, the other bundles still listed
            logger.exception("listing %s", p)
            entries.append(
                BundleEntry(
                    p.name,
                    p,
                    None,
                    f"{_shown(p)}: unreadable ({type(err).__name__}: {_shown(err)})",
                )
            )
    return entries


def resolve_bundle(name: str, root: str | Path | None = None, *, allow_path: bool = False) -> Path:
    """The folder of bundle ``name`` inside ``root``; a name can never reach outside it.

    With ``allow_path`` (the command line), ``name`` may also be a path to a bundle folder
    (one holding a manifest.json, or any name with a path separator): loading then checks it.
    A link in ``root`` leading outside it is refused, as :func:`list_bundles` reports it.
    """
    root = models_dir(root)
    candidate = Path(name)
    if allow_path and (
        "/" in name or os.sep in name or os.path.lexists(candidate / "manifest.json")
    ):
        return candidate
    check_name(name)
    try:
        real_root = root.resolve()
    except (OSError, RuntimeError) as err:
        raise UserError(f"{_shown(root)}: the models folder is unreadable ({_why(err)})") from None
    path = real_root / name
    if not os.path.lexists(path):
        raise UserError(f"no bundle {name!r} in {_shown(root)}")
    _inside(path, real_root)
    return path
