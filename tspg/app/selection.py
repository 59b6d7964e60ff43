"""Which samples and classes the dashboard shows: pure functions with explicit arguments.

No streamlit here: the pages read their widgets (:mod:`tspg.app.state`) and pass the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..embedding import MAP_MAX_CLASSES, map_classes
from ..errors import UserError

__all__ = [
    "Data",
    "SELECTION_MODES",
    "Selection",
    "clamp_n",
    "compatible_bundles",
    "default_classes",
    "map_class_options",
    "map_classes_default",
    "picked_map_classes",
    "present_classes",
    "random_candidates",
    "select_samples",
]

SELECTION_MODES = {"random": "N at random", "class": "By source class", "id": "By sample id"}


@dataclass(frozen=True)
class Data:
    """The data to perturb: an AnnData (read-only), a cache key and a label for the UI."""

    adata: object
    key: str
    label: str
    own: bool  # the bundle's own dataset: its split applies

    def labels(self, label_key: str) -> np.ndarray | None:
        """Each sample's class from ``obs[label_key]``; None when the data have no such column."""
        obs = self.adata.obs
        return obs[label_key].astype(str).to_numpy() if label_key in obs else None


@dataclass(frozen=True)
class Selection:
    """The samples picked on the Perturb page, a description for captions, and the
    parameters (for the "equivalent command" box)."""

    samples: tuple[str, ...]
    description: str
    params: dict


def default_classes(classes: Sequence[str], labels, target: str) -> list[str]:
    """The class picked by default in "By source class": the first non-target class present."""
    present = set(labels.tolist()) if labels is not None else set()
    return [c for c in classes if c in present and c != target][:1]


def present_classes(classes: Sequence[str], labels) -> list[str]:
    """The classes of ``labels``: the bundle's ``classes`` first (in their order), then others."""
    found = set(labels.tolist())
    return [c for c in classes if c in found] + sorted(found - set(classes))


def random_candidates(
    pool: Sequence[str],
    labels: Mapping[str, str] | None,
    *,
    target: str,
    leave_out_target: bool = True,
) -> list[str]:
    """The samples a random pick draws from: the pool, without the target class when
    ``leave_out_target`` and the classes are known."""
    skip = leave_out_target and labels is not None
    return [s for s in pool if not (skip and labels.get(s) == target)]


def clamp_n(n, available: int) -> tuple[int, str | None]:
    """N for a random pick of ``available`` samples: ``(n, None)`` when it fits, else the
    nearest possible value and a message saying why it changed."""
    try:
        n = int(n)
    except (TypeError, ValueError):
        return max(
            1, min(20, available)
        ), f"N = {n!r} is not a whole number: using {min(20, available)}"
    if n < 1:
        return 1, f"N = {n} is less than 1: using 1"
    if available and n > available:
        return (
            available,
            f"N = {n} is more than the {available} samples to pick from: using all {available}",
        )
    return n, None


def select_samples(
    pool: Sequence[str],
    labels: Mapping[str, str] | None,
    *,
    target: str,
    mode: str = "random",
    classes: Sequence[str] = (),
    ids: Sequence[str] = (),
    known: Sequence[str] = (),
    n: int = 20,
    seed: int = 0,
    leave_out_target: bool = True,
    heldout: bool = False,
    source: str = "data",
) -> Selection:
    """The samples picked on the Perturb page.

    Parameters
    ----------
    pool
        Samples to choose from, in the data's order (:meth:`tspg.bundle.Bundle.sample_pool`).
    labels
        Each sample's class (every sample of the data), or None when unknown.
    target
        The bundle's target class.
    mode
        ``random`` (``n`` of the pool, seeded, without the target class when
        ``leave_out_target``), ``class`` (every sample of the pool of ``classes``) or
        ``id`` (``ids`` that are in ``known``, each once, in the order given).
    known
        Every sample id of the data (``id`` mode).
    heldout
        The pool is the held-out split (said in the description and the parameters).
    source
        How error messages name the data.
    """
    if mode == "class":
        if labels is None:
            raise UserError(
                f"{source}: no label column in obs, so samples cannot be picked by class; pick them by id or at random"
            )
        wanted = set(classes)
        picked = [s for s in pool if labels[s] in wanted]
        params = {"mode": "class", "classes": list(classes)}
        description = f"{len(picked)} samples of {', '.join(classes)}"
    elif mode == "id":
        present = set(known)
        picked = [s for s in dict.fromkeys(ids) if s in present]
        params, description = {"mode": "id", "ids": picked}, f"{len(picked)} samples by id"
    else:
        candidates = random_candidates(
            pool, labels, target=target, leave_out_target=leave_out_target
        )
        rng = np.random.default_rng(seed)
        size = min(n, len(candidates))
        idx = np.sort(rng.choice(len(candidates), size=size, replace=False)) if candidates else []
        picked = [candidates[i] for i in idx]
        params = {"mode": "random", "n": n, "seed": seed}
        description = f"{len(picked)} random samples, seed {seed}"
    params["heldout_only"] = bool(heldout)
    if heldout:
        description += ", held-out split"
    return Selection(tuple(picked), description, params)


def compatible_bundles(bundle, entries) -> list[str]:
    """Readable bundles with the same genes, classes and label key as ``bundle`` (itself
    included): the targets the Perturb page offers."""
    out = [
        e.name
        for e in entries
        if e.error is None
        and e.manifest["genes"] == bundle.genes
        and e.manifest["classes"] == bundle.classes
        and e.manifest["label_key"] == bundle.label_key
    ]
    return out or [bundle.name]


# ----------------------------------------------------------------------------- the map's classes


def map_class_options(labels, target: str) -> list[str]:
    """Every class of the data but the target, the most frequent first."""
    return map_classes(labels, target=target, max_classes=None)[1:]


def map_classes_default(labels, target: str, sources) -> list[str]:
    """The map's default classes besides the target: the source classes of the selection
    (``sources``: its samples' classes; the most represented first), then the most frequent
    others, nine at most; in order of frequency, so that the same classes give the same map."""
    options = map_class_options(labels, target)
    picked = (
        [c for c in pd.Series(sources).value_counts().index if c in set(options)]
        if sources is not None
        else []
    )
    picked = list(dict.fromkeys([*picked, *options]))[: MAP_MAX_CLASSES - 1]
    return [c for c in options if c in set(picked)]


def picked_map_classes(labels, target: str, sources, picked, auto) -> list[str]:
    """The map's classes: the target, then those ``picked`` on the Map page, or, until the
    user changes them (``picked`` equals ``auto``, the default last shown, or is empty),
    :func:`map_classes_default`."""
    options = map_class_options(labels, target)
    wanted = set(picked or [])
    chosen = [c for c in options if c in wanted][: MAP_MAX_CLASSES - 1]  # one map per set
    if not chosen or chosen == auto:
        chosen = map_classes_default(labels, target, sources)
    return [target, *chosen]
