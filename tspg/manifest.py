"""A bundle's ``manifest.json``: strict JSON in and out, and the schema every manifest meets.

Writing refuses NaN and infinity (naming the field); reading refuses them too, whether
spelled ``NaN`` / ``Infinity`` or as a number too large for a float (``1e999``), and
refuses a key that appears twice in one object. :data:`SCHEMA` is the manifest's shape as
one table: a row per field (its path, whether it must be there, its check); rows run in
order, so a field's parents and the fields it is compared with (``genes``, ``classes``)
are checked before it. The first problem found is raised as a :class:`~tspg.errors.UserError`
with a one-line message naming the field.

Unknown fields are allowed (a newer tspg may add some); known fields must have the right
type. Imports no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .config import MAX_GENERATORS, MAX_SEED, TrainConfig
from .errors import UserError

__all__ = ["FORMAT_VERSION", "SCHEMA", "manifest_json", "parse_manifest", "validate_manifest"]

FORMAT_VERSION = 2  # the newest this tspg reads; 1: one generator, 2: a seed ensemble
ONE_GENERATOR_FORMAT = 1  # one-generator bundles keep format 1 (readable by older tspg)

# ----------------------------------------------------------------------------- strict JSON


def manifest_json(manifest: dict) -> str:
    """The manifest as strict JSON; ValueError naming the field that holds NaN or infinity."""
    try:
        return json.dumps(manifest, indent=1, default=_json_default, allow_nan=False)
    except ValueError:
        found = find_value(manifest, _is_non_finite)
        if found is None:
            raise
        field, value = found
        raise UserError(
            f"manifest field {field!r} is {value}: NaN and infinity cannot be stored in a bundle"
        ) from None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in a manifest")


def _is_non_finite(v) -> bool:
    return isinstance(v, float | np.floating) and not math.isfinite(v)


def find_value(obj, pred: Callable[[Any], bool], field: str = "") -> tuple[str, Any] | None:
    """(field path, value) of the first value in nested dicts / lists for which ``pred`` holds."""
    if pred(obj):
        return field, obj
    if isinstance(obj, dict):
        items = ((f"{field}.{k}" if field else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list | tuple | np.ndarray):
        items = ((f"{field}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for name, value in items:
        found = find_value(value, pred, name)
        if found is not None:
            return found
    return None


class _NonFinite(str):
    """Stands in, while parsing, for a NaN / infinite number, so its field can be named."""


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_manifest(data: bytes | str, source: str) -> dict:
    """Parse a manifest's text strictly (see the module's docstring) and check its schema.

    ``source`` (the file) starts every error message.
    """
    non_finite: list[str] = []

    def constant(text: str) -> _NonFinite:  # NaN, Infinity, -Infinity
        non_finite.append(text)
        return _NonFinite(text)

    def number(text: str) -> float | _NonFinite:
        value = float(text)
        return value if math.isfinite(value) else constant(text)

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        manifest = json.loads(
            text, parse_constant=constant, parse_float=number, object_pairs_hook=_unique_keys
        )
    except json.JSONDecodeError as err:
        raise UserError(f"{source}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{source}: not valid JSON (not UTF-8 text)") from None
    except _DuplicateKey as err:
        raise UserError(f"{source}: key {err.args[0]!r} appears twice in one object") from None
    except RecursionError:
        raise UserError(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError:  # the only other ValueError: int() of a number with > 4300 digits
        raise UserError(f"{source}: not valid JSON (a number with too many digits)") from None
    if non_finite:
        field, value = find_value(manifest, lambda v: isinstance(v, _NonFinite))
        raise UserError(
            f"{source}: field {field!r} is {str(value)}: a manifest holds finite numbers only"
        )
    validate_manifest(manifest, source)
    return manifest


# ----------------------------------------------------------------------------- the schema

# A check takes the field's value and the whole manifest (for fields compared with others)
# and returns what is wrong, as words that follow the field's name, or None.
Check = Callable[[Any, dict], "str | None"]


def _kind(v) -> str:
    """A JSON value's kind, as a message names it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "text"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_NUMBER_TYPES = frozenset({int, float})  # (what json.loads makes of numbers)


def _first_not_text(v: list) -> int | None:
    return next((i for i, x in enumerate(v) if not isinstance(x, str)), None)


def _first_not_number(v: list) -> int | None:
    return next((i for i, x in enumerate(v) if not _is_number(x)), None)


def _field(m: dict, path: str):
    for part in path.split("."):
        m = m[part]
    return m


def obj(v, m) -> str | None:
    return None if isinstance(v, dict) else f"must be an object, not {_kind(v)}"


def text(v, m) -> str | None:
    if not isinstance(v, str):
        return f"must be text, not {_kind(v)}"
    return None if v else "must not be empty"


def optional(check: Check) -> Check:
    """``check``, or null."""
    return lambda v, m: None if v is None else check(v, m)


def all_of(*checks: Check) -> Check:
    def check(v, m):
        return next((p for c in checks if (p := c(v, m)) is not None), None)

    return check


def integer(low: int | None = None, high: int | None = None) -> Check:
    def check(v, m):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be a whole number, not {_kind(v)}"
        if low is not None and v < low:
            return f"must be at least {low}, not {v}"
        if high is not None and v > high:
            return f"must be at most {high}, not {v}"
        return None

    return check


def fraction(v, m) -> str | None:
    if not _is_number(v):
        return f"must be a number, not {_kind(v)}"
    return None if 0 <= v <= 1 else f"must be between 0 and 1, not {v!r}"


def texts(*, at_least: int = 0, unique: bool = True) -> Check:
    """A list of text values (unique, at least ``at_least`` of them)."""

    def check(v, m):
        if not isinstance(v, list):
            return f"must be a list of text values, not {_kind(v)}"
        i = None if all(type(x) is str for x in v) else _first_not_text(v)
        if i is not None:
            return f"must hold text values only, not {_kind(v[i])} ([{i}] = {v[i]!r})"
        if len(v) < at_least:
            return f"must hold at least {at_least} values, not {len(v)}"
        if unique and len(set(v)) < len(v):
            seen: set[str] = set()
            dup = next(x for x in v if x in seen or seen.add(x))
            return f"holds {dup!r} more than once"
        return None

    return check


def numbers(*, per: str | None = None, positive: bool = False) -> Check:
    """A list of numbers that fit a 32-bit float (one per value of field ``per``)."""

    def check(v, m):
        if not isinstance(v, list):
            return f"must be a list of numbers, not {_kind(v)}"
        i = None if all(type(x) in _NUMBER_TYPES for x in v) else _first_not_number(v)
        if i is not None:
            return f"must hold numbers only, not {_kind(v[i])} ([{i}] = {v[i]!r})"
        if per is not None and len(v) != len(_field(m, per)):
            return f"has {len(v)} values for {len(_field(m, per))} {per}"
        with np.errstate(over="ignore"):
            try:
                a = np.asarray(v, dtype=np.float64).astype(np.float32)
            except OverflowError:  # an integer beyond float64
                a = np.array([_as_float32(x) for x in v], dtype=np.float32)
        bad_at = np.flatnonzero(~np.isfinite(a) | ((a <= 0) if positive else False))
        if len(bad_at):
            i = int(bad_at[0])
            if not np.isfinite(a[i]):
                return f"value [{i}] = {v[i]!r} is too large for a 32-bit float"
            return f"value [{i}] = {v[i]!r} must be more than 0"
        return None

    return check


def _as_float32(x) -> float:
    try:
        return float(np.float32(float(x)))
    except OverflowError:
        return math.inf


def one_of(path: str) -> Check:
    """One of the values of field ``path``."""

    def check(v, m):
        if not isinstance(v, str):
            return f"must be text, not {_kind(v)}"
        return None if v in _field(m, path) else f"{v!r} is not one of the {path}"

    return check


def apart_from(path: str) -> Check:
    """No value in common with field ``path`` (a list)."""

    def check(v, m):
        common = set(v) & set(_field(m, path))
        return f"shares {sorted(common)[0]!r} with {path}" if common else None

    return check


def dict_of(check_value: Check) -> Check:
    """An object whose every value passes ``check_value``."""

    def check(v, m):
        if not isinstance(v, dict):
            return f"must be an object, not {_kind(v)}"
        for key, value in v.items():
            problem = check_value(value, m)
            if problem is not None:
                return f"[{key!r}] {problem}"
        return None

    return check


def format_version(v, m) -> str | None:
    problem = integer(low=1)(v, m)
    if problem is None and v > FORMAT_VERSION:
        return f"is {v}, newer than this tspg reads ({FORMAT_VERSION}): update tspg"
    return problem


def generators(v, m) -> str | None:
    """A seed ensemble's members: a list of 2.. objects, each with its seed and two weight
    files named plainly (inside the bundle, ending ``.safetensors``), all names distinct."""
    if not isinstance(v, list):
        return f"must be a list of objects, not {_kind(v)}"
    if not 2 <= len(v) <= MAX_GENERATORS:
        return f"must hold 2 to {MAX_GENERATORS} generators, not {len(v)}"
    names: set[str] = {"manifest.json", "target_model.safetensors"}
    for i, member in enumerate(v):
        if not isinstance(member, dict):
            return f"[{i}] must be an object, not {_kind(member)}"
        problem = integer(0, MAX_SEED)(member.get("seed"), m) if "seed" in member else "is missing"
        if problem is not None:
            return f"[{i}].seed {problem}"
        for key in ("file", "discriminator"):
            name = member.get(key)
            problem = _weight_name(name)
            if problem is not None:
                return f"[{i}].{key} {problem}"
            if name in names:
                return f"[{i}].{key} {name!r} is used twice"
            names.add(name)
        for key in ("metrics", "history"):
            if key in member and not isinstance(member[key], dict):
                return f"[{i}].{key} must be an object, not {_kind(member[key])}"
    return None


def _weight_name(name) -> str | None:
    if name is None:
        return "is missing"
    if not isinstance(name, str):
        return f"must be text, not {_kind(name)}"
    plain = name == name.strip() and not name.startswith(".") and "/" not in name
    if not plain or "\\" in name or "\0" in name or not name.endswith(".safetensors"):
        return f"{name!r} is not a plain file name ending in .safetensors"
    return None


def generator_count(v, m) -> str | None:
    """The config's ``seeds`` matches the generators the manifest lists, and the format
    version says an ensemble (2) when there are several."""
    listed = m.get("generators")
    n = len(listed) if isinstance(listed, list) else 1
    seeds = TrainConfig.from_dict(v).seeds
    if seeds != n:
        return f"says {seeds} generator(s) (seeds), the manifest lists {n}"
    if n > 1 and m.get("format_version", 1) < 2:
        return f"lists {n} generators in a format {m.get('format_version')} bundle (needs 2)"
    return None


def bundle_name(v, m) -> str | None:
    problem = text(v, m)
    if problem is None and (v != v.strip() or v.startswith(".") or "/" in v or "\\" in v):
        return f"{v!r} is not a plain folder name"
    return problem


def train_config(v, m) -> str | None:
    if not isinstance(v, dict):
        return f"must be an object, not {_kind(v)}"
    try:
        TrainConfig.from_dict(v)
    except (ValueError, TypeError) as err:
        return f"is not a valid training config ({err})"
    return None


# (field, required, check), in order: parents first, and `genes` / `classes` before the
# fields compared with them.
SCHEMA: list[tuple[str, bool, Check]] = [
    ("format_version", True, format_version),
    ("name", True, bundle_name),
    ("created", True, text),
    ("tspg_version", False, text),
    ("torch_version", False, text),
    ("dataset", True, obj),
    ("dataset.name", True, text),
    ("dataset.fingerprint", False, text),
    ("dataset.n_samples", False, integer(low=1)),
    ("label_key", True, text),
    ("classes", True, texts(at_least=2)),
    ("target", True, one_of("classes")),
    ("genes", True, texts(at_least=1)),
    ("gene_set", True, obj),
    ("gene_set.name", True, text),
    ("gene_set.source", False, optional(text)),
    ("gene_set.n_requested", False, optional(integer(low=0))),
    ("gene_set.n_missing", False, integer(low=0)),
    ("scaler", True, obj),
    ("scaler.minimum", True, numbers(per="genes")),
    ("scaler.range", True, numbers(per="genes", positive=True)),
    ("target_mean", False, numbers(per="genes")),
    ("split", True, obj),
    ("split.train", True, texts(at_least=1)),
    ("split.test", True, all_of(texts(), apart_from("split.train"))),
    ("generators", False, generators),
    ("config", True, all_of(train_config, generator_count)),
    ("covariance_used", False, text),
    ("target_model_from", False, optional(text)),
    ("metrics", False, obj),
    ("metrics.target_model_accuracy", False, fraction),
    ("metrics.perturbation_accuracy", False, fraction),
    ("metrics.perturbation_accuracy_non_target", False, optional(fraction)),
    ("metrics.perturbation_accuracy_by_source", False, dict_of(fraction)),
    ("metrics.n_test", False, integer(low=0)),
    ("metrics.n_test_non_target", False, integer(low=0)),
    ("history", False, dict_of(numbers())),
    # written by tspg sweep (tspg.sweep): the results table's columns of this bundle
    ("sweep", False, obj),
    ("sweep.top_up", False, texts()),
    ("sweep.top_down", False, texts()),
    ("sweep.worker", False, text),
    ("sweep.host", False, text),
]


def manifest_problem(manifest) -> tuple[str, str] | None:
    """(field, what is wrong) for the first row of :data:`SCHEMA` the manifest fails, else None."""
    if not isinstance(manifest, dict):
        return "", f"must be a JSON object, not {_kind(manifest)}"
    for path, required, check in SCHEMA:
        *parents, key = path.split(".")
        holder = manifest
        for part in parents:  # a parent absent (optional) or already refused: skip the row
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict):
            continue
        if key not in holder:
            if required:
                return path, "is missing"
            continue
        problem = check(holder[key], manifest)
        if problem is not None:
            return path, problem
    return None


def validate_manifest(manifest, source: str) -> None:
    """Raise a UserError naming ``source`` and the field when ``manifest`` breaks :data:`SCHEMA`."""
    found = manifest_problem(manifest)
    if found is not None:
        field, problem = found
        if not field:
            raise UserError(f"{source}: not a bundle manifest (it {problem})")
        raise UserError(f"{source}: field {field!r} {problem}")
