"""The dashboard's view in the URL's query parameters: pure encoding and checking, no streamlit.

A view (bundle, data, selection, page options) is written to the URL after every run, so a
reload (F5) keeps it and a link reopens it. Each parameter has a short name, the
session-state key it fills, and a kind that says which values it accepts; anything else is
ignored with a note, never an error. Lists are repeated parameters (``?classes=A&classes=B``);
an empty list is one empty value (``?classes=``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import keys as K

__all__ = ["PARAMS", "Param", "decode", "encode"]


@dataclass(frozen=True)
class Param:
    """One query parameter: its ``name`` in the URL, the session-state ``key`` it fills,
    its ``kind`` (``word``: one of ``choices``; ``text``; ``int`` in ``[lo, hi]``; ``bool``;
    ``number``: one of ``choices``; ``list``: texts) and what the user knows it as."""

    name: str
    key: str
    kind: str
    what: str
    choices: tuple = ()
    lo: int = 0
    hi: int = 2**32 - 1


PARAMS: tuple[Param, ...] = (
    Param("bundle", K.BUNDLE, "text", "bundle"),
    Param("data", K.DATA, "word", "data to perturb", choices=tuple(K.DATA_CHOICES)),
    Param("mode", K.SEL_MODE, "word", "how samples are picked", choices=("random", "class", "id")),
    Param("classes", K.SEL_CLASSES, "list", "source classes"),
    Param("ids", K.SEL_IDS, "list", "sample ids"),
    Param("n", K.SEL_N, "int", "N samples", lo=1, hi=10**7),
    Param("seed", K.SEL_SEED, "int", "seed of the random pick"),
    Param("heldout", K.SEL_HELDOUT, "bool", "held-out samples only"),
    Param("leave_out_target", K.SEL_NONTARGET, "bool", "leave out the target class"),
    Param("heatmap", K.HEAT_VIEW, "word", "heatmap view", choices=("mean", "sample")),
    Param("sample", K.HEAT_SAMPLE, "text", "heatmap sample"),
    Param("k", K.TOP_K, "int", "genes per direction", lo=1, hi=200),
    Param("map_classes", K.MAP_CLASSES, "list", "map classes"),
    Param("map_seed", K.MAP_SEED, "int", "map seed"),
    Param("moves", K.MAP_MOVES, "bool", "the map's before-after lines"),
    Param("gene", K.GENE, "text", "gene"),
    Param("source", K.GENES_SOURCE, "text", "the Genes page's source class"),
    Param("genes_of", K.ENR_WHAT, "text", "genes to enrich"),
    Param("direction", K.ENR_DIRECTION, "word", "direction", choices=("both", "up", "down")),
    Param("backend", K.ENR_BACKEND, "word", "backend", choices=("auto", "offline", "enrichr")),
    Param("q", K.ENR_THRESHOLD, "number", "q threshold", choices=K.ENRICHMENT_THRESHOLDS),
    Param("libraries", K.ENR_LIBRARIES, "list", "Enrichr libraries"),
    Param(
        "sweep_color",
        K.SWEEP_COLOR,
        "word",
        "the sweep's colour",
        choices=("accuracy", "verdict", "e_distance"),
    ),
    Param("sweep_target", K.SWEEP_TARGET, "text", "the sweep's target"),
)
_BY_NAME = {p.name: p for p in PARAMS}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _short(value: str, n: int = 40) -> str:
    return value if len(value) <= n else value[: n - 1] + "…"


def _one(p: Param, raw: str):
    """The value of ``raw`` for ``p``, or raise ValueError saying why it is not one."""
    if p.kind == "text":
        if not raw:
            raise ValueError("empty")
        return raw
    if p.kind == "word":
        if raw not in p.choices:
            raise ValueError(f"not one of {', '.join(map(str, p.choices))}")
        return raw
    if p.kind == "bool":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("not 1 or 0")
    if p.kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("not a whole number") from None
        if not p.lo <= value <= p.hi:
            raise ValueError(f"not between {p.lo} and {p.hi}")
        return value
    if p.kind == "number":
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("not a number") from None
        match = [c for c in p.choices if math.isclose(c, value, rel_tol=1e-9)]
        if not match:
            raise ValueError(f"not one of {', '.join(f'{c:g}' for c in p.choices)}")
        return match[0]
    raise AssertionError(p.kind)


def decode(
    params: Mapping[str, Sequence[str]], *, bundles: Sequence[str] = ()
) -> tuple[dict, list[str]]:
    """Session-state values from query parameters (each a list of its values), and a note
    for each parameter that was ignored.

    ``bundles``: the readable bundles' names (a ``bundle`` naming another is ignored).
    Unknown parameter names are ignored with a note too.
    """
    values: dict = {}
    notes: list[str] = []
    for name, raw in params.items():
        p = _BY_NAME.get(name)
        raw = [str(r) for r in (raw if isinstance(raw, (list, tuple)) else [raw])]
        if p is None:
            notes.append(f"`{_short(name)}` is not a setting of this dashboard")
            continue
        if p.kind == "list":
            values[p.key] = list(dict.fromkeys(r for r in raw if r))
            continue
        try:
            value = _one(p, raw[-1] if raw else "")
        except ValueError as why:
            notes.append(f"`{name}={_short(raw[-1] if raw else '')}` ({p.what}): {why}")
            continue
        if p.name == "bundle" and value not in bundles:
            notes.append(f"`bundle={_short(value)}`: no readable bundle of that name here")
            continue
        values[p.key] = value
    return values, notes


def encode(state: Mapping, *, defaults: Mapping) -> dict[str, list[str]]:
    """Query parameters of the view in ``state`` (session state): every parameter whose
    key is set and differs from its default, lists as repeated values."""
    out: dict[str, list[str]] = {}
    for p in PARAMS:
        if p.key not in state:
            continue
        value = state[p.key]
        if value is None or (p.key in defaults and value == defaults[p.key]):
            continue
        if p.kind == "list":
            out[p.name] = [str(v) for v in value] or [""]
        elif p.kind == "bool":
            out[p.name] = ["1" if value else "0"]
        elif p.kind == "number":
            out[p.name] = [f"{float(value):g}"]
        else:
            out[p.name] = [str(value)]
    return out
