"""Data to try things on: the PBMC demo, synthetic GEMs for benchmarks, the reference example."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .errors import UserError

__all__ = [
    "DEMO_LABEL_KEY",
    "DEMO_NAME",
    "DEMO_TARGET",
    "demo",
    "load_bundle_dataset",
    "synthetic_gem",
    "write_reference_example",
]

DEMO_NAME = "pbmc68k_reduced"
DEMO_LABEL_KEY = "bulk_labels"
DEMO_TARGET = "CD14+ Monocyte"


def demo() -> ad.AnnData:
    """scanpy's ``pbmc68k_reduced``: 700 PBMCs x 765 genes (log-normalised ``.raw``), 10 cell types.

    The data ship with scanpy; nothing is downloaded.
    """
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    X = src.raw.X.toarray() if hasattr(src.raw.X, "toarray") else np.asarray(src.raw.X)
    adata = ad.AnnData(
        X=X.astype(np.float32),
        obs=src.obs[[DEMO_LABEL_KEY]].copy(),
        var=pd.DataFrame(index=src.raw.var_names.astype(str)),
    )
    adata.obs[DEMO_LABEL_KEY] = adata.obs[DEMO_LABEL_KEY].astype(str).astype("category")
    adata.uns["tspg_import"] = {"source": DEMO_NAME, "n_missing_filled": 0}
    return adata


def synthetic_gem(
    n_samples: int = 11_688,
    n_genes: int = 4_386,
    n_classes: int = 53,
    *,
    seed: int = 0,
    label_key: str = "label",
) -> ad.AnnData:
    """A GTEx-sized GEM (defaults: 11,688 samples x 4,386 genes, 53 classes) for benchmarks.

    Log-expression-like values: each class shifts a random 5% of genes away from a shared
    baseline; unequal class sizes as in GTEx.
    """
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.3, 1.7, n_classes)
    y = rng.choice(n_classes, size=n_samples, p=weights / weights.sum())
    base = rng.gamma(2.0, 2.0, n_genes).astype(np.float32)
    shift = np.where(
        rng.random((n_classes, n_genes)) < 0.05, rng.normal(0, 3, (n_classes, n_genes)), 0
    ).astype(np.float32)
    X = np.clip(
        base + shift[y] + rng.normal(0, 1, (n_samples, n_genes)).astype(np.float32), 0, None
    )
    obs = pd.DataFrame(
        {label_key: pd.Categorical([f"class-{c:02d}" for c in y])},
        index=[f"sample-{i:06d}" for i in range(n_samples)],
    )
    return ad.AnnData(
        X=X.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=[f"gene-{j:05d}" for j in range(n_genes)]),
    )


def write_reference_example(
    out_dir: str | Path,
    *,
    n_samples: int = 200,
    n_genes: int = 60,
    n_classes: int = 3,
    n_sets: int = 5,
    seed: int = 0,
) -> dict[str, Path]:
    """Write inputs in the reference implementation's plain-text formats, as its example maker does.

    ``sklearn.datasets.make_blobs`` data: ``example.emx.txt`` (tab-separated, samples x genes,
    header row of genes), ``example.labels.txt`` (sample <tab> label, no header) and
    ``example.genesets.txt`` (one set per line: name, then genes, tab-separated).
    """
    from sklearn.datasets import make_blobs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = make_blobs(n_samples, n_genes, centers=n_classes, random_state=seed)
    samples = [f"sample-{i:08d}" for i in range(n_samples)]
    genes = [f"gene-{j:06d}" for j in range(n_genes)]
    paths = {k: out / f"example.{k}.txt" for k in ("emx", "labels", "genesets")}
    pd.DataFrame(x, index=samples, columns=genes).to_csv(
        paths["emx"], sep="\t", float_format="%.8f"
    )
    pd.Series([f"class-{c:02d}" for c in y], index=samples).to_csv(
        paths["labels"], sep="\t", header=False
    )
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_sets):
        k = int(rng.integers(5, max(10, n_genes // 10) + 1))
        lines.append(
            "\t".join(
                [f"gene-set-{i:03d}", *rng.choice(genes, size=min(k, n_genes), replace=False)]
            )
        )
    paths["genesets"].write_text("\n".join(lines) + "\n")
    return paths


def load_bundle_dataset(
    bundle, data: ad.AnnData | str | Path | None = None, *, layer: str | None = None
) -> ad.AnnData:
    """The dataset a bundle was trained on, for evaluating it on its own held-out split.

    Parameters
    ----------
    bundle
        A :class:`tspg.bundle.Bundle`.
    data
        None: the bundle's own dataset when tspg can find it (the demo, ``pbmc68k_reduced``),
        else an error asking for it. An AnnData or a GEM file (read with
        :func:`tspg.data.read_gem`): checked against the fingerprint stored in the bundle;
        a mismatch is logged as a warning (the data may still hold the split's samples).
    layer
        Layer whose values the bundle was trained on (default ``X``).
    """
    import logging

    from .data import read_gem

    log = logging.getLogger(__name__)
    info = bundle.manifest.get("dataset", {})
    name = info.get("name")
    if data is None:
        if name == DEMO_NAME:
            return demo()
        raise UserError(f"bundle {bundle.name!r} was trained on {name!r}: give that data file")
    adata = read_gem(data) if isinstance(data, str | Path) else data
    if bundle.is_own_dataset(adata, layer=layer) is False:
        log.warning(
            "this data differs from the data bundle %r was trained on (%s, fingerprint %s)",
            bundle.name,
            name,
            info.get("fingerprint"),
        )
    return adata
