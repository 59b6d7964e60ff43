"""Gene sets: GMT and the reference list format, FILE:NAME selection, filtering to a GEM."""

from __future__ import annotations

import logging

import pytest

from tspg.genesets import GeneSelection, read_gene_list, read_gene_sets, select_genes, write_gmt

GEM_GENES = ["TP53", "MYC", "CD14", "GAPDH", "EGFR", "ACTB"]


@pytest.fixture
def gmt(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_text(
        "HYPOXIA\thttp://example.org/hypoxia\tEGFR\tMYC\tVEGFA\n"
        "# a comment line\n"
        "\n"
        "MONOCYTE\tmarkers\tCD14\tLYZ\tFCGR3A\tS100A8\n"
        "HOUSEKEEPING\t\tGAPDH\tACTB\n"
    )
    return path


@pytest.fixture
def ref_list(tmp_path):
    """The reference implementation's list format: name, then genes, tab-separated."""
    path = tmp_path / "example.genesets.txt"
    path.write_text("gene-set-000\tTP53\tMYC\tCD14\ngene-set-001\tGAPDH\tACTB\tNOTAGENE\n")
    return path


def test_read_gmt_skips_description_comments_and_blank_lines(gmt):
    sets = read_gene_sets(gmt)
    assert sets == {
        "HYPOXIA": ["EGFR", "MYC", "VEGFA"],
        "MONOCYTE": ["CD14", "LYZ", "FCGR3A", "S100A8"],
        "HOUSEKEEPING": ["GAPDH", "ACTB"],
    }


def test_read_reference_list_format(ref_list, tmp_path):
    assert read_gene_sets(ref_list) == {
        "gene-set-000": ["TP53", "MYC", "CD14"],
        "gene-set-001": ["GAPDH", "ACTB", "NOTAGENE"],
    }
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("setA TP53, MYC  CD14\n")
    assert read_gene_sets(spaced) == {"setA": ["TP53", "MYC", "CD14"]}


def test_gmt_round_trip(tmp_path, gmt):
    sets = read_gene_sets(gmt)
    assert read_gene_sets(write_gmt(sets, tmp_path / "copy.gmt")) == sets


def test_gene_set_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"absent\.gmt: gene-set file not found"):
        read_gene_sets(tmp_path / "absent.gmt")
    twice = tmp_path / "twice.gmt"
    twice.write_text("A\td\tTP53\nA\td\tMYC\n")
    with pytest.raises(ValueError, match=r"twice\.gmt, line 2: gene set 'A' appears twice"):
        read_gene_sets(twice)
    empty_set = tmp_path / "empty.gmt"
    empty_set.write_text("A\tdescription only\n")
    with pytest.raises(ValueError, match=r"empty\.gmt, line 1: expected a name followed by genes"):
        read_gene_sets(empty_set)
    nothing = tmp_path / "nothing.txt"
    nothing.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"nothing\.txt: no gene sets found"):
        read_gene_sets(nothing)
    binary = tmp_path / "binary.gmt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(
        ValueError,
        match=r"binary\.gmt: gene-set file is not UTF-8 text \(byte 0x89 at position 0\)",
    ):
        read_gene_sets(binary)
    with pytest.raises(ValueError, match=r"cannot read the gene-set file"):
        read_gene_sets(tmp_path)  # a folder
    with pytest.raises(ValueError, match=r"binary\.gmt: gene list is not UTF-8 text"):
        read_gene_list(binary)


def test_relative_gene_set_path_is_recorded_absolute(gmt, monkeypatch):
    monkeypatch.chdir(gmt.parent)
    sel = select_genes(GEM_GENES, gene_set=f"{gmt.name}:HYPOXIA")
    assert sel.source == str(
        gmt.resolve()
    )  # so the bundle's gene set is found from any folder later


def test_select_file_colon_name(gmt):
    sel = select_genes(GEM_GENES, gene_set=f"{gmt}:HYPOXIA")
    assert isinstance(sel, GeneSelection)
    assert sel.name == "HYPOXIA" and sel.source == str(gmt)
    assert sel.genes == ["MYC", "EGFR"]  # the GEM's order, not the file's
    assert sel.n_requested == 3 and sel.missing == ["VEGFA"]
    assert sel.summary() == "gene set 'HYPOXIA': 2 of 3 genes present (1 missing from the GEM)"


def test_select_reference_list_by_name(ref_list):
    sel = select_genes(GEM_GENES, gene_set=f"{ref_list}:gene-set-000")
    assert sel.genes == ["TP53", "MYC", "CD14"] and sel.missing == []
    assert sel.summary() == "gene set 'gene-set-000': 3 genes"


def test_missing_genes_counted_and_logged(ref_list, caplog):
    with caplog.at_level(logging.WARNING, logger="tspg.genesets"):
        sel = select_genes(GEM_GENES, gene_set=f"{ref_list}:gene-set-001")
    assert sel.genes == ["GAPDH", "ACTB"] and sel.missing == ["NOTAGENE"] and sel.n_requested == 3
    assert "1 of 3 genes of 'gene-set-001' are not in the GEM" in caplog.text


def test_file_with_one_set_needs_no_name(tmp_path):
    path = tmp_path / "one.gmt"
    path.write_text("ONLY\tdesc\tCD14\tACTB\n")
    sel = select_genes(GEM_GENES, gene_set=str(path))
    assert sel.name == "ONLY" and sel.genes == ["CD14", "ACTB"]


def test_file_with_several_sets_needs_a_name(gmt):
    with pytest.raises(
        ValueError, match=r"sets\.gmt: holds 3 gene sets; pick one as .*sets\.gmt:NAME"
    ):
        select_genes(GEM_GENES, gene_set=str(gmt))


def test_unknown_set_name_lists_sets(gmt):
    with pytest.raises(ValueError) as err:
        select_genes(GEM_GENES, gene_set=f"{gmt}:HYPOXYA")
    msg = str(err.value)
    assert "no gene set 'HYPOXYA'" in msg
    assert "HYPOXIA, MONOCYTE, HOUSEKEEPING" in msg


def test_no_gene_present_is_an_error(tmp_path):
    path = tmp_path / "far.gmt"
    path.write_text("FAR\td\tFOO\tBAR\n")
    with pytest.raises(ValueError, match=r"far\.gmt: none of the 2 genes of 'FAR' are in the GEM"):
        select_genes(GEM_GENES, gene_set=f"{path}:FAR")


def test_default_all_genes_and_gene_list(tmp_path):
    sel = select_genes(GEM_GENES)
    assert sel.name == "all" and sel.genes == GEM_GENES and not sel.missing
    path = tmp_path / "mine.txt"
    path.write_text("# my genes\nACTB\nTP53, ZZZ3\n")
    assert read_gene_list(path) == ["ACTB", "TP53", "ZZZ3"]
    sel = select_genes(GEM_GENES, genes_file=path)
    assert sel.name == "mine" and sel.genes == ["TP53", "ACTB"] and sel.missing == ["ZZZ3"]
    with pytest.raises(ValueError, match="not both"):
        select_genes(GEM_GENES, gene_set=f"{path}:x", genes_file=path)


# ----------------------------------------------------------------------------- highly variable genes


def test_highly_variable_genes_use_the_training_split_only(tmp_path):
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    from tspg.data import read_gem, stratified_split
    from tspg.datasets import planted_gem
    from tspg.genesets import HVG_FLAVOR, highly_variable_genes

    adata = planted_gem(n_samples=200, n_genes=120, n_classes=3, n_up=5, n_down=5, sparse=True)
    train, test = stratified_split(adata.obs["label"], seed=0)
    X = adata.X.toarray()
    X[train, 7] = 0.0  # gene-00007: silent in training, wildly variable in the held-out samples
    X[test, 7] = np.random.default_rng(0).uniform(0, 8, len(test))
    adata.X = sp.csr_matrix(X)
    everything = highly_variable_genes(adata, 20)
    assert "gene-00007" in everything.genes  # what leaking the held-out samples would choose
    chosen = highly_variable_genes(adata, 20, rows=train)
    assert "gene-00007" not in chosen.genes
    assert len(chosen.genes) == 20 and chosen.name == "top 20 highly variable genes"
    assert chosen.genes == [g for g in adata.var_names if g in set(chosen.genes)]  # GEM order
    # exactly scanpy's choice on the training samples
    expected = sc.pp.highly_variable_genes(
        ad.AnnData(X=X[train], var=adata.var.copy()),
        flavor=HVG_FLAVOR,
        n_top_genes=20,
        inplace=False,
    )
    assert chosen.genes == list(adata.var_names[expected["highly_variable"].to_numpy()])
    # the same from a file read on disk
    path = tmp_path / "gem.h5ad"
    adata.write_h5ad(path)
    assert highly_variable_genes(read_gem(path, backed=True), 20, rows=train).genes == chosen.genes
    with pytest.raises(ValueError, match="--n-top-genes must be at least 1"):
        highly_variable_genes(adata, 0)
    assert len(highly_variable_genes(adata, 500).genes) == 120  # more than there are: all
