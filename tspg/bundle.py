"""Model bundles: one folder with ``manifest.json`` and three ``.safetensors`` files.

A bundle carries everything needed to perturb new data: genes (ordered), classes
(ordered), target, scaler, the split, the training config and seed, metrics and the loss
history. Saving writes a temporary folder and renames it into place; loading never
unpickles anything and checks every tensor's shape against the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
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
from .data import Scaler, align_genes, fingerprint
from .datasets import DEMO_NAME
from .errors import UserError
from .nets import Discriminator, Generator, TargetClassifier
from .perturbation import class_probabilities

logger = logging.getLogger(__name__)

__all__ = [
    "Bundle",
    "BundleEntry",
    "SampleChoice",
    "check_name",
    "check_weights",
    "chosen_samples",
    "list_bundles",
    "load_bundle",
    "manifest_summary",
    "models_dir",
    "new_manifest",
    "read_manifest",
    "resolve_bundle",
    "save_bundle",
    "slug",
    "train_command",
]

FORMAT_VERSION = 1
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
    """A trained TSPG generator with its target model, discriminator and metadata."""

    manifest: dict
    generator: Generator
    discriminator: Discriminator
    target_model: TargetClassifier
    path: Path | None = None

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

    def scale(self, adata: ad.AnnData, *, layer: str | None = None, source: str = "data"):
        """``adata``'s expression of the bundle's genes (matched by name, in the bundle's
        order), scaled into the bundle's space with its stored minimum and range.

        Parameters
        ----------
        adata
            Samples x genes, raw values (as the bundle's training data).
        layer
            Read ``adata.layers[layer]`` instead of ``X``.
        source
            How error messages name the data (e.g. its file name).

        Returns
        -------
        float32 array, samples x the bundle's genes, in [0, 1]. UserError naming the gene(s)
        or the sample when genes are missing or a value is missing or infinite.
        """
        if layer is not None and layer not in adata.layers:
            raise UserError(
                f"{source}: no layer {layer!r}; layers are {list(adata.layers) or 'none'}"
            )
        X = align_genes(adata, self.genes, layer=layer, source=source)
        if not np.isfinite(X).all():
            i, j = map(int, np.argwhere(~np.isfinite(X))[0])
            raise UserError(
                f"{source}: missing or infinite value at sample {adata.obs_names[i]!r}, gene {self.genes[j]!r}"
            )
        return self.scaler.transform(X, genes=self.genes, source=source)

    def predict_proba(self, Xs: np.ndarray) -> np.ndarray:
        """The target model's class probabilities (samples x classes) for scaled ``Xs``."""
        if len(Xs) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return class_probabilities(self.target_model, Xs)

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
    ) -> SampleChoice:
        """The samples to perturb: ``samples`` when given (each must be in ``adata``), else
        :meth:`sample_pool` without the target class (when the labels are known).

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
        return SampleChoice(ids, what)

    def dataset_fingerprint(self, adata: ad.AnnData, *, layer: str | None = None) -> str | None:
        """:func:`tspg.data.fingerprint` of ``adata``'s values of the bundle's genes, as
        training computed it; None when some of the genes are missing."""
        if not pd.Index(self.genes).isin(adata.var_names).all():
            return None
        X = align_genes(adata, self.genes, layer=layer)
        return fingerprint(X, self.genes, list(adata.obs_names))

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
    """A manifest with format version, timestamps and versions filled in."""
    return {
        "format_version": FORMAT_VERSION,
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


def save_bundle(
    bundle: Bundle, out_dir: str | Path | None = None, *, overwrite: bool = False
) -> Path:
    """Write ``bundle`` to ``out_dir/<name>`` atomically (temporary folder, then rename)."""
    root = models_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / check_name(bundle.name)
    if final.exists() and not overwrite:
        raise UserError(f"{final}: a bundle of that name exists; pass --overwrite or choose --name")
    text = manifest_json(
        bundle.manifest
    )  # before anything is written: a bad field leaves nothing behind
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.", dir=root))
    try:
        for key, fname in WEIGHT_FILES.items():
            module = getattr(bundle, key)
            tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(tensors, str(tmp / fname))
        (tmp / "manifest.json").write_text(text)
        if final.exists():
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundle.path = final
    return final


def manifest_json(manifest: dict) -> str:
    """The manifest as strict JSON; ValueError naming the field that holds NaN or infinity."""
    try:
        return json.dumps(manifest, indent=1, default=_json_default, allow_nan=False)
    except ValueError:
        found = _non_finite(manifest, "")
        if found is None:
            raise
        field, value = found
        raise UserError(
            f"manifest field {field!r} is {value}: NaN and infinity cannot be stored in a bundle"
        ) from None


def _non_finite(obj, field: str) -> tuple[str, float] | None:
    """(field, value) of the first NaN or infinite number in a manifest, None if there is none."""
    if isinstance(obj, dict):
        items = ((f"{field}.{k}" if field else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list | tuple | np.ndarray):
        items = ((f"{field}[{i}]", v) for i, v in enumerate(obj))
    elif isinstance(obj, float | np.floating) and not math.isfinite(obj):
        return field, float(obj)
    else:
        return None
    for name, value in items:
        found = _non_finite(value, name)
        if found is not None:
            return found
    return None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in a manifest")


def read_manifest(path: str | Path) -> dict:
    """Read and check a bundle's manifest.json."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.exists():
        raise UserError(f"{path}: not a bundle (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{mf}: not valid JSON ({err.msg}, line {err.lineno})") from err
    except (UnicodeDecodeError, OSError) as err:
        raise UserError(f"{mf}: unreadable ({type(err).__name__})") from err
    if not isinstance(manifest, dict):
        raise UserError(f"{mf}: not a bundle manifest (expected a JSON object)")
    required = [
        "format_version",
        "name",
        "dataset",
        "genes",
        "gene_set",
        "classes",
        "target",
        "label_key",
        "scaler",
        "config",
        "split",
    ]
    missing = [k for k in required if k not in manifest]
    if missing:
        raise UserError(f"{mf}: missing field(s) {', '.join(missing)}")
    try:
        _check_manifest(manifest, mf)
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{mf}: malformed manifest ({type(err).__name__}: {err})") from err
    return manifest


def _check_manifest(manifest: dict, mf: Path) -> None:
    if not isinstance(manifest["format_version"], int):
        raise UserError(f"{mf}: format_version must be a whole number")
    if manifest["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"{mf}: format version {manifest['format_version']} is newer than this tspg reads ({FORMAT_VERSION})"
        )
    if manifest["target"] not in manifest["classes"]:
        raise UserError(f"{mf}: target {manifest['target']!r} is not one of the classes")
    n = len(manifest["genes"])
    if len(manifest["scaler"]["minimum"]) != n or len(manifest["scaler"]["range"]) != n:
        raise UserError(f"{mf}: scaler has the wrong length for {n} genes")
    if "target_mean" in manifest and len(manifest["target_mean"]) != n:
        raise UserError(f"{mf}: target_mean has the wrong length for {n} genes")
    if not isinstance(manifest["config"], dict):
        raise UserError(f"{mf}: config must be a JSON object")
    for key in ("dataset", "gene_set"):
        if not isinstance(manifest[key], dict) or "name" not in manifest[key]:
            raise UserError(f"{mf}: {key} must be a JSON object with a name")


def _networks(manifest: dict, path: Path, device: torch.device | str = "cpu") -> dict:
    """The three networks the manifest's gene count, class count and config describe
    (on the ``meta`` device: shapes only, no memory)."""
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
            f"{path / 'manifest.json'}: config does not describe valid networks ({err})"
        ) from err


def check_weights(path: str | Path, manifest: dict) -> None:
    """Check every weight file's header (tensor names and shapes; the tensors are not read)
    against the shapes the manifest implies; ValueError naming the file and tensor at fault."""
    path = Path(path)
    for key, module in _networks(manifest, path, "meta").items():
        file = path / WEIGHT_FILES[key]
        if not file.exists():
            raise UserError(f"{path}: missing {WEIGHT_FILES[key]}")
        try:
            with safe_open(str(file), framework="pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise UserError(f"{file}: unreadable weights ({err})") from err
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        for k, shape in expected.items():
            if k not in found:
                raise UserError(f"{file}: tensor {k!r} is missing")
            if found[k] != shape:
                raise UserError(
                    f"{file}: tensor {k!r} has shape {found[k]}, the manifest implies {shape}"
                )
        extra = set(found) - set(expected)
        if extra:
            raise UserError(f"{file}: unexpected tensor(s) {sorted(extra)[:3]}")


def load_bundle(path: str | Path, *, device: torch.device | str = "cpu") -> Bundle:
    """Load a bundle folder (safetensors only; nothing is unpickled)."""
    path = Path(path)
    manifest = read_manifest(path)
    check_weights(path, manifest)
    modules = _networks(manifest, path)
    for key, module in modules.items():
        file = path / WEIGHT_FILES[key]
        try:
            module.load_state_dict(load_file(str(file)))
        except Exception as err:  # the header was fine, the data are not
            raise UserError(f"{file}: unreadable weights ({err})") from err
        module.to(device).eval()
    return Bundle(
        manifest, modules["generator"], modules["discriminator"], modules["target_model"], path
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

    Each manifest is read and each weight file's header checked against it
    (:func:`check_weights`: names and shapes only, so listing stays cheap).
    """
    root = models_dir(root)
    if not root.is_dir():
        return []
    entries = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            manifest = read_manifest(p)
            check_weights(p, manifest)
            entries.append(BundleEntry(p.name, p, manifest))
        except (ValueError, KeyError, TypeError) as err:
            entries.append(BundleEntry(p.name, p, None, str(err)))
    return entries


def resolve_bundle(name: str, root: str | Path | None = None, *, allow_path: bool = False) -> Path:
    """The folder of bundle ``name`` inside ``root``; a name can never reach outside it.

    With ``allow_path`` (the command line), ``name`` may also be a path to a bundle folder.
    """
    root = models_dir(root).resolve()
    candidate = Path(name)
    if allow_path and candidate.is_dir() and (candidate / "manifest.json").exists():
        return candidate
    check_name(name)
    path = (root / name).resolve()
    if path.parent != root:
        raise UserError(f"invalid bundle name {name!r}")
    if not path.is_dir():
        raise UserError(f"no bundle {name!r} in {root}")
    return path
