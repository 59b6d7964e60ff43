"""Gene sets: GMT and the reference implementation's list format; filtering to a GEM's genes;
the highly variable genes of a GEM's training split."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .data import read_text, rows_matrix
from .errors import UserError

__all__ = [
    "GeneSelection",
    "highly_variable_genes",
    "match_gene_set",
    "read_gene_list",
    "read_gene_sets",
    "select_genes",
    "write_gmt",
]

logger = logging.getLogger(__name__)


def read_gene_sets(path: str | Path) -> dict[str, list[str]]:
    """Read gene sets from a GMT file or the reference implementation's list file.

    GMT (``.gmt``): one set per line, tab-separated: name, description, genes.
    List (any other suffix): one set per line: name, then genes, separated by tabs,
    spaces or commas. Lines starting with ``#`` and blank lines are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: gene-set file not found")
    is_gmt = path.suffix.lower() == ".gmt"
    sets: dict[str, list[str]] = {}
    for lineno, line in enumerate(read_text(path, "gene-set file").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.rstrip("\n").split("\t") if is_gmt else re.split(r"[\s,]+", line.strip())
        genes = [g.strip() for g in fields[2 if is_gmt else 1 :] if g.strip()]
        name = fields[0].strip()
        if not name or not genes:
            raise UserError(f"{path}, line {lineno}: expected a name followed by genes")
        if name in sets:
            raise UserError(f"{path}, line {lineno}: gene set {name!r} appears twice")
        sets[name] = list(dict.fromkeys(genes))
    if not sets:
        raise UserError(f"{path}: no gene sets found")
    return sets


def write_gmt(sets: dict[str, list[str]], path: str | Path, *, description: str = "tspg") -> Path:
    """Write gene sets as GMT."""
    path = Path(path)
    path.write_text(
        "".join(
            f"{name}\t{description}\t" + "\t".join(genes) + "\n" for name, genes in sets.items()
        )
    )
    return path


def read_gene_list(path: str | Path) -> list[str]:
    """Read genes, one per line (or separated by tabs, spaces or commas)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: gene list not found")
    genes = [
        g
        for line in read_text(path, "gene list").splitlines()
        if not line.startswith("#")
        for g in re.split(r"[\s,]+", line.strip())
        if g
    ]
    if not genes:
        raise UserError(f"{path}: no genes found")
    return list(dict.fromkeys(genes))


@dataclass(frozen=True)
class GeneSelection:
    """The genes a model is trained on, and where they came from."""

    name: str
    genes: list[str]
    n_requested: int
    missing: list[str]
    source: str | None = None

    def summary(self) -> str:
        if self.n_requested == len(self.genes) and not self.missing:
            return f"gene set {self.name!r}: {len(self.genes)} genes"
        return f"gene set {self.name!r}: {len(self.genes)} of {self.n_requested} genes present ({len(self.missing)} missing from the GEM)"


def select_genes(
    gem_genes, *, gene_set: str | None = None, genes_file: str | Path | None = None
) -> GeneSelection:
    """Choose the genes to train on.

    Parameters
    ----------
    gem_genes
        The GEM's genes (``adata.var_names``), whose order is kept.
    gene_set
        ``FILE:NAME`` (one set of a GMT or list file) or ``FILE`` holding a single set.
    genes_file
        A plain list of genes.

    With neither, all genes are used. Genes absent from the GEM are dropped and counted;
    no gene present is an error.
    """
    gem_genes = pd.Index(gem_genes)
    if gene_set and genes_file:
        raise UserError("give either a gene set or a gene list, not both")
    if not gene_set and not genes_file:
        return GeneSelection("all", list(gem_genes), len(gem_genes), [])
    if genes_file:
        wanted, name, source = read_gene_list(genes_file), Path(genes_file).stem, str(genes_file)
    else:
        file, _, name = str(gene_set).partition(":")
        if Path(gene_set).exists():  # a path that itself contains ':'
            file, name = str(gene_set), ""
        sets = read_gene_sets(file)
        if not name:
            if len(sets) != 1:
                raise UserError(f"{file}: holds {len(sets)} gene sets; pick one as {file}:NAME")
            name = next(iter(sets))
        if name not in sets:
            raise UserError(f"{file}: no gene set {name!r} (sets: {', '.join(list(sets)[:10])})")
        wanted, source = sets[name], file
    return match_gene_set(name, wanted, gem_genes, source=source)


def match_gene_set(
    name: str, wanted, gem_genes, *, source: str | Path | None = None
) -> GeneSelection:
    """The genes of set ``name`` that are in the GEM, in the GEM's order.

    Genes absent from the GEM are dropped, counted and logged; no gene present is an error
    naming the set (and ``source``, its file).
    """
    gem_genes = pd.Index(gem_genes)
    wanted = list(dict.fromkeys(wanted))
    present = set(wanted) & set(gem_genes)
    missing = [g for g in wanted if g not in present]
    where = f"{source}: " if source else ""
    if not present:
        raise UserError(f"{where}none of the {len(wanted)} genes of {name!r} are in the GEM")
    genes = [g for g in gem_genes if g in present]
    if missing:
        logger.warning(
            "%s%d of %d genes of %r are not in the GEM", where, len(missing), len(wanted), name
        )
    source = str(Path(source).resolve()) if source else None  # found from any folder later
    return GeneSelection(name, genes, len(wanted), missing, source)


# scanpy's flavour for highly variable genes: "cell_ranger" expects log-normalised data
# (log1p), as atlases and our GEMs hold, and works on the sparse matrix as it is (per-gene
# mean and variance, dispersion normalised within bins of mean expression). "seurat" also
# expects log data but first copies the whole matrix to undo the log (expm1); "seurat_v3"
# and "pearson_residuals" expect raw counts.
HVG_FLAVOR = "cell_ranger"


def highly_variable_genes(
    adata: ad.AnnData,
    n_top_genes: int,
    *,
    rows=None,
    layer: str | None = None,
    source: str = "data",
) -> GeneSelection:
    """The ``n_top_genes`` most variable genes, by scanpy's ``highly_variable_genes``
    (flavour :data:`HVG_FLAVOR`), computed on the samples at ``rows`` only (the training
    split: held-out samples must not choose the genes).

    Works on the matrix as stored: those rows of a sparse matrix (in memory or on disk)
    are read into one sparse matrix, never dense. Gene order is the GEM's.
    """
    import gc
    import warnings

    import scanpy as sc

    if n_top_genes < 1:
        raise UserError(f"--n-top-genes must be at least 1, got {n_top_genes}")
    genes = pd.Index(adata.var_names.astype(str))
    name = f"top {n_top_genes} highly variable genes"
    if n_top_genes >= len(genes):
        logger.warning(
            "%s: --n-top-genes %d is not below the %d genes of the GEM: all genes are used",
            source,
            n_top_genes,
            len(genes),
        )
        return GeneSelection(name, list(genes), n_top_genes, [])
    X = rows_matrix(adata, rows, layer=layer)
    tmp = ad.AnnData(X=X, var=pd.DataFrame(index=genes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's notes on flavours and data
        table = sc.pp.highly_variable_genes(
            tmp, flavor=HVG_FLAVOR, n_top_genes=n_top_genes, inplace=False
        )
    del tmp, X
    gc.collect()  # AnnData holds reference cycles: free the training rows now, not later
    chosen = np.asarray(table["highly_variable"], dtype=bool)
    logger.info(
        "%s: %d highly variable genes (scanpy, flavour %s) chosen on %s samples",
        source,
        int(chosen.sum()),
        HVG_FLAVOR,
        "all" if rows is None else len(rows),
    )
    return GeneSelection(name, list(genes[chosen]), n_top_genes, [])
