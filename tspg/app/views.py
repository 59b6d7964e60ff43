"""What the pages show, assembled from tspg's results: pure functions, no streamlit.

Frames for the charts, labels for pickers, and the "equivalent command" of a page.
"""

from __future__ import annotations

import hashlib
import shlex
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..charts import gene_distribution_frame
from ..charts import heatmap_frame as _heatmap_frame
from ..datasets import DEMO_NAME
from ..embedding import map_frame
from ..errors import UserError
from ..ranking import RANKED_BY, member_support, support_text
from .keys import ALL_SOURCES
from .selection import Data

if TYPE_CHECKING:
    from ..baselines import SourceComparison

__all__ = [
    "bundle_label",
    "cache_key",
    "command",
    "data_arg",
    "data_choices",
    "demo_epochs",
    "gene_frames",
    "heatmap_frame",
    "generators_table",
    "heatmap_title",
    "SUPPORT_MARKER",
    "support_legend",
    "is_demo",
    "loss_table",
    "missing_genes_frame",
    "models_arg",
    "open_bundle_from_pick",
    "own_dataset_hint",
    "scaler_key",
    "source_choices",
    "source_view",
    "sources_of",
    "sweep_table",
    "target_label",
    "top_genes_table",
    "verdict_level",
    "verdict_rows",
]


def is_demo(manifest: dict) -> bool:
    """Whether a bundle was trained on the demo data (the only dataset tspg can find itself)."""
    return manifest["dataset"]["name"] == DEMO_NAME


def bundle_label(manifest: dict) -> str:
    """What a bundle is, under its name in the sidebar: target, dataset and gene set."""
    return (
        f"target **{manifest['target']}** · dataset {manifest['dataset']['name']} · "
        f"gene set {manifest['gene_set']['name']}"
    )


def target_label(name: str, manifests: dict[str, dict]) -> str:
    """A bundle in the Perturb page's target picker: its target, and its name only when
    another bundle has the same target."""
    target = manifests.get(name, {}).get("target", name)
    same = [n for n, m in manifests.items() if m.get("target") == target]
    return target if len(same) <= 1 else f"{target} ({name})"


def data_choices(manifest: dict) -> dict[str, str]:
    """The sidebar's data choices for a bundle: its own dataset, the demo (unless that is the
    bundle's own dataset: one choice, not two names for the same data) and an upload."""
    name = manifest["dataset"]["name"]
    if is_demo(manifest):
        return {"bundle": f"Its own dataset: {name} (the demo)", "upload": "Upload a .h5ad file"}
    return {
        "bundle": f"Its own dataset: {name} (upload it)",
        "demo": f"Demo: {DEMO_NAME}",
        "upload": "Upload other data (.h5ad)",
    }


def own_dataset_hint(manifest: dict) -> str:
    """Where to find a bundle's own dataset (for a bundle that is not the demo's)."""
    ds = manifest["dataset"]
    n = f" ({ds['n_samples']} samples)" if ds.get("n_samples") else ""
    return (
        f"{manifest['name']} was trained on {ds['name']}{n}, which is not stored with the bundle: upload that .h5ad file "
        "in the sidebar to perturb its held-out samples (it is recognised by its fingerprint), or choose other data."
    )


def demo_epochs(raw) -> int | None:
    """The demo's generator epochs from a setting (session or ``$TSPG_DEMO_EPOCHS``); None
    when unset, UserError when it is not a whole number of at least 1."""
    if raw is None or raw == "":
        return None
    try:
        epochs = int(raw)
    except ValueError:
        raise UserError(f"TSPG_DEMO_EPOCHS={raw!r} is not a whole number of epochs") from None
    if epochs < 1:
        raise UserError(f"TSPG_DEMO_EPOCHS={raw!r}: the demo needs at least 1 epoch")
    return epochs


# ----------------------------------------------------------------------------- frames


SUPPORT_MARKER = " °"  # after a heatmap gene below full support


def support_legend(k: int) -> str:
    """The heatmap's legend of :data:`SUPPORT_MARKER`."""
    return f"°: not in every generator's own top {k}: may change on a rerun"


def heatmap_frame(pert, target_mean, *, n_genes: int) -> pd.DataFrame:
    """:func:`tspg.charts.heatmap_frame` of a perturbation: one sample, or the mean x, P and
    x_adv over a selection's source samples (:meth:`~tspg.perturbation.Perturbation.source_rows`,
    the samples :func:`top_genes_table` ranks); the target mean column empty (NaN) when
    ``target_mean`` is None. For a seed ensemble whose members' P is known, the genes below
    full support (not in every member's own top ``n_genes``) carry :data:`SUPPORT_MARKER`."""
    rows = pert.source_rows()
    src = pert.subset(rows)
    tm = np.full(len(src.genes), np.nan) if target_mean is None else target_mean
    frame = _heatmap_frame(
        src.genes,
        src.x.mean(0, dtype=np.float64),
        src.P.mean(0, dtype=np.float64),
        src.x_adv.mean(0, dtype=np.float64),
        tm,
        n_genes=n_genes,
    )
    if src.P_members is not None:
        support = member_support(src.P_members, k=n_genes)
        pos = {g: i for i, g in enumerate(src.genes)}
        full = len(src.P_members)
        partial = [
            support[d][pos[g]] < full
            for g, d in zip(frame["gene"], frame["direction"], strict=True)
        ]
        frame.loc[partial, "gene"] = frame.loc[partial, "gene"] + SUPPORT_MARKER
    return frame


def top_genes_table(pert, *, k: int) -> pd.DataFrame:
    """The top ``k`` genes per direction of a perturbation's source samples, by
    :func:`tspg.ranking.rank_genes` (the heatmap's and the enrichment's lists); for a seed
    ensemble whose members' P is known, ``support`` reads "2/3" (in how many members' own
    top ``k`` the gene is)."""
    df = pert.ranking(k=k)
    if "support" in df:
        df["support"] = support_text(df["support"], df["n_members"])
    return df


def heatmap_title(pert, *, target: str) -> tuple[str, str]:
    """(title, subtitle) of the heatmap: for one sample its id, class and the target model's
    call before and after; for a selection how many source samples the means are over."""
    n_src = int(pert.source_rows().sum())
    if len(pert) == 1:
        sample = pert.samples[0]
        cls = f" ({pert.labels[0]})" if pert.labels is not None else ""
        call = ""
        if pert.predicted:
            call = f"called {pert.pred_before[0]} before, {pert.pred_after[0]} after"
        return f"Sample {sample}{cls}", call
    left = len(pert) - n_src
    note = f" ({left} of the target class left out)" if left else ""
    return (
        f"Mean over {n_src} source samples{note}",
        f"genes ranked by {RANKED_BY} towards {target}",
    )


def gene_frames(ref, coords, pert, Xs, rows, labels, gene: str) -> dict[str, pd.DataFrame]:
    """One gene's scaled expression for ``charts.gene_map_chart`` (``"map"``: the map frame
    with ``value``) and ``charts.gene_distribution_chart`` (``"distribution"``: every real
    sample by class, and the perturbed samples by source class).

    ``ref``/``rows``: the reference map and its rows in ``Xs`` (the data, scaled);
    ``coords``: the perturbed samples' places on it; ``labels``: every sample's class.
    """
    j = list(pert.genes).index(gene)
    frame = map_frame(ref, coords, new_samples=pert.samples, new_source=pert.labels)
    frame["value"] = np.concatenate([Xs[rows, j], pert.x_adv[:, j]])
    dist = gene_distribution_frame(labels, Xs[:, j], pert.labels, pert.x_adv[:, j])
    return {"map": frame, "distribution": dist}


def sources_of(src, baselines, *, k: int) -> SourceComparison:
    """:func:`tspg.baselines.source_comparison` of a selection's source samples ``src`` (a
    :class:`~tspg.perturbation.Perturbation` with labels) against the bundle's baselines."""
    from ..baselines import source_comparison

    if src.labels is None:
        raise UserError("the per-source baselines need the samples' classes")
    pred = src.pred_after if src.predicted else None
    return source_comparison(
        src.P,
        src.x,
        src.labels,
        src.genes,
        baselines,
        target=src.target,
        k=k,
        pred_after=pred,
        members=src.P_members,
    )


def source_choices(labels, target: str) -> list[str]:
    """The Genes page's source picker: "all sources", then each source class of the selection."""
    if labels is None:
        return [ALL_SOURCES]
    classes = sorted(set(np.asarray(labels).astype(str).tolist()) - {target})
    return [ALL_SOURCES, *classes]


def source_view(comparison: SourceComparison, source: str) -> dict:
    """What the Genes page shows for one source class: ``row`` (its summary record),
    ``summary`` (that row as :func:`tspg.baselines.source_table`), ``tspg`` (TSPG's top k
    genes of the class) and ``baselines`` (the genes both baselines rank high and TSPG does
    not), both as :func:`tspg.baselines.gene_table`; ``note`` says why a class has no tables
    (too few samples, no baseline), else None."""
    from ..baselines import gene_table, source_table

    row, tspg, base = comparison.source(source)
    return {
        "row": row,
        "summary": source_table([row]),
        "tspg": gene_table(tspg),
        "baselines": gene_table(base),
        "note": None if row["status"] == "ok" else row["status"],
    }


# what each loss of a bundle's history measures (the Models page's table)
LOSSES = {
    "total": ("", "the generator's loss: the weighted sum of the terms below (lower is better)"),
    "gan": (
        "w_gan",
        "least-squares GAN term: how far the discriminator is from calling x_adv real (0: fooled)",
    ),
    "adv": (
        "w_adv",
        "Carlini-Wagner term: the best other class's score minus the target's (target model); "
        "it bottoms out at -kappa once x_adv is called the target with that margin",
    ),
    "norm": ("w_norm", "L2 norm of the generator's output G(x): the size of the change"),
    "td": ("w_td", "L1 distance of x_adv to a draw from the target class's distribution"),
    "ed": (
        "w_ed",
        "energy distance between x_adv and real target samples: how unlike real target samples x_adv is",
    ),
    "d_loss": ("", "the discriminator's own loss (real samples -> 1, x_adv -> 0)"),
}


def generators_table(manifest: dict) -> pd.DataFrame:
    """One row per generator of a bundle (member 0 first): its seed, weight file, held-out
    perturbation accuracy (source samples) and training seconds, where stored."""
    from ..bundle import member_files

    rows = []
    for i, m in enumerate(member_files(manifest)):
        metrics = m.get("metrics") or (manifest.get("metrics", {}) if i == 0 else {})
        rows.append(
            {
                "generator": i,
                "seed": int(m["seed"]),
                "file": m["file"],
                "perturbation accuracy": metrics.get("perturbation_accuracy_non_target"),
                "seconds": metrics.get("train_seconds_generator"),
            }
        )
    return pd.DataFrame(rows)


def loss_table(history: dict, config: dict) -> pd.DataFrame:
    """One row per loss in ``history``: its weight in the generator's loss (from the
    bundle's ``config``; blank for the total and the discriminator's loss) and what it measures."""
    rows = []
    for name in history:
        weight_key, meaning = LOSSES.get(name, ("", ""))
        weight = config.get(weight_key, "") if weight_key else ""
        rows.append(
            {"loss": name, "weight": "" if weight == "" else f"{weight:g}", "meaning": meaning}
        )
    return pd.DataFrame(rows, columns=["loss", "weight", "meaning"])


def verdict_rows(verdict: dict) -> pd.DataFrame:
    """One row per check of a verdict (:mod:`tspg.verdict`), the worst first: ``level``,
    ``check``, ``scope``, ``reason`` and ``figures`` (each with the samples it rests on)."""
    order = {"fail": 0, "caution": 1, "ok": 2}
    rows = []
    for c in verdict.get("checks", {}).values():
        figs = "; ".join(
            f"{f['label']}: {_figure(f['value'])}"
            + (f" (n={f['n']})" if f.get("n") is not None else "")
            for f in c.get("figures", {}).values()
        )
        rows.append(
            {
                "level": c["level"],
                "check": c["title"],
                "scope": c.get("scope", ""),
                "reason": c["reason"],
                "figures": figs,
            }
        )
    frame = pd.DataFrame(rows, columns=["level", "check", "scope", "reason", "figures"])
    return frame.sort_values("level", key=lambda s: s.map(order), kind="stable").reset_index(
        drop=True
    )


def _figure(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def missing_genes_frame(match) -> pd.DataFrame:
    """The bundle's genes a :class:`tspg.data.GeneMatch` did not find (the download)."""
    return pd.DataFrame({"gene": list(match.missing)})


def verdict_level(manifest: dict) -> str | None:
    """A bundle's stored verdict level (ok / caution / fail), None when it has none."""
    v = manifest.get("verdict")
    return v.get("level") if isinstance(v, dict) else None


def sweep_table(results: pd.DataFrame) -> pd.DataFrame:
    """A sweep's results (:func:`tspg.sweep.read_results`) as the Sweep page's table: one row
    per bundle, the best perturbation accuracy first."""
    r = results
    table = pd.DataFrame(
        {
            "gene set": r["gene_set"],
            "target": r["target"],
            "verdict": r["verdict"].where(r["status"] != "failed", "failed"),
            "accuracy": r["perturbation_accuracy_non_target"],
            "target-model accuracy": r["target_model_accuracy"],
            "energy distance": r["e_distance"],
            "before": r["e_distance_unperturbed"],
            "genes": r["genes"],
            "status": r["status"],
            "bundle": r["bundle"],
            "error": r["error"],
        }
    )
    return table.sort_values(
        ["accuracy", "gene set", "target"],
        ascending=[False, True, True],
        na_position="last",
        kind="stable",
    ).reset_index(drop=True)


def open_bundle_from_pick(state, param: str) -> str | None:
    """The bundle a click on a chart picked: ``state`` is the chart's selection state
    (``st.session_state[key]`` of a chart drawn with ``on_select``), ``param`` the point
    selection's name; None when nothing is picked."""
    selection = getattr(state, "selection", None)
    if selection is None and isinstance(state, dict):
        selection = state.get("selection")
    try:
        points = selection[param]
    except (KeyError, TypeError):
        points = getattr(selection, param, None)
    if not points:
        return None
    first = points[0] if isinstance(points, list) else points
    return str(first.get("bundle")) if isinstance(first, dict) and first.get("bundle") else None


# ----------------------------------------------------------------------------- commands


def command(*parts: str) -> str:
    """A command line from its parts, empty parts (an omitted DATA) left out."""
    return " ".join(p for p in parts if p)


def data_arg(bundle, data: Data, *, optional: bool) -> str:
    """The DATA argument of a ``tspg`` command for ``data`` ("" where the command finds it itself)."""
    if data.key == "demo" or (data.own and is_demo(bundle.manifest)):
        return "" if optional else "demo.h5ad"
    if data.key.startswith("upload:"):
        return shlex.quote(str(data.adata.uns.get("tspg_import", {}).get("source", "upload.h5ad")))
    return shlex.quote(f"{bundle.manifest['dataset']['name']}.h5ad")


def models_arg(root) -> str:
    """``--models ROOT``."""
    return f"--models {shlex.quote(str(root))}"


# ----------------------------------------------------------------------------- cache keys


def cache_key(*parts) -> str:
    """A short hash of plain values (cache keys of maps)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def scaler_key(bundle) -> str:
    """Names the bundle's gene set and scaling (bundles that share them share a map)."""
    s = bundle.manifest["scaler"]
    return cache_key(
        tuple(bundle.genes), tuple(np.round(s["minimum"], 6)), tuple(np.round(s["range"], 6))
    )
