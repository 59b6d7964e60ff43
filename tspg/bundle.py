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
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .config import TrainConfig
from .data import Scaler
from .nets import Discriminator, Generator, TargetClassifier

logger = logging.getLogger(__name__)

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
    def target_index(self) -> int:
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
        m = self.manifest
        return {
            "name": m["name"],
            "dataset": m["dataset"]["name"],
            "gene set": m["gene_set"]["name"],
            "target": m["target"],
            "genes": len(m["genes"]),
            "classes": len(m["classes"]),
            "recipe": m["config"].get("recipe", ""),
            "target model accuracy": m.get("metrics", {}).get("target_model_accuracy"),
            "perturbation accuracy (non-target)": m.get("metrics", {}).get(
                "perturbation_accuracy_non_target"
            ),
            "created": m["created"],
        }


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
        raise ValueError(f"invalid bundle name {name!r}: use letters, digits, '-', '_' and '+'")
    return name


def save_bundle(
    bundle: Bundle, out_dir: str | Path | None = None, *, overwrite: bool = False
) -> Path:
    """Write ``bundle`` to ``out_dir/<name>`` atomically (temporary folder, then rename)."""
    root = models_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / check_name(bundle.name)
    if final.exists() and not overwrite:
        raise ValueError(
            f"{final}: a bundle of that name exists; pass --overwrite or choose --name"
        )
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
        raise ValueError(
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
        raise ValueError(f"{path}: not a bundle (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{mf}: not valid JSON ({err.msg}, line {err.lineno})") from err
    except (UnicodeDecodeError, OSError) as err:
        raise ValueError(f"{mf}: unreadable ({type(err).__name__})") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{mf}: not a bundle manifest (expected a JSON object)")
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
        raise ValueError(f"{mf}: missing field(s) {', '.join(missing)}")
    try:
        _check_manifest(manifest, mf)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{mf}: malformed manifest ({type(err).__name__}: {err})") from err
    return manifest


def _check_manifest(manifest: dict, mf: Path) -> None:
    if not isinstance(manifest["format_version"], int):
        raise ValueError(f"{mf}: format_version must be a whole number")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{mf}: format version {manifest['format_version']} is newer than this tspg reads ({FORMAT_VERSION})"
        )
    if manifest["target"] not in manifest["classes"]:
        raise ValueError(f"{mf}: target {manifest['target']!r} is not one of the classes")
    n = len(manifest["genes"])
    if len(manifest["scaler"]["minimum"]) != n or len(manifest["scaler"]["range"]) != n:
        raise ValueError(f"{mf}: scaler has the wrong length for {n} genes")
    if "target_mean" in manifest and len(manifest["target_mean"]) != n:
        raise ValueError(f"{mf}: target_mean has the wrong length for {n} genes")
    if not isinstance(manifest["config"], dict):
        raise ValueError(f"{mf}: config must be a JSON object")
    for key in ("dataset", "gene_set"):
        if not isinstance(manifest[key], dict) or "name" not in manifest[key]:
            raise ValueError(f"{mf}: {key} must be a JSON object with a name")


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
        raise ValueError(
            f"{path / 'manifest.json'}: config does not describe valid networks ({err})"
        ) from err


def check_weights(path: str | Path, manifest: dict) -> None:
    """Check every weight file's header (tensor names and shapes; the tensors are not read)
    against the shapes the manifest implies; ValueError naming the file and tensor at fault."""
    path = Path(path)
    for key, module in _networks(manifest, path, "meta").items():
        file = path / WEIGHT_FILES[key]
        if not file.exists():
            raise ValueError(f"{path}: missing {WEIGHT_FILES[key]}")
        try:
            with safe_open(str(file), framework="pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise ValueError(f"{file}: unreadable weights ({err})") from err
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        for k, shape in expected.items():
            if k not in found:
                raise ValueError(f"{file}: tensor {k!r} is missing")
            if found[k] != shape:
                raise ValueError(
                    f"{file}: tensor {k!r} has shape {found[k]}, the manifest implies {shape}"
                )
        extra = set(found) - set(expected)
        if extra:
            raise ValueError(f"{file}: unexpected tensor(s) {sorted(extra)[:3]}")


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
            raise ValueError(f"{file}: unreadable weights ({err})") from err
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
        raise ValueError(f"invalid bundle name {name!r}")
    if not path.is_dir():
        raise ValueError(f"no bundle {name!r} in {root}")
    return path
