"""Whether a result can be trusted: one verdict for a bundle and for a selection of samples.

A perturbation accuracy near 1.00 means little on its own: a target model near chance, a
generator that collapsed, data in other units or perturbed samples that land farther from
the real target than where they started all still print "100%". :func:`grade` is the one
function that grades a result. It takes figures computed elsewhere, never recomputes them:

- ``heldout``: the figures of :func:`tspg.metrics.heldout_figures` on the bundle's held-out
  split (computed at training time and stored in the manifest, and by ``tspg evaluate``);
- ``selection``: :func:`tspg.metrics.movement_figures` of a selection of samples perturbed
  with the bundle (:func:`selection_figures`);
- ``data_fit``: how well new data fit the bundle (:func:`data_fit_figures`), from plain
  numbers so any gene matching can feed it;
- ``stability``: how a seed ensemble's generators agree on the top genes
  (:func:`stability_figures`; for one generator the check says it is not graded);
- ``stored``: a verdict stored earlier (the bundle's), whose checks are kept.

A verdict is a plain JSON-able dict::

    {"level": "ok" | "caution" | "fail",        # the worst check
     "summary": "one line",
     "target": "the target class" or None,
     "checks": {name: {"title": ..., "level": ..., "reason": "one line in plain words",
                       "scope": "held-out" | "selection" | "seeds",
                       "figures": {key: {"label": ..., "value": number, "n": samples}}}},
     "version": 1}

Checks: ``target_model``, ``moved``, ``agreement`` (independent classifiers), ``realism``
(energy distance), ``sample_size`` (held-out), ``moved_selection`` and ``data_fit`` (a
selection), ``stability`` (the generators of a seed ensemble). A figure that cannot be computed is left out, never NaN.
The thresholds are the constants below; the README says why each is what it is.
:func:`verdict_lines` and :func:`verdict_markdown` render a verdict as text.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

VERSION = 1
LEVELS = ("ok", "caution", "fail")

# target model: "skill" = how much of the way from guessing to perfect, (x - guess) / (1 - guess)
SKILL_FAIL = 0.5  # recall or precision of the target below this skill: cannot tell it apart
SKILL_CAUTION = 0.75  # below this: tells it apart only roughly
# moved: reach = mean |P| / mean |target mean - x|; changed = share whose call changed
REACH_FAIL = 0.1  # below: the generator barely changes the samples (collapse)
CHANGED_FAIL = 0.5  # fewer calls changed: the target model is not moved
CHANGED_CAUTION = 0.9
SATURATED_MARGIN = 10.0  # logit margin of the source samples over the target: softmax saturated
# independent agreement: share of x_adv called the target / share of real target samples
AGREEMENT_FAIL = 0.5  # both classifiers below: they mostly do not see the target in x_adv
AGREEMENT_CAUTION = 0.8  # either below
REAL_RECOGNISED_MIN = 0.5  # a classifier recognising fewer real target samples says little
# realism: progress = (E(x) - E(x_adv)) / (E(x) - E(mean shift)), energy distances to the target
PROGRESS_CAUTION = 0.5  # x_adv gets less than half as far towards the real target as mean shift
# data fit
OUTSIDE_CAUTION = 0.05  # share of values outside the training range (as tspg.data warns)
OUTSIDE_FAIL = 0.5  # most values
GENES_CAUTION = 0.05  # share of genes missing or matched only ignoring case
GENES_FAIL = 0.5
# stability: s = the members' mean pairwise shared genes of their own mean-P top k, on the
# held-out source samples (bench/ENSEMBLE_NOTES.md 1.4 and 7.5: on the demo, s >= 16.5 of 20
# in both directions separates the (class, direction) cases whose independent 3-ensembles
# share >= 18 genes from those that share fewer)
SHARED_CAUTION = 0.825  # s below this share of k: the top genes depend on the seed
SHARED_FAIL = 0.25  # below: the members learned different things (one collapsed or diverged)
MEMBER_BROKEN = 0.5  # a member's held-out perturbation accuracy below this ...
ENSEMBLE_FINE = 0.9  # ... while the ensemble's is above this: a broken member
# the rerun line of ENSEMBLE_NOTES 1.4 (N = 3, k = 20): shared with a rerun ~ a + b s
RERUN_LINE = (7.04, 0.66)
# one generator, the demo: its up-20 shares this many genes with another seed's (median over
# the 10 classes, and the worst class; ENSEMBLE_NOTES 1.1, mean P, N = 1)
ONE_SEED_SHARED = (17.9, 14.1)
# sample size
MIN_TARGET_SAMPLES = 10

TITLES = {
    "target_model": "target model",
    "moved": "generator moved the samples",
    "agreement": "independent classifiers agree",
    "realism": "perturbed samples look like the target",
    "sample_size": "sample size",
    "moved_selection": "this selection moved",
    "data_fit": "data fit the model",
    "stability": "top genes stable over the generators' seeds",
}


# ----------------------------------------------------------------------------- grading


def grade(
    *,
    heldout: Mapping | None = None,
    selection: Mapping | None = None,
    data_fit: Mapping | None = None,
    stability: Mapping | None = None,
    stored: Mapping | None = None,
    config: Mapping | None = None,
    target: str | None = None,
) -> dict:
    """Grade a bundle and a selection: ok / caution / fail overall (the worst check).

    Parameters
    ----------
    heldout
        :func:`tspg.metrics.heldout_figures` of the bundle's held-out split: gives the
        checks ``target_model``, ``moved``, ``agreement``, ``realism`` and ``sample_size``.
    selection
        :func:`selection_figures` of a selection perturbed with the bundle: ``moved_selection``.
    data_fit
        :func:`data_fit_figures` of the selection's data: ``data_fit``.
    stability
        :func:`stability_figures` of the bundle's generators: ``stability``.
    stored
        A verdict graded earlier (usually ``bundle.manifest["verdict"]``); its checks are
        kept unless the same check is graded here anew.
    config
        The bundle's training config (``manifest["config"]``): says why a generator of the
        paper's recipe collapsed.
    target
        The target class, named in the reasons (default: the stored verdict's, if any).

    Returns
    -------
    The verdict dict described in the module docstring.
    """
    checks: dict[str, dict] = {}
    if stored:
        for name, check in stored.get("checks", {}).items():
            checks[name] = dict(check)
    target = target or (stored or {}).get("target")
    if heldout:
        checks.update(_heldout_checks(heldout, config or {}, target))
    if selection:
        checks["moved_selection"] = _moved(selection, None, config or {}, "selection")
    if data_fit:
        checks["data_fit"] = _data_fit(data_fit)
    if stability:
        checks["stability"] = _stability(stability)
    return _verdict(checks, target)


def _verdict(checks: dict[str, dict], target: str | None) -> dict:
    level = worst(c["level"] for c in checks.values())
    bad = [c for c in checks.values() if c["level"] == level and level != "ok"]
    if not checks:
        summary = "nothing graded"
    elif level == "ok":
        summary = f"ok: all {len(checks)} checks pass"
    else:
        summary = f"{level}: " + "; ".join(c["title"] for c in bad)
    return {
        "level": level if checks else "caution",
        "summary": summary,
        "target": target,
        "checks": checks,
        "version": VERSION,
    }


def worst(levels) -> str:
    """The worst of some levels (``ok`` when there is none)."""
    levels = list(levels)
    return max(levels, key=LEVELS.index) if levels else "ok"


def _check(name: str, level: str, reason: str, figures: dict, scope: str = "held-out") -> dict:
    return {
        "title": TITLES[name],
        "level": level,
        "reason": reason,
        "scope": scope,
        "figures": {k: v for k, v in figures.items() if _finite(v["value"])},
    }


def _fig(label: str, value, n: int | None) -> dict:
    v = None if value is None else float(value) if isinstance(value, float) else value
    return {"label": label, "value": v, "n": None if n is None else int(n)}


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))


def _num(d: Mapping, key: str) -> float:
    """d[key] as a float; NaN when absent or None."""
    v = d.get(key)
    return float("nan") if v is None else float(v)


def _skill(value: float, guess: float) -> float:
    """How much of the way from a guess to perfect: (value - guess) / (1 - guess)."""
    if not (_finite(value) and _finite(guess)) or guess >= 1:
        return float("nan")
    return (value - guess) / (1 - guess)


def _f(v: float, digits: int = 2) -> str:
    return "n/a" if not _finite(v) else f"{v:.{digits}f}"


def _heldout_checks(h: Mapping, config: Mapping, target: str | None) -> dict[str, dict]:
    t = f"{target!r}" if target else "the target"
    samples = h.get("samples", {})
    out = {"target_model": _target_model(h["target_model"], t)}
    moved = dict(h.get("movement", {}))
    moved["non_target_accuracy"] = h.get("perturbation_accuracy", {}).get("non_target")
    moved["n_non_target"] = h.get("perturbation_accuracy", {}).get("n_non_target")
    out["moved"] = _moved(moved, h["target_model"], config, "held-out")
    out["agreement"] = _agreement(h.get("independent_classifiers", {}), samples, t)
    out["realism"] = _realism(h.get("energy_distance", {}), samples, t)
    out["sample_size"] = _sample_size(samples, t)
    return out


def _target_model(tm: Mapping, t: str) -> dict:
    acc, majority, chance = (
        _num(tm, "heldout_accuracy"),
        _num(tm, "majority_rate"),
        _num(tm, "chance"),
    )
    recall, precision = _num(tm, "target_recall"), _num(tm, "target_precision")
    prevalence = _num(tm, "target_prevalence")
    n, n_t, n_called = tm.get("n"), tm.get("n_target"), tm.get("n_called_target")
    figures = {
        "heldout_accuracy": _fig("held-out accuracy", acc, n),
        "majority_rate": _fig("always answering the largest class", majority, n),
        "chance": _fig("chance (1 / classes)", chance, None),
        "target_recall": _fig("target recall (target samples called the target)", recall, n_t),
        "target_precision": _fig(
            "target precision (samples called the target that are)", precision, n_called
        ),
        "target_prevalence": _fig("target prevalence (a guess's precision)", prevalence, n),
    }
    skills = [_skill(recall, chance), _skill(precision if n_called else 0.0, prevalence)]
    skill = min(s for s in skills if _finite(s)) if any(_finite(s) for s in skills) else math.nan
    what = f"recognises {_count(recall, n_t)} of {n_t} held-out {t} samples (recall {_f(recall)}; a guess: {_f(chance)})"
    if n_called:
        what += (
            f"; of the {n_called} it calls {t}, {_count(precision, n_called)} are "
            f"(precision {_f(precision)}; a guess: {_f(prevalence)})"
        )
    elif n_called == 0:
        what += f" and calls no held-out sample {t}"
    if not _finite(skill):
        return _check(
            "target_model",
            "caution",
            f"no held-out {t} sample to judge the target model on",
            figures,
        )
    if skill < SKILL_FAIL:
        level, reason = (
            "fail",
            f"it cannot tell {t} apart: it {what}; the perturbation accuracy means little",
        )
    elif skill < SKILL_CAUTION:
        level, reason = "caution", f"it tells {t} apart only roughly: it {what}"
    else:
        level, reason = "ok", f"it {what}"
    if level == "ok" and _finite(acc) and _finite(majority) and acc <= majority:
        level = "caution"
        reason += f"; overall it is right on {_f(acc)}, no better than always answering the largest class ({_f(majority)})"
    return _check("target_model", level, reason, figures)


def _count(share: float, n) -> str:
    return "?" if not _finite(share) or n is None else str(int(round(share * n)))


def _moved(m: Mapping, tm: Mapping | None, config: Mapping, scope: str) -> dict:
    name = "moved" if scope == "held-out" else "moved_selection"
    mean_abs_P, gap, reach = _num(m, "mean_abs_P"), _num(m, "mean_abs_gap"), _num(m, "reach")
    changed, n, n_nt = _num(m, "changed_share"), m.get("n"), m.get("n_not_target_before")
    acc, n_acc = _num(m, "non_target_accuracy"), m.get("n_non_target")
    margin = _num(tm or {}, "margin_source_median")
    figures = {
        "mean_abs_P": _fig("mean |P| (scaled units)", mean_abs_P, n),
        "mean_abs_gap": _fig("mean |target mean - x|", gap, n),
        "reach": _fig("reach: mean |P| / mean |target mean - x|", reach, n),
        "changed_share": _fig("calls changed (of samples not called the target)", changed, n_nt),
    }
    if _finite(acc):
        figures["non_target_accuracy"] = _fig("perturbation accuracy (non-target)", acc, n_acc)
    if _finite(margin):
        figures["margin_source_median"] = _fig(
            "target model's logit margin over the target (median, sources)", margin, n_acc
        )
    which = "the held-out samples" if scope == "held-out" else "these samples"
    size = f"mean |P| {_f(mean_abs_P, 3)}, {_f(reach)} of the way to the target mean"
    if not n:
        return _check(name, "caution", f"no sample to judge how far {which} moved", figures, scope)
    if _finite(reach) and reach < REACH_FAIL or mean_abs_P == 0:
        reason = f"the generator collapsed: it barely changes {which} ({size})"
        if _saturated(config, margin):
            reason += (
                f"; the target model's softmax is saturated (logit margin {_f(margin, 0)}), so the "
                "paper's Carlini-Wagner term on probabilities has no gradient and L_norm shrinks "
                "the perturbation to nothing: train with the default tspg+ recipe"
            )
        return _check(name, "fail", reason, figures, scope)
    if _finite(changed) and changed < CHANGED_FAIL:
        reason = (
            f"the target model's call changed on only {_f(changed)} of {which} ({size}): "
            "the generator does not reach the target"
        )
        if _saturated(config, margin):
            reason += (
                f"; the target model's softmax is saturated (logit margin {_f(margin, 0)}), so the "
                "paper's Carlini-Wagner term on probabilities has no gradient: train with the "
                "default tspg+ recipe"
            )
        return _check(name, "fail", reason, figures, scope)
    if _finite(changed) and changed < CHANGED_CAUTION:
        return _check(
            name,
            "caution",
            f"the call changed on {_f(changed)} of {which} ({size})",
            figures,
            scope,
        )
    calls = f"; the call changed on {_f(changed)}" if _finite(changed) else ""
    return _check(name, "ok", f"{which} moved ({size}){calls}", figures, scope)


def _saturated(config: Mapping, margin: float) -> bool:
    return config.get("adv_space") == "probs" and _finite(margin) and margin >= SATURATED_MARGIN


def _graded(samples: Mapping) -> tuple:
    """Source and target samples the classifiers and energy distances scored."""
    return (
        samples.get("graded_source", samples.get("heldout_source")),
        samples.get("graded_target", samples.get("heldout_target")),
    )


def _x_adv(samples: Mapping) -> str:
    """How the figures name x_adv: for a seed ensemble, the median over its generators'
    own x_adv (:func:`tspg.metrics.heldout_arrays`)."""
    n = samples.get("generators")
    return f"x_adv (median of the {n} generators')" if n else "x_adv"


def _agreement(clf: Mapping, samples: Mapping, t: str) -> dict:
    n_src, n_t = _graded(samples)
    figures, ratios, weak, parts = {}, {}, [], []
    for name, vals in clf.items():
        label = _CLASSIFIER_NAMES.get(name, name.replace("_", " "))
        pert, real = _num(vals, "target_share_perturbed"), _num(vals, "target_share_real_target")
        figures[f"{name}_perturbed"] = _fig(
            f"{label}: {_x_adv(samples)} called the target", pert, n_src
        )
        figures[f"{name}_real_target"] = _fig(f"{label}: real target samples called it", real, n_t)
        if not (_finite(pert) and _finite(real)):
            continue
        parts.append(f"{label} {_f(pert)} / {_f(real)}")
        if real >= REAL_RECOGNISED_MIN:
            ratios[name] = pert / real
        else:
            weak.append(label)
    if not parts:
        return _check("agreement", "caution", f"no held-out {t} sample to compare with", figures)
    text = f"share of x_adv / of the real {t} samples called {t}: " + ", ".join(parts)
    if not ratios:
        return _check(
            "agreement",
            "caution",
            f"the independent classifiers do not recognise the real {t} samples either, "
            f"so their agreement cannot be judged: {text}",
            figures,
        )
    if all(r < AGREEMENT_FAIL for r in ratios.values()):
        level, reason = "fail", f"independent classifiers mostly do not see {t} in x_adv: {text}"
    elif any(r < AGREEMENT_CAUTION for r in ratios.values()):
        level, reason = "caution", f"independent classifiers partly disagree: {text}"
    else:
        level, reason = "ok", text
    if weak and level == "ok":
        level = "caution"
        reason += f"; {' and '.join(weak)} recognise fewer than half the real {t} samples, which weakens the comparison"
    return _check("agreement", level, reason, figures)


_CLASSIFIER_NAMES = {"logistic_regression": "logistic regression", "knn_15": "15-NN"}


def _realism(ed: Mapping, samples: Mapping, t: str) -> dict:
    n_src, n_t = _graded(samples)
    pert, unpert, ms = _num(ed, "perturbed"), _num(ed, "unperturbed"), _num(ed, "mean_shift")
    figures = {
        "perturbed": _fig(
            f"energy distance of {_x_adv(samples)} to the real held-out target (n={n_t})",
            pert,
            n_src,
        ),
        "unperturbed": _fig("the same for the unperturbed sources", unpert, n_src),
        "mean_shift": _fig("the same for the mean-shift baseline", ms, n_src),
    }
    if not (_finite(pert) and _finite(unpert)):
        return _check("realism", "caution", f"no held-out {t} sample to compare with", figures)
    progress = (unpert - pert) / (unpert - ms) if _finite(ms) and unpert > ms else math.nan
    if _finite(progress):
        figures["progress"] = _fig(
            "progress: (E(x) - E(x_adv)) / (E(x) - E(mean shift))", progress, n_src
        )
    text = f"energy distance to the real {t} samples: x_adv {_f(pert, 3)}, unperturbed {_f(unpert, 3)}, mean shift {_f(ms, 3)}"
    if _finite(ms) and ms >= unpert:
        return _check(
            "realism",
            "caution",
            f"the energy distance cannot judge here: even the mean shift lands no nearer the "
            f"{n_t} real {t} samples than the unperturbed sources ({text})",
            figures,
        )
    if pert >= unpert:
        return _check(
            "realism",
            "fail",
            f"x_adv lands no nearer the real {t} samples than where the samples started ({text})",
            figures,
        )
    if _finite(progress) and progress < PROGRESS_CAUTION:
        return _check(
            "realism",
            "caution",
            f"x_adv gets {_f(progress)} of the way the mean shift gets towards the real {t} samples ({text})",
            figures,
        )
    return _check("realism", "ok", text, figures)


def _sample_size(samples: Mapping, t: str) -> dict:
    n_t, n_src = samples.get("heldout_target"), samples.get("heldout_source")
    n_fit, n_train = samples.get("classifier_train"), samples.get("train")
    n_graded = (samples.get("graded_target") or 0) + (samples.get("graded_source") or 0)
    n_heldout = samples.get("heldout")
    figures = {
        "heldout_target": _fig("held-out target samples", n_t, n_t),
        "heldout_source": _fig("held-out source samples", n_src, n_src),
        "train": _fig("training samples", n_train, n_train),
    }
    sub = []
    if n_graded is not None and n_heldout is not None and n_graded < n_heldout:
        sub.append(
            f"classifiers and energy distances scored a subsample of {n_graded} of {n_heldout} held-out samples"
        )
    if n_fit is not None and n_train is not None and n_fit < n_train:
        sub.append(f"classifiers fit on {n_fit} of {n_train} training samples")
    note = f" ({'; '.join(sub)})" if sub else ""
    if not n_t:
        return _check(
            "sample_size",
            "caution",
            f"no held-out {t} sample: most figures cannot be judged{note}",
            figures,
        )
    if n_t < MIN_TARGET_SAMPLES:
        return _check(
            "sample_size",
            "caution",
            f"only {n_t} held-out {t} samples: the figures that compare with them (recall, agreement, energy distance) can swing widely{note}",
            figures,
        )
    return _check(
        "sample_size", "ok", f"{n_t} held-out {t} and {n_src} source samples{note}", figures
    )


# ----------------------------------------------------------------------------- data fit


def outside_range(X, scaler) -> dict:
    """How much of raw, gene-aligned data ``X`` falls outside the training range of ``scaler``.

    Uses the tolerance of :meth:`tspg.data.Scaler.transform` (float rounding at the edges).

    Returns
    -------
    ``outside_share`` (of all values), ``below_share``, ``above_share``, ``n_values``,
    ``n_samples``, and ``worst_gene`` (column) with ``worst_gene_share``.
    """
    from .data import RANGE_TOLERANCE

    X = np.asarray(X, dtype=np.float32)
    below = np.zeros(X.shape[1] if X.ndim == 2 else 0)
    above = np.zeros_like(below)
    for i in range(0, len(X), 4096):  # bounded memory for large selections
        Xs = (X[i : i + 4096] - scaler.minimum) / scaler.range
        below += (Xs < -RANGE_TOLERANCE).sum(0)
        above += (Xs > 1 + RANGE_TOLERANCE).sum(0)
    n = X.size
    per_gene = (below + above) / max(len(X), 1)
    return {
        "outside_share": float((below.sum() + above.sum()) / n) if n else 0.0,
        "below_share": float(below.sum() / n) if n else 0.0,
        "above_share": float(above.sum() / n) if n else 0.0,
        "n_values": int(n),
        "n_samples": int(len(X)),
        "worst_gene": int(per_gene.argmax()) if len(per_gene) else None,
        "worst_gene_share": float(per_gene.max()) if len(per_gene) else 0.0,
    }


def data_fit_figures(
    *,
    n_genes: int,
    n_samples: int,
    outside_share: float,
    n_missing: int = 0,
    n_case_matched: int = 0,
    worst_gene: str | None = None,
    worst_gene_share: float | None = None,
) -> dict:
    """The numbers the ``data_fit`` check grades, from whatever matched the genes.

    Parameters
    ----------
    n_genes
        The bundle's genes.
    n_samples
        Samples of the selection.
    outside_share
        Share of values outside the training range (:func:`outside_range`).
    n_missing
        The bundle's genes absent from the data (filled in some way by the matching).
    n_case_matched
        Genes found only by ignoring upper / lower case.
    worst_gene, worst_gene_share
        The gene with the most values outside the range, and its share.
    """
    return {
        "n_genes": int(n_genes),
        "n_samples": int(n_samples),
        "outside_share": float(outside_share),
        "n_missing": int(n_missing),
        "n_case_matched": int(n_case_matched),
        "worst_gene": worst_gene,
        "worst_gene_share": worst_gene_share,
    }


def _data_fit(d: Mapping) -> dict:
    n_genes, n_samples = int(d["n_genes"]), d.get("n_samples")
    outside = float(d["outside_share"])
    missing, case = int(d.get("n_missing", 0)), int(d.get("n_case_matched", 0))
    gene_share = (missing + case) / n_genes if n_genes else 0.0
    figures = {
        "outside_share": _fig("values outside the training range", outside, n_samples),
        "missing_genes": _fig("genes missing", missing, n_genes),
        "case_matched_genes": _fig("genes matched only ignoring case", case, n_genes),
        "doubtful_gene_share": _fig(
            "share of genes missing or matched ignoring case", gene_share, n_genes
        ),
    }
    if d.get("worst_gene_share") is not None:
        figures["worst_gene_share"] = _fig(
            f"most affected gene{'' if d.get('worst_gene') is None else ' ' + str(d['worst_gene'])}",
            float(d["worst_gene_share"]),
            n_samples,
        )
    parts = []
    if outside > OUTSIDE_CAUTION:
        worst = d.get("worst_gene")
        most = (
            f" (most: gene {worst}, {100 * float(d['worst_gene_share']):.0f}% of its values)"
            if worst is not None and d.get("worst_gene_share") is not None
            else ""
        )
        parts.append(
            f"{100 * outside:.0f}% of the values fall outside the training range and are "
            f"clipped{most}: other units or another normalisation?"
        )
    if gene_share > GENES_CAUTION:
        parts.append(
            f"{missing + case} of the model's {n_genes} genes are missing ({missing}) or matched only ignoring case ({case})"
        )
    if outside > OUTSIDE_FAIL or gene_share > GENES_FAIL:
        return _check(
            "data_fit",
            "fail",
            "the data do not fit the model: " + "; ".join(parts),
            figures,
            "selection",
        )
    if parts:
        return _check("data_fit", "caution", "; ".join(parts), figures, "selection")
    return _check(
        "data_fit",
        "ok",
        f"{100 * outside:.1f}% of values outside the training range; {missing} genes missing, {case} matched ignoring case",
        figures,
        "selection",
    )


# ----------------------------------------------------------------------------- stability


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    """|a & b| / |a | b| of two gene lists (NaN when both are empty)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else float("nan")


def stability_figures(
    bundle, Xs: np.ndarray, *, k: int = 20, members_mean_P: np.ndarray | None = None
) -> dict:
    """How the generators of ``bundle`` agree on the top genes of the scaled source samples
    ``Xs`` (:func:`tspg.ranking.member_agreement` of their mean P, computed a chunk of rows
    at a time: memory holds each member's running sum), with ``n_samples`` and each member's
    and the ensemble's held-out perturbation accuracy (from the manifest) when known.
    ``members_mean_P``: each member's mean P over ``Xs`` (members x genes) when the caller
    has it already; the members are then not run again."""
    from .perturbation import ensemble_perturbed
    from .ranking import member_agreement

    n = bundle.n_generators
    figures: dict = {"n_members": n, "k": k, "n_samples": int(len(Xs))}
    if n < 2 or len(Xs) == 0:
        return figures
    if members_mean_P is None:
        sums = np.zeros((n, Xs.shape[1]), dtype=np.float64)
        step = max(1, (64 * 2**20) // (4 * n * max(Xs.shape[1], 1)))
        for i in range(0, len(Xs), step):
            _, _, P_members = ensemble_perturbed(bundle, Xs[i : i + step])
            sums += P_members.sum(1, dtype=np.float64)
        members_mean_P = sums / len(Xs)
    figures.update(member_agreement(members_mean_P, k=k))
    key = "perturbation_accuracy_non_target"
    accuracies = [m.get("metrics", {}).get(key) for m in bundle.manifest.get("generators", [])]
    if accuracies and all(a is not None for a in accuracies):
        figures["member_accuracy"] = [float(a) for a in accuracies]
    if bundle.metrics.get(key) is not None:
        figures["ensemble_accuracy"] = float(bundle.metrics[key])
    return figures


def _stability(st: Mapping) -> dict:
    n, k = int(st.get("n_members", 1)), int(st.get("k", 20))
    if n < 2:
        med, worst_ = ONE_SEED_SHARED
        return _check(
            "stability",
            "ok",
            f"not graded: one generator, whose top genes depend on its seed (on the demo one "
            f"generator's up-20 shares {med} of 20 genes with another seed's, median over the "
            f"classes, {worst_} on the worst); train with --seeds 3 to measure it",
            {"n_members": _fig("generators", n, st.get("n_samples"))},
            "seeds",
        )
    n_s = st.get("n_samples")
    figures = {
        "n_members": _fig("generators", n, n_s),
        **{
            f"shared_{d}": _fig(
                f"{d} genes two generators' own top-{k} share (mean over pairs)",
                float(st[f"shared_{d}"]),
                n_s,
            )
            for d in ("up", "down")
            if f"shared_{d}" in st
        },
        **{
            f"full_support_{d}": _fig(f"{d} genes in every generator's top-{k}", int(v), n_s)
            for d in ("up", "down")
            if (v := st.get(f"full_support_{d}")) is not None
        },
    }
    accs, ens = st.get("member_accuracy") or [], st.get("ensemble_accuracy")
    broken = [i for i, a in enumerate(accs) if a < MEMBER_BROKEN]
    if broken and ens is not None and ens > ENSEMBLE_FINE:
        i = broken[0]
        return _check(
            "stability",
            "fail",
            f"generator {i} is broken: it moves {_f(accs[i])} of the held-out source samples "
            f"into the target while the ensemble moves {_f(ens)}; retrain with another --seed",
            figures,
            "seeds",
        )
    shared = {d: float(st[f"shared_{d}"]) for d in ("up", "down") if f"shared_{d}" in st}
    if not shared:
        return _check("stability", "ok", "not graded: no samples to compare", figures, "seeds")
    low = min(shared, key=shared.get)
    if shared[low] < SHARED_FAIL * k:
        return _check(
            "stability",
            "fail",
            f"the {n} generators learned different things: they share {_f(shared[low], 1)} of "
            f"their top-{k} {low} genes; one has collapsed or diverged: retrain",
            figures,
            "seeds",
        )
    weak = [d for d in ("up", "down") if d in shared and shared[d] < SHARED_CAUTION * k]
    if weak:
        parts = []
        for d in weak:
            full = st.get(f"full_support_{d}")
            text = f"the {n} generators share {_f(shared[d], 1)} of their top-{k} {d} genes"
            if full is not None:
                text += f" ({full} with full support)"
            if n == 3 and k == 20:
                text += (
                    f"; a rerun would keep about {RERUN_LINE[0] + RERUN_LINE[1] * shared[d]:.0f}"
                )
            parts.append(text)
        return _check(
            "stability",
            "caution",
            f"the top genes depend on the seed: {'; '.join(parts)}; trust the genes marked {n}/{n}",
            figures,
            "seeds",
        )
    text = ", ".join(f"{_f(shared[d], 1)} of {k} {d}" for d in shared)
    return _check(
        "stability",
        "ok",
        f"the {n} generators agree on their top genes: they share {text}",
        figures,
        "seeds",
    )


# ----------------------------------------------------------------------------- a selection


def selection_figures(perturbation, target_mean=None) -> dict:
    """:func:`tspg.metrics.movement_figures` of a :class:`tspg.perturbation.Perturbation`'s samples.

    Samples whose label is the target are left out when labels are known (as in the
    consensus); ``target_mean`` is the bundle's (scaled).
    """
    from .metrics import movement_figures

    rows = perturbation.source_rows()
    return movement_figures(
        perturbation.P[rows],
        perturbation.x[rows],
        target_mean,
        perturbation.pred_before[rows],
        perturbation.pred_after[rows],
        perturbation.target,
    )


def selection_verdict(bundle, perturbation, *, data_fit: Mapping | None = None) -> dict:
    """The bundle's stored verdict plus the checks of one selection (moved, data fit).

    Parameters
    ----------
    bundle
        The bundle the selection was perturbed with (its stored verdict, when it has one).
    perturbation
        The selection, perturbed (:func:`tspg.perturbation.perturb_adata`).
    data_fit
        :func:`data_fit_figures` of the selection (default: the perturbation's own, when
        :func:`tspg.perturbation.perturb_adata` recorded it).
    """
    stored = bundle.manifest.get("verdict")
    data_fit = data_fit if data_fit is not None else getattr(perturbation, "data_fit", None)
    return grade(
        selection=selection_figures(perturbation, bundle.target_mean),
        data_fit=data_fit,
        stored=stored,
        config=bundle.manifest.get("config"),
        target=bundle.target,
    )


# ----------------------------------------------------------------------------- rendering


def verdict_lines(
    verdict: Mapping, *, only: Sequence[str] | None = None, figures: bool = False
) -> list[str]:
    """The verdict as text lines: the level, then one line per check.

    Parameters
    ----------
    only
        Show only the checks of these levels (e.g. ``("fail", "caution")``).
    figures
        Add the figures of each check beneath it, each with the samples it rests on.

    Example::

        verdict: FAIL (the worst of 5 checks)
          [fail]    target model: it cannot tell 'beta' apart: ...
          [ok]      generator moved the samples: ...
    """
    checks = verdict.get("checks", {})
    lines = [f"verdict: {verdict['level'].upper()} (the worst of {len(checks)} checks)"]
    for c in checks.values():
        if only is not None and c["level"] not in only:
            continue
        lines.append(f"  [{c['level']}]{' ' * (8 - len(c['level']))}{c['title']}: {c['reason']}")
        if figures:
            for f in c["figures"].values():
                n = "" if f.get("n") is None else f"  (n={f['n']})"
                lines.append(f"              {f['label']:<62} {_value(f['value'])}{n}")
    return lines


def verdict_markdown(verdict: Mapping) -> str:
    """The verdict as Markdown: the level, then a table of checks (level, check, reason, figures)."""
    rows = [
        f"**Verdict: {verdict['level']}** - {verdict['summary']}",
        "",
        "| level | check | reason | figures |",
        "|---|---|---|---|",
    ]
    for c in verdict.get("checks", {}).values():
        figs = "; ".join(
            f"{f['label']} {_value(f['value'])}"
            + (f" (n={f['n']})" if f.get("n") is not None else "")
            for f in c["figures"].values()
        )
        rows.append(f"| {c['level']} | {c['title']} | {_md(c['reason'])} | {_md(figs)} |")
    return "\n".join(rows)


def verdict_table(verdict: Mapping):
    """The verdict as a long DataFrame: ``check``, ``level``, ``figure``, ``value``, ``n``, ``reason``."""
    import pandas as pd

    rows = []
    for name, c in verdict.get("checks", {}).items():
        for f in c["figures"].values() or [{"label": "", "value": None, "n": None}]:
            rows.append(
                {
                    "check": name,
                    "level": c["level"],
                    "figure": f["label"],
                    "value": f["value"],
                    "n": f["n"],
                    "reason": c["reason"],
                }
            )
    return pd.DataFrame(rows, columns=["check", "level", "figure", "value", "n", "reason"])


def _value(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


# ----------------------------------------------------------------------------- held-out


MAX_TRAIN = 2_000  # training samples that fit the independent classifiers at training time
MAX_HELDOUT = 1_000  # held-out source (and target) samples scored at training time (energy
# distances and the 15-NN cost O(n^2))


def heldout_verdict(
    bundle,
    Xtr,
    ytr,
    Xte,
    yte,
    samples=None,
    *,
    classifiers: dict | None = None,
    seed: int = 0,
    max_train: int | None = MAX_TRAIN,
    max_heldout: int | None = MAX_HELDOUT,
) -> dict:
    """Grade a bundle on its held-out split (scaled arrays); the verdict stored at training time.

    The figures are :func:`tspg.metrics.heldout_figures` (the same ``tspg evaluate``
    reports), on seeded subsamples of at most ``max_train`` training and ``max_heldout``
    held-out samples, so the cost stays small on large data; the stability check's are
    :func:`stability_figures` of every held-out source sample given.
    """
    from .metrics import heldout_figures

    figures = heldout_figures(
        bundle,
        Xtr,
        ytr,
        Xte,
        yte,
        samples,
        classifiers=classifiers,
        seed=seed,
        max_train=max_train,
        max_heldout=max_heldout,
    )
    source = np.asarray(yte).astype(str) != str(bundle.target)
    return grade(
        heldout=figures,
        stability=stability_figures(bundle, np.asarray(Xte)[source]),
        config=bundle.manifest.get("config"),
        target=bundle.target,
    )
