"""GEM readers, validation, the stratified split and the scaler (tspg/data.py)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_tiny_adata

from tspg.data import Scaler, align_genes, read_gem, read_labels, stratified_split, write_gem

SAMPLES = ["s1", "s2", "s3", "s4", "s5", "s6"]
GENES = ["TP53", "MYC", "CD14", "GAPDH"]
LABELS = ["a", "a", "a", "b", "b", "b"]


def gem_frame() -> pd.DataFrame:
    """6 samples x 4 genes with distinct values, so misplaced cells are caught."""
    X = np.arange(24, dtype=np.float32).reshape(6, 4) / 4.0
    return pd.DataFrame(X, index=SAMPLES, columns=GENES)


def labelled_adata() -> ad.AnnData:
    df = gem_frame()
    obs = pd.DataFrame({"tissue": pd.Categorical(LABELS), "donor": list("xyzxyz")}, index=SAMPLES)
    return ad.AnnData(X=df.to_numpy(), obs=obs, var=pd.DataFrame(index=GENES))


def write_labels(path, samples=SAMPLES, labels=LABELS):
    path.write_text("".join(f"{s}\t{c}\n" for s, c in zip(samples, labels, strict=True)))
    return path


def assert_is_gem_frame(adata: ad.AnnData):
    df = gem_frame()
    assert list(adata.obs_names) == SAMPLES
    assert list(adata.var_names) == GENES
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X, df.to_numpy())


# ----------------------------------------------------------------------------- h5ad


def test_h5ad_reads_x_and_labels(tmp_path):
    path = tmp_path / "gem.h5ad"
    labelled_adata().write_h5ad(path)
    adata = read_gem(path, label_key="tissue")
    assert_is_gem_frame(adata)
    assert list(adata.obs["tissue"]) == LABELS
    assert adata.obs["tissue"].dtype == "category"
    assert adata.uns["tspg_import"] == {"source": str(path), "n_missing_filled": 0}


def test_h5ad_named_layer(tmp_path):
    src = labelled_adata()
    src.layers["counts"] = src.X * 10
    path = tmp_path / "gem.h5ad"
    src.write_h5ad(path)
    adata = read_gem(path, layer="counts", label_key="tissue")
    np.testing.assert_array_equal(adata.X, gem_frame().to_numpy() * 10)
    with pytest.raises(
        ValueError, match=r"gem\.h5ad: no layer 'logcounts'; layers are \['counts'\]"
    ):
        read_gem(path, layer="logcounts")


def test_h5ad_raw(tmp_path):
    src = labelled_adata()
    src.raw = src.copy()  # .raw keeps all 4 genes, .X only 2 of them, scaled
    src = src[:, ["MYC", "GAPDH"]].copy()
    src.X = src.X * 0.5
    path = tmp_path / "gem.h5ad"
    src.write_h5ad(path)
    adata = read_gem(path, use_raw=True, label_key="tissue")
    assert_is_gem_frame(adata)
    assert list(read_gem(path).var_names) == ["MYC", "GAPDH"]
    no_raw = tmp_path / "noraw.h5ad"
    labelled_adata().write_h5ad(no_raw)
    with pytest.raises(ValueError, match="noraw.h5ad: has no .raw"):
        read_gem(no_raw, use_raw=True)


def test_h5ad_layer_and_raw_together_refused(tmp_path):
    src = labelled_adata()
    src.layers["counts"] = src.X * 10
    src.raw = src.copy()
    path = tmp_path / "gem.h5ad"
    src.write_h5ad(path)
    with pytest.raises(ValueError, match=r"gem\.h5ad: choose either a layer or \.raw, not both"):
        read_gem(path, layer="counts", use_raw=True)


def test_h5ad_missing_label_named_by_sample(tmp_path):
    src = labelled_adata()
    src.obs["tissue"] = pd.Categorical(["a", None, "a", "b", "b", "b"])
    path = tmp_path / "gem.h5ad"
    src.write_h5ad(path)
    with pytest.raises(ValueError, match=r"gem\.h5ad: sample 's2' has no 'tissue' label"):
        read_gem(path, label_key="tissue")


def test_h5ad_sparse_x(tmp_path):
    src = labelled_adata()
    src.X = sp.csr_matrix(src.X)
    path = tmp_path / "sparse.h5ad"
    src.write_h5ad(path)
    adata = read_gem(path, label_key="tissue")
    assert sp.issparse(adata.X) and adata.X.format == "csr"  # kept sparse until genes are chosen
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), gem_frame().to_numpy())
    np.testing.assert_array_equal(align_genes(adata, GENES), gem_frame().to_numpy())


def test_h5ad_missing_label_key_names_file_and_columns(tmp_path):
    path = tmp_path / "gem.h5ad"
    labelled_adata().write_h5ad(path)
    with pytest.raises(ValueError) as err:
        read_gem(path, label_key="cell_type")
    msg = str(err.value)
    assert str(path) in msg and "'cell_type'" in msg
    assert "tissue" in msg and "donor" in msg
    assert "\n" not in msg


def test_h5ad_corrupt_file_named(tmp_path):
    path = tmp_path / "broken.h5ad"
    path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ValueError, match="broken.h5ad: not a readable .h5ad file"):
        read_gem(path)


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize(("suffix", "sep"), [(".csv", ","), (".tsv", "\t")])
def test_delimited_samples_by_genes(tmp_path, suffix, sep):
    path = tmp_path / f"gem{suffix}"
    gem_frame().to_csv(path, sep=sep)
    assert_is_gem_frame(read_gem(path))


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_transpose_genes_by_samples(tmp_path, suffix):
    path = tmp_path / f"gem{suffix}"
    gem_frame().T.to_csv(path, sep="," if suffix == ".csv" else "\t")
    assert_is_gem_frame(read_gem(path, transpose=True))
    assert list(read_gem(path).obs_names) == GENES  # without the flag the axes stay as written


def test_reference_plain_text_gem_and_labels(tmp_path):
    """The reference implementation's tab GEM (header row of genes) and two-column labels file."""
    gem = tmp_path / "example.emx.txt"
    gem_frame().to_csv(gem, sep="\t", float_format="%.8f")
    assert gem.read_text().startswith("\tTP53\tMYC")
    labels = write_labels(tmp_path / "example.labels.txt")
    adata = read_gem(gem, labels=labels)
    assert_is_gem_frame(adata)
    assert list(adata.obs["label"]) == LABELS  # default key
    adata = read_gem(gem, labels=labels, label_key="tissue")
    assert list(adata.obs["tissue"]) == LABELS


def test_labels_file_in_other_order_with_extra_samples(tmp_path):
    path = write_labels(
        tmp_path / "labels.txt", samples=SAMPLES[::-1] + ["s99"], labels=LABELS[::-1] + ["c"]
    )
    assert list(read_labels(path, pd.Index(SAMPLES))) == LABELS


def test_labels_csv_with_header(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"sample": SAMPLES, "tissue": LABELS}).to_csv(path, index=False)
    assert list(read_labels(path, pd.Index(SAMPLES))) == LABELS


def test_labels_file_missing_a_sample_named(tmp_path):
    gem = tmp_path / "gem.csv"
    gem_frame().to_csv(gem)
    labels = write_labels(tmp_path / "labels.txt", samples=SAMPLES[:4], labels=LABELS[:4])
    with pytest.raises(ValueError, match=r"labels\.txt: no label for sample 's5' and 1 more"):
        read_gem(gem, labels=labels)


def test_labels_file_with_an_empty_label_named(tmp_path):
    gem = _csv(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text(
        "".join(f"{s}\t{'' if s == 's4' else c}\n" for s, c in zip(SAMPLES, LABELS, strict=True))
    )
    with pytest.raises(ValueError, match=r"gem\.csv: sample 's4' has no 'label' label"):
        read_gem(gem, labels=labels)


def test_labels_file_listing_a_sample_twice_named(tmp_path):
    path = write_labels(tmp_path / "labels.txt", samples=[*SAMPLES, "s3"], labels=[*LABELS, "b"])
    with pytest.raises(ValueError, match=r"labels\.txt: sample 's3' is listed twice"):
        read_labels(path, pd.Index(SAMPLES))


def test_one_column_labels_file_named(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text(
        "".join(f"{s},{c}\n" for s, c in zip(SAMPLES, LABELS, strict=True))
    )  # commas, read as tab-separated
    with pytest.raises(
        ValueError,
        match=r"labels\.txt: expected two tab-separated columns \(sample, label\), found one",
    ):
        read_labels(path, pd.Index(SAMPLES))


def test_empty_labels_file_named(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("")
    with pytest.raises(ValueError, match=r"labels\.txt: cannot read labels"):
        read_labels(path, pd.Index(SAMPLES))


@pytest.mark.parametrize("header", ["id", "", None], ids=["named", "blank", "R-style"])
def test_numeric_looking_ids_stay_text(tmp_path, header):
    """Sample ids like 001 are names, not numbers: they must not become 1 (CSV, labels file)."""
    samples, labels = ["001", "002", "010", "1e3"], ["a", "a", "b", "b"]
    rows = "".join(f"{s},{i},{i + 1}\n" for i, s in enumerate(samples))
    head = "G1,G2" if header is None else f"{header},G1,G2"  # R writes no name over the row names
    (tmp_path / "gem.csv").write_text(f"{head}\n{rows}")
    write_labels(tmp_path / "labels.txt", samples=samples[::-1], labels=labels[::-1])
    adata = read_gem(tmp_path / "gem.csv", labels=tmp_path / "labels.txt")
    assert list(adata.obs_names) == samples
    assert list(adata.obs["label"]) == labels
    np.testing.assert_array_equal(adata.X, [[0, 1], [1, 2], [2, 3], [3, 4]])


def test_numeric_looking_genes_stay_text_transposed_and_npy(tmp_path):
    (tmp_path / "gem.tsv").write_text("\ts1\ts2\n0101\t1\t2\n7\t3\t4\n")
    assert list(read_gem(tmp_path / "gem.tsv", transpose=True).var_names) == ["0101", "7"]
    np.save(tmp_path / "m.npy", np.ones((2, 2)))
    (tmp_path / "m.rownames.txt").write_text("007\n08\n")
    (tmp_path / "m.colnames.txt").write_text("1.0\n2\n")
    adata = read_gem(tmp_path / "m.npy")
    assert list(adata.obs_names) == ["007", "08"] and list(adata.var_names) == ["1.0", "2"]


def test_non_numeric_cell_names_row_and_column(tmp_path):
    df = gem_frame().astype(object)
    df.loc["s4", "CD14"] = "n/d"
    path = tmp_path / "gem.csv"
    df.to_csv(path)
    with pytest.raises(
        ValueError, match=r"gem\.csv: non-numeric value 'n/d' at row 's4', column 'CD14'"
    ):
        read_gem(path)


@pytest.mark.filterwarnings("ignore:.*names are not unique")
def test_duplicate_gene_named(tmp_path):
    path = tmp_path / "gem.csv"
    path.write_text(",TP53,MYC,TP53\ns1,1,2,3\ns2,4,5,6\n")
    with pytest.raises(ValueError, match=r"gem\.csv: gene 'TP53' appears more than once"):
        read_gem(path)
    path.write_text(",s1,s2\nTP53,1,2\nMYC,3,4\nTP53,5,6\n")  # genes x samples
    with pytest.raises(ValueError, match="gene 'TP53' appears more than once"):
        read_gem(path, transpose=True)


@pytest.mark.filterwarnings("ignore:.*names are not unique")
def test_duplicate_sample_named(tmp_path):
    path = tmp_path / "gem.csv"
    path.write_text(",TP53,MYC\ns1,1,2\ns1,3,4\n")
    with pytest.raises(ValueError, match="sample 's1' appears more than once"):
        read_gem(path)


def test_no_gene_columns_named(tmp_path):
    path = tmp_path / "gem.csv"
    path.write_text("sample\ts1\ns2\n")  # only the id column (or the wrong separator)
    with pytest.raises(
        ValueError, match=r"gem\.csv: no gene columns found \(is the separator right\?\)"
    ):
        read_gem(path)


def test_empty_matrix_named(tmp_path):
    path = tmp_path / "gem.csv"
    path.write_text(",TP53,MYC\n")  # a header and no sample
    with pytest.raises(ValueError, match=r"gem\.csv: empty matrix \(0 samples x 2 genes\)"):
        read_gem(path)


def test_unreadable_names_file_named(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((2, 2)))
    (tmp_path / "m.rownames.txt").write_bytes(b"\xff\xfe\x00s1\n")
    (tmp_path / "m.colnames.txt").mkdir()
    with pytest.raises(
        ValueError,
        match=r"m\.rownames\.txt: names file is not UTF-8 text \(byte 0xff at position 0\)",
    ):
        read_gem(tmp_path / "m.npy")
    (tmp_path / "m.rownames.txt").write_text("s1\ns2\n")
    with pytest.raises(ValueError, match=r"m\.colnames\.txt: cannot read the names file"):
        read_gem(tmp_path / "m.npy")


def test_wrong_suffix_and_missing_file(tmp_path):
    path = tmp_path / "gem.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"gem\.xlsx: unsupported file type '\.xlsx'"):
        read_gem(path)
    with pytest.raises(ValueError, match=r"nope\.csv: file not found"):
        read_gem(tmp_path / "nope.csv")


def test_one_class_label_column_refused(tmp_path):
    path = tmp_path / "gem.csv"
    gem_frame().to_csv(path)
    labels = write_labels(tmp_path / "labels.txt", labels=["a"] * 6)
    with pytest.raises(ValueError, match=r"gem\.csv: 'label' has 1 class; at least 2 are needed"):
        read_gem(path, labels=labels)


# ----------------------------------------------------------------------------- .npy


def test_npy_with_default_names_files(tmp_path):
    np.save(tmp_path / "gem.npy", gem_frame().to_numpy())
    (tmp_path / "gem.rownames.txt").write_text("\n".join(SAMPLES) + "\n")
    (tmp_path / "gem.colnames.txt").write_text("\n".join(GENES) + "\n")
    labels = write_labels(tmp_path / "labels.txt")
    adata = read_gem(tmp_path / "gem.npy", labels=labels)
    assert_is_gem_frame(adata)
    assert list(adata.obs["label"]) == LABELS


def test_npy_with_explicit_names_files(tmp_path):
    np.save(tmp_path / "m.npy", gem_frame().to_numpy().astype(np.float64))
    (tmp_path / "samples.txt").write_text("\n".join(SAMPLES))
    (tmp_path / "genes.txt").write_text("\n".join(GENES))
    with pytest.raises(ValueError, match=r"m\.rownames\.txt: names file not found"):
        read_gem(tmp_path / "m.npy")
    adata = read_gem(
        tmp_path / "m.npy", row_names=tmp_path / "samples.txt", col_names=tmp_path / "genes.txt"
    )
    assert_is_gem_frame(adata)
    (tmp_path / "genes.txt").write_text("\n".join(GENES[:3]))
    with pytest.raises(
        ValueError, match=r"m\.npy: matrix is 6 x 4 but names are 6 rows x 3 columns"
    ):
        read_gem(
            tmp_path / "m.npy", row_names=tmp_path / "samples.txt", col_names=tmp_path / "genes.txt"
        )


def test_npy_that_needs_pickle_or_is_not_numeric_refused(tmp_path):
    (tmp_path / "o.rownames.txt").write_text("a\nb\n")
    (tmp_path / "o.colnames.txt").write_text("x\ny\n")
    np.save(tmp_path / "o.npy", np.array([[{}, 1], [2, 3]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"o\.npy: not a readable \.npy matrix"):
        read_gem(tmp_path / "o.npy")
    np.save(tmp_path / "o.npy", np.array([["1", "2"], ["3", "x"]]))
    with pytest.raises(ValueError, match=r"o\.npy: expression values are not numeric"):
        read_gem(tmp_path / "o.npy")


# ----------------------------------------------------------------------------- missing values


def test_nan_filled_with_matrix_minimum_and_counted(tmp_path, caplog):
    df = gem_frame()
    df.loc["s2", "MYC"] = np.nan
    df.loc["s5", "GAPDH"] = np.nan
    path = tmp_path / "gem.csv"
    df.to_csv(path)
    with caplog.at_level(logging.WARNING, logger="tspg.data"):
        adata = read_gem(path)
    assert adata.uns["tspg_import"]["n_missing_filled"] == 2
    assert "filled 2 missing values" in caplog.text
    assert not np.isnan(adata.X).any()
    minimum = float(np.nanmin(df.to_numpy()))
    assert adata.X[1, 1] == minimum and adata.X[4, 3] == minimum
    # the rest is untouched
    expected = df.fillna(minimum).to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(adata.X, expected)


@pytest.mark.parametrize("nan", ["fill", "error"])
def test_all_values_missing_refused(tmp_path, nan):
    path = tmp_path / "gem.csv"
    gem_frame().map(lambda v: np.nan).to_csv(path)
    message = (
        "every value is missing"
        if nan == "fill"
        else "24 missing values, first at sample 's1', gene 'TP53'"
    )
    with pytest.raises(ValueError, match=rf"gem\.csv: {message}"):
        read_gem(path, nan=nan)


def test_nan_error_names_sample_and_gene(tmp_path):
    df = gem_frame()
    df.loc["s3", "CD14"] = np.nan
    path = tmp_path / "gem.tsv"
    df.to_csv(path, sep="\t")
    with pytest.raises(
        ValueError, match=r"gem\.tsv: 1 missing values, first at sample 's3', gene 'CD14'"
    ):
        read_gem(path, nan="error")


def test_nan_in_h5ad_filled_too(tmp_path):
    src = labelled_adata()
    src.X[0, 0] = np.nan
    path = tmp_path / "gem.h5ad"
    src.write_h5ad(path)
    adata = read_gem(path)
    assert adata.uns["tspg_import"]["n_missing_filled"] == 1
    assert adata.X[0, 0] == adata.X.min()


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_value_refused(tmp_path, value):
    df = gem_frame()
    df.loc["s6", "TP53"] = value
    path = tmp_path / "gem.csv"
    df.to_csv(path)
    with pytest.raises(ValueError, match=r"gem\.csv: infinite value at sample 's6', gene 'TP53'"):
        read_gem(path)


# ----------------------------------------------------------------------------- write / align


def test_write_gem_round_trip_leaves_no_temp_file(tmp_path):
    adata = read_gem(_csv(tmp_path), labels=write_labels(tmp_path / "labels.txt"))
    out = write_gem(adata, tmp_path / "out.h5ad")
    back = read_gem(out, label_key="label")
    assert_is_gem_frame(back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gem.csv", "labels.txt", "out.h5ad"]


def test_write_gem_failing_leaves_no_temp_file(tmp_path):
    adata = labelled_adata()
    adata.uns["unstorable"] = object()
    with pytest.raises(
        ValueError, match=r"out\.h5ad: cannot write \(No method registered for writing"
    ):
        write_gem(adata, tmp_path / "out.h5ad")
    (tmp_path / "folder.h5ad").mkdir()  # the rename into place fails
    with pytest.raises(OSError):
        write_gem(labelled_adata(), tmp_path / "folder.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.h5ad"]
    assert not any((tmp_path / "folder.h5ad").iterdir())
    with pytest.raises(ValueError, match=r"out\.h5ad: cannot write, .*nowhere is not a folder"):
        write_gem(labelled_adata(), tmp_path / "nowhere" / "out.h5ad")


def test_align_genes_reorders_and_names_missing():
    adata = labelled_adata()
    X = align_genes(adata, ["GAPDH", "TP53"])
    np.testing.assert_array_equal(X, gem_frame()[["GAPDH", "TP53"]].to_numpy())
    with pytest.raises(ValueError, match="1 of the model's 3 genes are missing: EGFR"):
        align_genes(adata, ["GAPDH", "EGFR", "TP53"])
    with pytest.raises(ValueError, match="none of the model's 1 genes are present"):
        align_genes(adata, ["EGFR"])


def _csv(tmp_path):
    path = tmp_path / "gem.csv"
    gem_frame().to_csv(path)
    return path


# ----------------------------------------------------------------------------- split


def unequal_labels() -> np.ndarray:
    # class sizes 2, 3, 7, 12, 26: round(n * 0.2) = 0 (raised to 1), 1, 1, 2, 5
    sizes = {"a": 2, "b": 3, "c": 7, "d": 12, "e": 26}
    labels = np.array([c for c, n in sizes.items() for _ in range(n)])
    return np.random.default_rng(1).permutation(labels)


def test_split_is_stratified_per_class():
    labels = unequal_labels()
    train, test = stratified_split(labels, test_size=0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert not set(train) & set(test)
    n_test = {c: int((labels[test] == c).sum()) for c in "abcde"}
    assert n_test == {"a": 1, "b": 1, "c": 1, "d": 2, "e": 5}
    for c in "abcde":
        assert (labels[train] == c).sum() >= 1  # every class on both sides


def test_split_keeps_singletons_in_training():
    labels = np.array(["a", "b", "b", "b", "b", "b"])
    train, test = stratified_split(labels, seed=0)
    assert 0 in train and (labels[test] == "b").sum() == 1


def test_split_is_seeded():
    labels = unequal_labels()
    a = stratified_split(labels, seed=7)
    b = stratified_split(labels, seed=7)
    c = stratified_split(labels, seed=8)
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_split_refuses_bad_test_size():
    with pytest.raises(ValueError, match="test_size"):
        stratified_split(["a", "b"], test_size=1.5)


# ----------------------------------------------------------------------------- scaler


def test_scaler_fit_on_training_split_only():
    adata = make_tiny_adata()
    X = adata.X
    labels = adata.obs["cell_type"].to_numpy()
    train, test = stratified_split(labels, seed=0)
    scaler = Scaler.fit(X[train])
    np.testing.assert_allclose(scaler.minimum, X[train].min(0))
    np.testing.assert_allclose(scaler.range, X[train].max(0) - X[train].min(0), rtol=1e-6)
    Xs = scaler.transform(X[train])
    np.testing.assert_allclose(Xs.min(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(Xs.max(0), 1.0, atol=1e-6)
    # the held-out samples did not move the scaler: on this data some fall outside [0, 1] before clipping
    raw = (X[test] - scaler.minimum) / scaler.range
    assert (raw < 0).any() or (raw > 1).any()
    assert scaler.transform(X[test]).min() >= 0 and scaler.transform(X[test]).max() <= 1


def test_scaler_warns_when_new_data_fall_outside_the_training_range(caplog):
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 10, (50, 3)).astype(np.float32)
    scaler = Scaler.fit(train)
    genes = ["TP53", "MYC", "CD14"]
    with caplog.at_level(logging.WARNING, logger="tspg.data"):
        scaler.transform(train, genes=genes)  # the training data: all inside
        inside = rng.uniform(1, 9, (40, 3)).astype(np.float32)
        inside[:4, 1] = 12.0  # 4 of 120 values (3%) outside: no warning
        scaler.transform(inside, genes=genes)
    assert caplog.records == []
    other_units = inside.copy()
    other_units[:, 2] *= 100  # CD14 in other units: every value outside, with MYC's 4
    with caplog.at_level(logging.WARNING, logger="tspg.data"):
        Xs = scaler.transform(other_units, genes=genes, source="new.h5ad")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith(
        "new.h5ad: 37% of the values fall outside the range of the training data"
    )
    assert "most: gene 'CD14', 100% of its values" in message
    np.testing.assert_array_equal(Xs[:, 2], 1.0)  # still clipped
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tspg.data"):
        scaler.transform(other_units)
    assert "most: gene #3" in caplog.records[0].getMessage()


def test_scaler_constant_gene_and_clipping():
    X = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]], dtype=np.float32)
    scaler = Scaler.fit(X)
    assert scaler.range[1] == 1.0  # constant gene: no division by zero
    Xs = scaler.transform(X)
    assert np.isfinite(Xs).all()
    np.testing.assert_array_equal(Xs[:, 1], 0.0)
    np.testing.assert_allclose(Xs[:, 0], [0.0, 1.0, 0.5])
    new = scaler.transform(np.array([[-10.0, 99.0], [10.0, -99.0]], dtype=np.float32))
    np.testing.assert_array_equal(new, [[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(scaler.inverse_transform(Xs)[:, 0], X[:, 0])


# ----------------------------------------------------------------------------- big data: sparse, on disk


def sparse_gem(n: int = 40, g: int = 12, seed: int = 0) -> ad.AnnData:
    """log1p-like sparse values (about 30% non-zero), two classes."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.log1p(X.data * 20).astype(np.float32)
    obs = pd.DataFrame(
        {"tissue": pd.Categorical(["a", "b"] * (n // 2))}, index=[f"s{i:02d}" for i in range(n)]
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so the chunked paths run over several chunks."""
    import tspg.data

    monkeypatch.setattr(tspg.data, "CHUNK_BYTES", 64)


def test_sparse_and_backed_reading_give_the_dense_values(tmp_path, small_chunks):
    from tspg.data import gene_matrix, is_backed

    src = sparse_gem()
    src.layers["counts"] = sp.csr_matrix(np.round(np.expm1(src.X.toarray())))
    src.raw = src.copy()
    dense = src.X.toarray()
    path = tmp_path / "sparse.h5ad"
    src.write_h5ad(path)
    in_memory = read_gem(path, label_key="tissue", backed=False)
    on_disk = read_gem(path, label_key="tissue", backed=True)
    assert sp.issparse(in_memory.X) and not is_backed(in_memory)
    assert is_backed(on_disk) and on_disk.uns["tspg_import"]["backed"] is True
    assert list(on_disk.obs["tissue"]) == list(src.obs["tissue"])
    genes = ["G7", "G0", "G3"]  # chosen genes, in another order
    rows = np.array([5, 1, 30, 2])  # needed samples, in any order
    cols = [int(g[1:]) for g in genes]
    for adata in (in_memory, on_disk):
        np.testing.assert_array_equal(align_genes(adata, genes), dense[:, cols])
        np.testing.assert_array_equal(align_genes(adata, genes, rows=rows), dense[rows][:, cols])
        chosen = gene_matrix(adata, genes)
        assert sp.issparse(chosen) and chosen.dtype == np.float32
        np.testing.assert_array_equal(chosen.toarray(), dense[:, cols])
    # a layer and .raw on disk too
    counts = read_gem(path, layer="counts", backed=True)
    np.testing.assert_array_equal(
        align_genes(counts, genes), src.layers["counts"].toarray()[:, cols]
    )
    raw = read_gem(path, use_raw=True, backed=True)
    np.testing.assert_array_equal(align_genes(raw, genes, rows=rows), dense[rows][:, cols])
    # a dense .h5ad on disk
    src.X = dense
    del src.layers["counts"]
    src.write_h5ad(tmp_path / "dense.h5ad")
    dense_on_disk = read_gem(tmp_path / "dense.h5ad", backed=True)
    assert is_backed(dense_on_disk)
    np.testing.assert_array_equal(
        align_genes(dense_on_disk, genes, rows=rows), dense[rows][:, cols]
    )
    assert isinstance(gene_matrix(dense_on_disk, genes), np.ndarray)


def test_backed_is_chosen_from_the_memory_available(tmp_path, monkeypatch, caplog):
    import tspg.data
    from tspg.data import is_backed

    path = tmp_path / "gem.h5ad"
    sparse_gem().write_h5ad(path)
    monkeypatch.setattr(tspg.data, "available_memory", lambda: 10**12)
    assert not is_backed(read_gem(path))
    monkeypatch.setattr(tspg.data, "available_memory", lambda: 1000)  # the matrix takes ~5 kB
    with caplog.at_level(logging.INFO, logger="tspg.data"):
        assert is_backed(read_gem(path))
    assert "reading the matrix on disk (backed)" in caplog.text
    assert not is_backed(read_gem(path, backed=False))
    csv = tmp_path / "gem.csv"
    gem_frame().to_csv(csv)
    with pytest.raises(ValueError, match=r"gem\.csv: only a \.h5ad file can be read on disk"):
        read_gem(csv, backed=True)
    with pytest.raises(
        ValueError, match=r"gem\.h5ad: a file read on disk \(backed\) cannot be transposed"
    ):
        read_gem(path, backed=True, transpose=True)


def test_missing_values_of_sparse_and_backed_data(tmp_path, small_chunks):
    from tspg.data import close_backed

    src = sparse_gem()
    src.X.data[[3, 10]] = np.nan  # stored values; the implicit zeros make the minimum 0
    first = np.searchsorted(src.X.indptr, 3, side="right") - 1, src.X.indices[3]
    path = tmp_path / "gem.h5ad"
    src.write_h5ad(path)
    adata = read_gem(path, backed=False)
    assert sp.issparse(adata.X) and adata.uns["tspg_import"]["n_missing_filled"] == 2
    assert not np.isnan(adata.X.data).any() and adata.X.data.min() == 0.0
    on_disk = read_gem(path, backed=True)
    assert on_disk.uns["tspg_import"]["n_missing_filled"] == 2
    assert on_disk.uns["tspg_import"]["nan_fill_value"] == 0.0
    np.testing.assert_array_equal(align_genes(on_disk, list(src.var_names)), adata.X.toarray())
    some = on_disk[[first[0], 0]]  # a view of some samples read from the file: filled too
    np.testing.assert_array_equal(
        align_genes(some, list(src.var_names)), adata.X.toarray()[[first[0], 0]]
    )
    close_backed(on_disk)
    sample, gene = src.obs_names[first[0]], src.var_names[first[1]]
    for backed in (False, True):
        with pytest.raises(
            ValueError,
            match=rf"gem\.h5ad: 2 missing values, first at sample '{sample}', gene '{gene}'",
        ):
            read_gem(path, nan="error", backed=backed)
    src.X.data[[3, 10]] = [1.0, np.inf]
    src.write_h5ad(path)
    row, col = np.searchsorted(src.X.indptr, 10, side="right") - 1, src.X.indices[10]
    for backed in (False, True):
        with pytest.raises(
            ValueError,
            match=rf"infinite value at sample '{src.obs_names[row]}', gene '{src.var_names[col]}'",
        ):
            read_gem(path, backed=backed)


def _old_fingerprint(X, genes, samples) -> str:
    """The fingerprint as tspg computed it before chunked hashing (bundles store it)."""
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    h.update("\n".join(map(str, genes)).encode())
    h.update("\n".join(map(str, samples)).encode())
    return h.hexdigest()[:16]


def test_fingerprint_unchanged_for_dense_data_and_the_same_however_stored(tmp_path, small_chunks):
    from tspg.data import dataset_fingerprint, fingerprint

    adata = make_tiny_adata()
    genes, samples = list(adata.var_names), list(adata.obs_names)
    expected = _old_fingerprint(adata.X, genes, samples)
    assert fingerprint(adata.X, genes, samples) == expected
    assert fingerprint(adata.X.astype(np.float64), genes, samples) == expected  # chunked path
    assert fingerprint(sp.csr_matrix(adata.X), genes, samples) == expected
    assert dataset_fingerprint(adata, genes) == expected
    path = tmp_path / "tiny.h5ad"
    sparse = adata.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    sparse.write_h5ad(path)
    assert dataset_fingerprint(read_gem(path, backed=True), genes) == expected
    some = ["G05", "G01"]
    assert dataset_fingerprint(adata, some) == _old_fingerprint(adata[:, some].X, some, samples)
    changed = adata.copy()
    changed.X[3, 4] += 1
    assert dataset_fingerprint(changed, genes) != expected


def test_scaler_keeps_sparse_data_sparse_when_every_minimum_is_non_negative():
    from tspg.data import Scaler

    X = sparse_gem(n=60).X
    scaler = Scaler.fit(X, rows=np.arange(40))
    dense_scaler = Scaler.fit(X.toarray()[:40])
    np.testing.assert_array_equal(scaler.minimum, dense_scaler.minimum)
    np.testing.assert_array_equal(scaler.range, dense_scaler.range)
    assert scaler.keeps_sparse
    Xs, report = scaler.transform_report(X)
    assert sp.issparse(Xs) and Xs.dtype == np.float32
    expected, dense_report = dense_scaler.transform_report(X.toarray())
    np.testing.assert_allclose(Xs.toarray(), expected, atol=1e-7)
    assert report.to_dict() == dense_report.to_dict()
    # a gene expressed in every training sample (minimum > 0): zeros of new data fall outside
    Xd = X.toarray()
    Xd[:, 2] = np.linspace(1, 2, 60)
    Xd[50:, 2] = 0.0
    scaler = Scaler.fit(sp.csr_matrix(Xd), rows=np.arange(40))
    Xs, report = scaler.transform_report(sp.csr_matrix(Xd), genes=[f"G{j}" for j in range(12)])
    assert sp.issparse(Xs)
    np.testing.assert_allclose(Xs.toarray(), Scaler.fit(Xd[:40]).transform(Xd), atol=1e-7)
    assert report.most_affected_gene == "G2" and report.n_outside >= 10
    # a negative minimum (z-scores): zeros would move, so the result is dense
    Xd[:, 0] -= 1.0
    scaler = Scaler.fit(Xd)
    assert not scaler.keeps_sparse
    Xs = scaler.transform(sp.csr_matrix(Xd))
    assert isinstance(Xs, np.ndarray)
    np.testing.assert_allclose(Xs, scaler.transform(Xd), atol=1e-7)


def test_gene_matching_exact_then_case_then_a_var_column():
    from tspg.data import MAX_MISSING_SHARE, match_genes

    adata = sparse_gem(n=4, g=6)
    adata.var_names = ["Cd14", "MYC", "tp53", "GAPDH", "EGFR", "egfr"]
    m = match_genes(adata, ["MYC", "CD14", "TP53", "EGFR"])
    assert list(m.index) == [1, 0, 2, 4] and m.case_matched == ["CD14", "TP53"]
    assert m.missing == [] and m.from_var_column is None and not m.exact
    np.testing.assert_array_equal(
        align_genes(adata, ["MYC", "CD14", "TP53"]), adata.X.toarray()[:, [1, 0, 2]]
    )
    # "Egfr" could be EGFR or egfr: ambiguous, so missing
    with pytest.raises(ValueError, match="1 of the model's 2 genes are missing: Egfr"):
        match_genes(adata, ["MYC", "Egfr"])
    # Ensembl ids as var_names, symbols in a var column (scanpy's gene_symbols convention)
    adata.var["feature_name"] = list(adata.var_names)
    adata.var_names = [f"ENSG{j:011d}" for j in range(6)]
    m = match_genes(adata, ["GAPDH", "MYC"])
    assert m.from_var_column == "feature_name" and list(m.index) == [3, 1]
    assert m.to_dict()["from_var_column"] == "feature_name"
    with pytest.raises(ValueError, match=r"no column 'symbol' in var \(columns: feature_name\)"):
        match_genes(adata, ["MYC"], var_column="symbol")
    with pytest.raises(ValueError, match=r"none of the model's 2 genes are present"):
        match_genes(adata, ["NOPE1", "NOPE2"])
    assert 0 < MAX_MISSING_SHARE < 0.2


def test_missing_genes_filled_up_to_the_limit_else_refused_in_one_line():
    from tspg.data import Scaler, match_genes, missing_gene_fill

    genes = [f"G{j}" for j in range(40)]
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        X=rng.uniform(0, 5, (6, 38)).astype(np.float32), var=pd.DataFrame(index=genes[:38])
    )
    scaler = Scaler(np.zeros(40, np.float32), np.full(40, 5.0, np.float32))
    mean = np.linspace(0.1, 0.9, 40)
    fill, how = missing_gene_fill(scaler, mean)
    assert how == "training mean"
    np.testing.assert_allclose(scaler.transform(fill[None])[0], mean, atol=1e-6)
    assert missing_gene_fill(scaler, None)[1] == "training minimum"
    m = match_genes(adata, genes, max_missing=0.05, fill=how)  # 2 of 40 = 5%
    assert m.missing == ["G38", "G39"] and m.fill == "training mean"
    assert m.missing_share == pytest.approx(0.05)
    assert "2 missing (5.0%), filled with the training mean: G38, G39" in m.summary()
    X = align_genes(adata, genes, match=m, fill=fill)
    np.testing.assert_array_equal(X[:, :38], adata.X)
    np.testing.assert_allclose(X[:, 38:], np.tile(fill[38:], (6, 1)))
    with pytest.raises(ValueError, match="2 of the model's 40 genes are missing: G38, G39"):
        align_genes(adata, genes, match=m)  # no fill given: refused
    small = adata[:, :30].copy()
    with pytest.raises(ValueError) as err:
        match_genes(small, genes, max_missing=0.05, source="new.h5ad")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "new.h5ad: 10 of the model's 40 genes are missing (at most 5% may be missing): G30, G31"
    )
    assert msg.endswith("G39")


def test_subsample_is_seeded_stratified_and_keeps_small_classes():
    from tspg.data import subsample

    labels = np.array(["a"] * 900 + ["b"] * 95 + ["c"] * 5)
    assert np.array_equal(subsample(labels, 2000), np.arange(1000))
    keep = subsample(labels, 100, seed=3)
    assert np.array_equal(keep, subsample(labels, 100, seed=3))
    assert not np.array_equal(keep, subsample(labels, 100, seed=4))
    assert np.all(np.diff(keep) > 0)
    counts = {c: int((labels[keep] == c).sum()) for c in "abc"}
    assert counts == {"a": 90, "b": 10, "c": 2}  # in proportion, small classes kept


def test_write_gem_streams_a_matrix_read_on_disk(tmp_path, small_chunks):
    src = sparse_gem()
    src.X.data[4] = np.nan
    for name, X in (("sparse", src.X), ("dense", src.X.toarray())):
        path = tmp_path / f"{name}.h5ad"
        ad.AnnData(X=X, obs=src.obs, var=src.var).write_h5ad(path)
        in_memory = read_gem(path, label_key="tissue", backed=False)
        out = write_gem(
            read_gem(path, label_key="tissue", backed=True), tmp_path / f"{name}-copy.h5ad"
        )
        back = ad.read_h5ad(out)
        assert sp.issparse(back.X) == (name == "sparse") and back.X.dtype == np.float32
        got = back.X.toarray() if sp.issparse(back.X) else back.X
        want = in_memory.X.toarray() if sp.issparse(in_memory.X) else in_memory.X
        np.testing.assert_array_equal(got, want)  # missing value filled as in memory
        assert list(back.obs["tissue"]) == list(src.obs["tissue"])
        assert back.uns["tspg_import"]["n_missing_filled"] == 1
        assert "backed" not in back.uns["tspg_import"]
    assert not list(tmp_path.glob(".*"))
