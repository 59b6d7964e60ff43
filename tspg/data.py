"""Gene-expression matrices (GEMs) as AnnData: reading, validation, gene matching, splitting and scaling.

A GEM is samples x genes. Every reader returns an :class:`anndata.AnnData` with
``obs_names`` = sample ids, ``var_names`` = genes and, when labels are known, a
categorical ``obs[label_key]``. Errors are :class:`tspg.errors.UserError` with one line
naming the file, sample or gene at fault.

Big data never become dense as a whole. ``X`` is kept as it is stored: a dense float32
array, a float32 CSR matrix (sparse ``.h5ad``), or, for a file read on disk ("backed"), the
file's own matrix, read a chunk of rows at a time. Only the chosen genes of the samples
needed ever become dense (:func:`align_genes`, :func:`gene_matrix`), a chunk of
:data:`CHUNK_BYTES` at a time.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import UserError

__all__ = [
    "OUT_OF_RANGE_WARNING",
    "RANGE_TOLERANCE",
    "TEXT_SUFFIXES",
    "MAX_MISSING_SHARE",
    "GeneMatch",
    "Scaler",
    "ScalingReport",
    "align_genes",
    "dataset_fingerprint",
    "expression",
    "fill_missing",
    "fingerprint",
    "gene_like_share",
    "gene_match_summary",
    "gene_matrix",
    "looks_transposed",
    "match_genes",
    "read_gem",
    "read_labels",
    "read_text",
    "rows_matrix",
    "stratified_split",
    "subsample",
    "validate_labels",
    "write_gem",
]

logger = logging.getLogger(__name__)

NanPolicy = Literal["fill", "error"]
ShortRowPolicy = Literal["error", "fill"]
# Scaling new data: warn when more than this share of values falls outside the training
# range (by more than the tolerance, float rounding at the edges)
OUT_OF_RANGE_WARNING = 0.05
RANGE_TOLERANCE = 1e-6
TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t", ".tab": "\t"}

# Matrices are read and densified this many bytes (about) at a time
CHUNK_BYTES = 64 * 2**20
# read_gem(backed=None): read a .h5ad on disk when its matrix would take more than this
# share of the memory available (reading it into memory, then choosing genes on the
# training rows, needs about twice the matrix)
BACKED_MEMORY_SHARE = 0.25
# A chosen-genes matrix read from sparse data stays sparse (CSR, 8 bytes a stored value)
# while fewer than this share of its values are non-zero (dense float32: 4 bytes a value)
SPARSE_MAX_DENSITY = 0.5
# Perturbing new data: at most this share of the model's genes may be missing; they are
# filled (see missing_gene_fill). More missing genes are refused.
MAX_MISSING_SHARE = 0.05
# var columns that hold gene symbols when var_names are ids (scanpy's ``gene_symbols``
# convention; CELLxGENE writes ``feature_name``), tried in this order
SYMBOL_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "gene_name",
    "gene_names",
    "symbol",
    "symbols",
)


# ----------------------------------------------------------------------------- reading


def read_gem(
    path: str | Path,
    *,
    label_key: str | None = None,
    labels: str | Path | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    transpose: bool = False,
    nan: NanPolicy = "fill",
    row_names: str | Path | None = None,
    col_names: str | Path | None = None,
    backed: bool | None = None,
    short_rows: ShortRowPolicy = "error",
) -> ad.AnnData:
    """Read a GEM file into AnnData.

    Parameters
    ----------
    path
        ``.h5ad``; ``.csv`` / ``.tsv`` / ``.txt`` (delimited text, first column sample ids,
        header row of genes; the reference implementation's tab-separated GEM); or ``.npy``
        with row-name and column-name text files (default ``<stem>.rownames.txt`` and
        ``<stem>.colnames.txt`` beside it, as the reference implementation writes them).
    label_key
        Column of ``obs`` holding the class of each sample. For text and ``.npy`` input the
        labels come from ``labels`` and are stored under this key (default ``"label"``).
    labels
        Two-column tab-separated file (sample, label) without header, as the reference
        implementation writes; or a CSV/TSV with a header whose first column is the sample id.
    layer
        For ``.h5ad``: read this layer instead of ``.X``.
    use_raw
        For ``.h5ad``: read ``.raw.X`` (and ``.raw.var_names``) instead of ``.X``.
    transpose
        The file is genes x samples.
    nan
        ``"fill"`` replaces missing values with the matrix minimum (as the reference
        implementation does) and logs how many; ``"error"`` refuses them.
    row_names, col_names
        For ``.npy``: text files with one name per line.
    backed
        For ``.h5ad``: ``True`` leaves the matrix on disk (read a chunk of rows at a time,
        see :func:`gene_matrix`), ``False`` reads it into memory, ``None`` (default) decides:
        on disk when the matrix would take more than :data:`BACKED_MEMORY_SHARE` of the
        memory available (:func:`available_memory`). Only the matrix stays on disk:
        ``obs`` and ``var`` are read, other slots (``obsm``, other layers, ``uns``) are not.
    short_rows
        Text: a row with fewer fields than the others (a line cut short, a separator
        missing) is refused, naming its line and sample (``"error"``, default), or its
        missing fields are read as missing values and handled as ``nan`` says (``"fill"``,
        with a warning naming the rows).

    Without labels, a warning (logged, and kept in ``uns["tspg_import"]["warnings"]``) says
    when the orientation looks wrong: when at least 60% of the row names look like gene ids
    (Ensembl ids such as ``ENSG00000141510``, or symbol-shaped: an upper-case letter, then
    upper-case letters and digits, with ``-`` / ``.`` parts or ``orf``: ``TP53``, ``HLA-DRA``,
    ``C1orf112``, ``RP11-34P13.7``) while at most 20% of the column names do (cell barcodes
    and GEO / SRA / TCGA sample ids never count as gene-like). Of the first 1,000 names of
    each. Nothing is ever transposed without ``transpose``. With labels, a labels file whose
    samples are the GEM's columns is refused with the same advice.

    Returns
    -------
    AnnData with unique gene names and ``X`` as stored: a dense ``float32`` array (text,
    ``.npy`` or a dense ``.h5ad``), a ``float32`` CSR matrix (a sparse ``.h5ad``), or on disk
    (``backed``). ``uns["tspg_import"]`` records the source file and the number of filled
    missing values (and, on disk, ``"backed": True`` and the fill value, applied as rows
    are read).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if backed and suffix != ".h5ad":
        raise UserError(f"{path}: only a .h5ad file can be read on disk (backed)")
    if backed and transpose:
        raise UserError(f"{path}: a file read on disk (backed) cannot be transposed")
    if suffix == ".h5ad":
        adata = _read_h5ad(path, layer=layer, use_raw=use_raw, backed=backed, transpose=transpose)
    elif suffix in TEXT_SUFFIXES:
        adata = _read_text(path, TEXT_SUFFIXES[suffix], short_rows=short_rows)
    elif suffix == ".npy":
        adata = _read_npy(path, row_names=row_names, col_names=col_names)
    else:
        raise UserError(
            f"{path}: unsupported file type {suffix!r}; use .h5ad, .csv, .tsv, .txt or .npy"
        )
    if transpose:
        adata = adata.T.copy()
    try:
        return _finish_import(
            adata, path, label_key=label_key, labels=labels, nan=nan, transpose=transpose
        )
    except BaseException:
        close_backed(adata)  # a failed read leaves no open file behind
        raise


def _finish_import(
    adata: ad.AnnData, path: Path, *, label_key, labels, nan, transpose: bool = False
) -> ad.AnnData:
    advice = "read it without --transpose" if transpose else "read it with --transpose"
    warnings = []
    if labels is not None:
        label_key = label_key or "label"
        adata.obs[label_key] = read_labels(
            labels, adata.obs_names, columns=adata.var_names, advice=advice
        )
    elif label_key is None or label_key not in adata.obs:
        looks = looks_transposed(adata.obs_names, adata.var_names)
        if looks:
            warnings.append(f"{path}: {looks}: is the file genes x samples? Then {advice}")
            logger.warning("%s", warnings[-1])
    on_disk = is_backed(adata)
    if not on_disk:
        adata.X = _float_matrix(adata.X, path)
    elif not np.issubdtype(adata.X.dtype, np.number):
        raise UserError(f"{path}: expression values are not numeric (dtype {adata.X.dtype})")
    _check_names(adata, path)
    n_filled, fill_value = _missing_values(
        adata.X, nan=nan, source=path, samples=adata.obs_names, genes=adata.var_names
    )
    if label_key is not None:
        validate_labels(adata, label_key, source=path)
    adata.uns["tspg_import"] = {"source": str(path), "n_missing_filled": int(n_filled)}
    if warnings:
        adata.uns["tspg_import"]["warnings"] = warnings
    if on_disk:
        adata.uns["tspg_import"]["backed"] = True
        if n_filled:
            adata.uns["tspg_import"]["nan_fill_value"] = float(fill_value)
    return adata


def _read_h5ad(
    path: Path, *, layer: str | None, use_raw: bool, backed: bool | None, transpose: bool
) -> ad.AnnData:
    """obs, var and the one matrix asked for (X, a layer or raw.X); in memory or on disk."""
    import h5py
    from anndata.io import read_elem, sparse_dataset

    if use_raw and layer:
        raise UserError(f"{path}: choose either a layer or .raw, not both")
    try:
        f = h5py.File(path, "r")
    except Exception as err:  # h5py raises several types for a file that is not HDF5
        raise UserError(f"{path}: not a readable .h5ad file ({err})") from err
    keep_open = False
    try:
        if use_raw:
            if "raw" not in f:
                raise UserError(f"{path}: has no .raw; drop --use-raw to read .X")
            element, var_element = f["raw"].get("X"), f["raw"].get("var")
        elif layer:
            layers = list(f["layers"]) if "layers" in f else []
            if layer not in layers:
                raise UserError(f"{path}: no layer {layer!r}; layers are {layers}")
            element, var_element = f["layers"][layer], f.get("var")
        else:
            element, var_element = f.get("X"), f.get("var")
        if element is None or var_element is None or "obs" not in f:
            raise UserError(f"{path}: not a readable .h5ad file (no X, obs or var)")
        obs, var = read_elem(f["obs"]), read_elem(var_element)
        if use_raw:
            var = pd.DataFrame(index=var.index)
        nbytes = matrix_nbytes(element)
        sparse_format = (
            element.attrs.get("encoding-type", "") if isinstance(element, h5py.Group) else ""
        )
        if backed is None:
            backed = (
                not transpose
                and sparse_format != "csc_matrix"
                and nbytes > BACKED_MEMORY_SHARE * available_memory()
            )
            if backed:
                logger.info(
                    "%s: reading the matrix on disk (backed): %.1f GB would take more than %.0f%% "
                    "of the %.1f GB of memory available",
                    path,
                    nbytes / 1e9,
                    100 * BACKED_MEMORY_SHARE,
                    available_memory() / 1e9,
                )
        if backed and sparse_format == "csc_matrix":
            raise UserError(
                f"{path}: the matrix is stored by columns (CSC); reading on disk needs rows "
                "(CSR): convert it (adata.X = adata.X.tocsr()) or drop --backed"
            )
        if backed:
            X = sparse_dataset(element) if isinstance(element, h5py.Group) else element
            keep_open = True  # the AnnData reads from the open file
        else:
            X = read_elem(element)
        return ad.AnnData(X=X, obs=obs, var=var)
    except UserError:
        raise
    except Exception as err:  # anndata/h5py raise many types for a damaged file
        raise UserError(f"{path}: not a readable .h5ad file ({err})") from err
    finally:
        if not keep_open:
            f.close()


def matrix_nbytes(element) -> int:
    """Bytes an h5ad matrix (an h5py dataset, or a sparse matrix's group) takes in memory as float32."""
    import h5py

    if isinstance(element, h5py.Group):  # sparse: data + indices + indptr
        data, indices = element["data"], element["indices"]
        return int(
            data.shape[0] * (4 + indices.dtype.itemsize)
            + element["indptr"].shape[0] * element["indptr"].dtype.itemsize
        )
    return int(np.prod(element.shape, dtype=np.int64)) * 4


def available_memory() -> int:
    """Bytes of memory available to a new allocation (psutil's ``available`` when installed)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30  # unknown: assume a laptop's


def _read_text(path: Path, sep: str, *, short_rows: ShortRowPolicy = "error") -> ad.AnnData:
    """Delimited text, parsed in chunks of rows into one float32 matrix.

    pandas reads a row with too few fields as one whose last values are missing; such rows
    are looked for (only when a row ends in a missing value) and refused or reported
    (``short_rows``, see :func:`read_gem`)."""
    what = "comma" if sep == "," else "tab"
    blocks, index, columns = [], [], None
    ends_missing = False
    try:
        # ids stay text ("001" is not 1); chunks bound the parser's float64 working copy
        header = _header(path, sep)
        rows = max(16, CHUNK_BYTES // (8 * max(len(header), 1)))
        reader = pd.read_csv(path, sep=sep, dtype={0: str}, chunksize=rows)
        for df in reader:
            if isinstance(df.index, pd.RangeIndex):
                # else pandas took the first column as the index (header one short)
                df = df.set_index(df.columns[0])
            if columns is None:
                if df.shape[1] == 0:
                    raise UserError(f"{path}: no gene columns found (is the separator right?)")
                k = df.shape[1]
                columns = (
                    header[len(header) - k :] if len(header) >= k else list(map(str, df.columns))
                )
            _check_numeric(df, path, columns)
            blocks.append(df.to_numpy(dtype=np.float32))
            index.append(df.index.astype(str))
            ends_missing = ends_missing or bool(np.isnan(blocks[-1][:, -1]).any())
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: cannot parse as {what}-separated text ({err})") from err
    if ends_missing:
        _check_short_rows(path, sep, 1 + len(columns), policy=short_rows)
    X = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    del blocks
    return ad.AnnData(
        X=np.ascontiguousarray(X),
        obs=pd.DataFrame(index=index[0].append(index[1:]) if len(index) > 1 else index[0]),
        var=pd.DataFrame(index=pd.Index(columns).astype(str)),
    )


def _check_short_rows(path: Path, sep: str, n_fields: int, *, policy: ShortRowPolicy) -> None:
    """Refuse (``policy="error"``) or report the rows of ``path`` with fewer than ``n_fields``
    fields (header and blank lines aside), naming the first one's line and sample."""
    short, first = 0, None
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=sep)
        next(reader, None)  # the header
        for fields in reader:
            if fields and len(fields) < n_fields:
                short += 1
                if first is None:
                    first = (reader.line_num, fields[0], len(fields))
    if not short:
        return  # the missing values were written as such
    line, name, n = first
    more = f" (and {short - 1} more row(s) like it)" if short > 1 else ""
    where = f"{path}: line {line} (row {name!r}) has {n} of {n_fields} fields{more}"
    if policy == "error":
        raise UserError(
            f"{where}: a row cut short? Refused; --short-rows fill reads the missing fields "
            "as missing values"
        )
    logger.warning("%s: its missing fields are read as missing values (--short-rows fill)", where)


def _header(path: Path, sep: str) -> list[str]:
    """The header row's fields as written.

    pandas renames repeated header names ("G1" -> "G1.1"); the names as written let a
    repeated gene (or, transposed, sample) be reported instead of silently kept twice.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        return [str(c) for c in next(csv.reader(fh, delimiter=sep), [])]


def _check_numeric(df: pd.DataFrame, path: Path, columns: Sequence[str]) -> None:
    """One line naming the first non-numeric value's row and column."""
    for j, dtype in enumerate(df.dtypes):
        if pd.api.types.is_numeric_dtype(dtype):
            continue
        column = df.iloc[:, j]
        values = pd.to_numeric(column, errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() & column.notna().to_numpy())
        if not len(bad):  # no rows at all: reported as an empty matrix
            continue
        i = int(bad[0])
        raise UserError(
            f"{path}: non-numeric value {column.iloc[i]!r} at row {df.index[i]!r}, column {columns[j]!r}"
        )


def _read_npy(
    path: Path, *, row_names: str | Path | None, col_names: str | Path | None
) -> ad.AnnData:
    try:
        X = np.load(path, allow_pickle=False)
    except Exception as err:  # corrupt file, or an object array that would need pickle
        raise UserError(f"{path}: not a readable .npy matrix ({err})") from err
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise UserError(f"{path}: expression values are not numeric (dtype {X.dtype})")
    if X.ndim != 2:
        raise UserError(f"{path}: expected a 2-d matrix, got shape {X.shape}")
    stem = path.with_suffix("")
    rows = _read_names(Path(row_names) if row_names else Path(f"{stem}.rownames.txt"))
    cols = _read_names(Path(col_names) if col_names else Path(f"{stem}.colnames.txt"))
    if len(rows) != X.shape[0] or len(cols) != X.shape[1]:
        raise UserError(
            f"{path}: matrix is {X.shape[0]} x {X.shape[1]} but names are {len(rows)} rows x {len(cols)} columns"
        )
    return ad.AnnData(
        X=np.ascontiguousarray(X, dtype=np.float32),
        obs=pd.DataFrame(index=rows),
        var=pd.DataFrame(index=cols),
    )


def _read_names(path: Path) -> list[str]:
    if not path.exists():
        raise UserError(f"{path}: names file not found (needed beside a .npy matrix)")
    return [line.strip() for line in read_text(path, "names file").splitlines() if line.strip()]


def read_text(path: Path, what: str) -> str:
    """The text of ``path``; a one-line error naming it when it is a folder, unreadable or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: {what} is not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start})"
        ) from err
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror})") from err


def read_labels(
    path: str | Path,
    samples: pd.Index,
    *,
    columns: Sequence[str] | None = None,
    advice: str = "read it with --transpose",
) -> pd.Categorical:
    """Read a labels file and return the labels of ``samples`` in order.

    Accepts the reference two-column format (sample <tab> label, no header) or a CSV/TSV
    with a header row whose first column is the sample id and second the label. When
    samples lack a label and most labelled ids are among ``columns`` (the GEM's column
    names), the message says the GEM looks transposed and gives ``advice``.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: labels file not found")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, header=None, dtype=str)  # ids stay text: "001" is not 1
    except Exception as err:  # empty or unparsable file
        raise UserError(f"{path}: cannot read labels ({err})") from err
    if df.shape[1] < 2:
        raise UserError(
            f"{path}: expected two {'comma' if sep == ',' else 'tab'}-separated columns (sample, label), found one"
        )
    series = pd.Series(df.iloc[:, 1].to_numpy(), index=df.iloc[:, 0].astype(str))
    if series.index[0] not in set(samples) and len(series) == len(samples) + 1:
        series = series.iloc[1:]  # header row
    if series.index.duplicated().any():
        raise UserError(
            f"{path}: sample {series.index[series.index.duplicated()][0]!r} is listed twice"
        )
    missing = [s for s in samples if s not in series.index]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        hint = ""
        if columns is not None and len(missing) == len(samples):
            in_columns = pd.Index(series.index).isin(pd.Index(columns).astype(str)).mean()
            if in_columns >= 0.5:
                hint = f": its samples are the GEM's columns, not its rows; {advice}"
        raise UserError(f"{path}: no label for sample {missing[0]!r}{more}{hint}")
    return pd.Categorical(series.loc[list(samples)].to_numpy())


# Names that look like gene ids (read_gem's orientation check): Ensembl gene ids, and
# symbol-shaped names (TP53, HLA-DRA, C1orf112, RP11-34P13.7); cell barcodes and GEO, SRA
# and TCGA sample ids, shaped alike, never count
_ENSEMBL_ID = re.compile(r"ENS[A-Z]*G\d{6,}(\.\d+)?")
_SYMBOL = re.compile(r"[A-Z][A-Z0-9]*(orf\d+)?([-.][A-Z0-9]+)*")
_SAMPLE_ID = re.compile(
    r"[ACGTN]{6,}([-_]\d+)?|(GSM|GSE|SRR|SRX|SRS|ERR|DRR|SAMN|SAMEA)\d+|TCGA-.*"
)
GENE_LIKE_ROWS = 0.6  # warn when at least this share of the row names look like genes
GENE_LIKE_COLUMNS = 0.2  # and at most this share of the column names do
_NAMES_CHECKED = 1000


def gene_like_share(names: Sequence[str]) -> float:
    """The share of ``names`` (of the first 1,000) that look like gene ids."""
    names = [str(n) for n in list(names[:_NAMES_CHECKED])]
    if not names:
        return 0.0
    like = sum(
        1
        for n in names
        if _ENSEMBL_ID.fullmatch(n)
        or (len(n) <= 20 and _SYMBOL.fullmatch(n) and not _SAMPLE_ID.fullmatch(n))
    )
    return like / len(names)


def looks_transposed(rows: Sequence[str], columns: Sequence[str]) -> str | None:
    """Why a GEM with these row (sample) and column (gene) names looks genes x samples, or None.

    At least :data:`GENE_LIKE_ROWS` of the row names look like gene ids while at most
    :data:`GENE_LIKE_COLUMNS` of the column names do (:func:`gene_like_share`). A heuristic:
    it warns, it never transposes."""
    r, c = gene_like_share(rows), gene_like_share(columns)
    if r < GENE_LIKE_ROWS or c > GENE_LIKE_COLUMNS:
        return None
    return (
        f"its {len(rows)} rows look like genes ({r:.0%} gene-like, e.g. "
        f"{', '.join(map(str, rows[:3]))}) and its {len(columns)} columns like samples "
        f"(e.g. {', '.join(map(str, columns[:3]))})"
    )


def _float_matrix(X, source: Path | str) -> np.ndarray | sp.csr_matrix:
    """A matrix in memory as float32: dense stays dense (C order), sparse becomes CSR."""
    if sp.issparse(X):
        if not np.issubdtype(X.dtype, np.number):
            raise UserError(f"{source}: expression values are not numeric (dtype {X.dtype})")
        X = sp.csr_matrix(X)  # no copy when it is a CSR matrix already
        return X if X.dtype == np.float32 else X.astype(np.float32)
    X = np.asarray(X)
    if not np.issubdtype(X.dtype, np.number):
        raise UserError(f"{source}: expression values are not numeric (dtype {X.dtype})")
    return np.ascontiguousarray(X, dtype=np.float32)


# ----------------------------------------------------------------------------- missing values


def fill_missing(
    X, *, nan: NanPolicy = "fill", source: str | Path = "data", samples=None, genes=None
) -> int:
    """Fill NaN in place with the matrix minimum (``nan="fill"``) or refuse them.

    ``X`` is a dense array or a sparse matrix (its stored values are filled; the implicit
    zeros count towards the minimum). Infinite values are always refused. Returns the
    number of values filled.
    """
    return _missing_values(X, nan=nan, source=source, samples=samples, genes=genes)[0]


def _missing_values(X, *, nan: NanPolicy, source, samples, genes) -> tuple[int, float]:
    """(number of NaN, fill value): filled in place in memory; on disk only counted and the
    fill value returned, to be applied as rows are read. Never densifies a sparse matrix."""
    n_missing, first_inf, first_nan, minimum = 0, None, None, np.inf
    for offset, values, row_of in _stored_values(X):
        inf = np.isinf(values)
        if first_inf is None and inf.any():
            first_inf = row_of(int(np.flatnonzero(inf)[0]), offset)
        miss = np.isnan(values)
        n = int(miss.sum())
        if n and first_nan is None:
            first_nan = row_of(int(np.flatnonzero(miss)[0]), offset)
        n_missing += n
        if n < values.size:
            minimum = min(minimum, float(np.nanmin(values)))
    if first_inf is not None:
        i, j = first_inf
        raise UserError(
            f"{source}: infinite value at sample {_name(samples, i)!r}, gene {_name(genes, j)!r}"
        )
    if n_missing == 0:
        return 0, 0.0
    if nan == "error":
        i, j = first_nan
        raise UserError(
            f"{source}: {n_missing} missing values, first at sample {_name(samples, i)!r}, gene {_name(genes, j)!r} (use --nan fill to fill them with the minimum)"
        )
    n_values = X.shape[0] * X.shape[1]
    n_stored = _n_stored(X)
    if n_stored < n_values:  # implicit zeros of a sparse matrix
        minimum = min(minimum, 0.0)
    if n_missing == n_values:
        raise UserError(f"{source}: every value is missing")
    if sp.issparse(X):
        X.data[np.isnan(X.data)] = minimum
    elif not is_backed_matrix(X):
        step = _rows_per_chunk(4 * X.shape[1])
        for start in range(0, X.shape[0], step):
            block = X[start : start + step]
            block[np.isnan(block)] = minimum
    logger.warning("%s: filled %d missing values with the matrix minimum", source, n_missing)
    return n_missing, minimum


def _n_stored(X) -> int:
    if sp.issparse(X):
        return int(X.nnz)
    if _is_sparse_dataset(X):
        return int(X.group["data"].shape[0])
    return int(X.shape[0] * X.shape[1])


def _stored_values(X) -> Iterator[tuple[int, np.ndarray, Callable[[int, int], tuple[int, int]]]]:
    """(offset, values, row_of) over the stored values of ``X`` in row-major order, a chunk
    at a time; ``row_of(k, offset)`` gives (sample, gene) of the chunk's k-th value."""
    if sp.issparse(X) or _is_sparse_dataset(X):
        data = X.data if sp.issparse(X) else X.group["data"]
        indptr = None

        def row_of(k: int, offset: int) -> tuple[int, int]:
            nonlocal indptr
            if indptr is None:
                indptr = np.asarray(X.indptr if sp.issparse(X) else X.group["indptr"][:])
            indices = X.indices if sp.issparse(X) else X.group["indices"]
            pos = offset + k
            return int(np.searchsorted(indptr, pos, side="right") - 1), int(indices[pos])

        step = max(1, CHUNK_BYTES // 4)
        for start in range(0, int(data.shape[0]), step):
            yield start, np.asarray(data[start : start + step]), row_of
        return
    n, g = X.shape

    def dense_row_of(k: int, offset: int) -> tuple[int, int]:
        return offset + k // g, k % g

    step = _rows_per_chunk(g * 4)
    for start in range(0, n, step):
        yield start, np.asarray(X[start : start + step]).reshape(-1), dense_row_of


def _name(names, i: int) -> str:
    return str(names[i]) if names is not None else str(i)


def _check_names(adata: ad.AnnData, source: Path) -> None:
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = adata.var_names.astype(str)
    dup = adata.var_names[adata.var_names.duplicated()]
    if len(dup):
        raise UserError(f"{source}: gene {dup[0]!r} appears more than once")
    dup = adata.obs_names[adata.obs_names.duplicated()]
    if len(dup):
        raise UserError(f"{source}: sample {dup[0]!r} appears more than once")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise UserError(f"{source}: empty matrix ({adata.n_obs} samples x {adata.n_vars} genes)")


def validate_labels(
    adata: ad.AnnData, label_key: str, *, source: str | Path = "data", min_classes: int = 2
) -> None:
    """Check that ``obs[label_key]`` exists, has no missing labels and at least two classes."""
    if label_key not in adata.obs:
        cols = ", ".join(map(str, adata.obs.columns)) or "none"
        raise UserError(f"{source}: no label column {label_key!r} in obs (columns: {cols})")
    labels = adata.obs[label_key]
    if labels.isna().any():
        raise UserError(
            f"{source}: sample {labels.index[labels.isna()][0]!r} has no {label_key!r} label"
        )
    adata.obs[label_key] = labels.astype(str).astype("category")
    n = adata.obs[label_key].nunique()
    if n < min_classes:
        raise UserError(f"{source}: {label_key!r} has {n} class; at least {min_classes} are needed")


# ----------------------------------------------------------------------------- reading rows


def close_backed(adata: ad.AnnData) -> None:
    """Close the file a backed AnnData (``read_gem(..., backed=True)``) reads from; no-op otherwise."""
    X = adata.X
    if _is_sparse_dataset(X):
        X.group.file.close()
    elif is_backed_matrix(X):
        X.file.close()


def _is_sparse_dataset(X) -> bool:
    from anndata.abc import CSCDataset, CSRDataset

    return isinstance(X, CSRDataset | CSCDataset)


def is_backed_matrix(X) -> bool:
    """Whether ``X`` is on disk (an h5py dataset or anndata's sparse dataset)."""
    import h5py

    return isinstance(X, h5py.Dataset) or _is_sparse_dataset(X)


def is_backed(adata: ad.AnnData, *, layer: str | None = None) -> bool:
    """Whether the expression matrix (``X`` or ``layers[layer]``) of ``adata`` is read from disk."""
    return adata.isbacked or is_backed_matrix(_matrix(adata, layer))


def is_sparse(adata: ad.AnnData, *, layer: str | None = None) -> bool:
    """Whether the expression matrix is sparse, in memory or on disk."""
    X = _matrix(adata, layer)
    return sp.issparse(X) or _is_sparse_dataset(X)


def _matrix(adata: ad.AnnData, layer: str | None):
    if layer is not None:
        if layer not in adata.layers:
            raise UserError(f"data: no layer {layer!r}; layers are {list(adata.layers) or 'none'}")
        return adata.layers[layer]
    return adata.X


def _rows_per_chunk(bytes_per_row: float) -> int:
    return max(1, int(CHUNK_BYTES // max(bytes_per_row, 1)))


def _row_bytes(X) -> float:
    """Bytes one row of ``X`` takes as read (stored values only for a sparse matrix)."""
    n, g = X.shape
    if sp.issparse(X) or _is_sparse_dataset(X):
        return _n_stored(X) / max(n, 1) * 8
    return g * max(np.dtype(X.dtype).itemsize, 4)


def _read_rows(X, rows) -> np.ndarray | sp.csr_matrix:
    """Rows of ``X`` in memory (all genes): ``rows`` a slice or sorted unique positions.

    From disk, scattered rows that lie close together are read as one range and picked
    in memory (one read instead of one per row).
    """
    if isinstance(rows, np.ndarray) and is_backed_matrix(X) and len(rows):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo <= 4 * len(rows):
            block = X[lo:hi]
            return block[rows - lo]
    block = X[rows]
    return block


def _blocks(
    X, cols: np.ndarray | None, rows: np.ndarray | None, *, nan_fill: float | None = None
) -> Iterator[tuple[int, np.ndarray | sp.csr_matrix]]:
    """(start, block) over ``X[rows][:, cols]`` a chunk of rows at a time, float32, in row order.

    ``rows`` None means all rows; ``cols`` None all genes. Blocks of a sparse ``X`` are CSR,
    of a dense one dense. ``nan_fill`` replaces NaN (for data on disk read with ``nan="fill"``).
    """
    n = X.shape[0] if rows is None else len(rows)
    n_out = X.shape[1] if cols is None else len(cols)
    step = _rows_per_chunk(max(_row_bytes(X), 4 * n_out))
    for start in range(0, n, step):
        r = slice(start, min(start + step, n)) if rows is None else rows[start : start + step]
        block = _read_rows(X, r)
        if cols is not None:
            block = block[:, cols]
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float32)
            if nan_fill is not None:
                block.data[np.isnan(block.data)] = nan_fill
        else:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if nan_fill is not None:
                block[np.isnan(block)] = nan_fill
        yield start, block


def _nan_fill(adata: ad.AnnData) -> float | None:
    """The value for NaN recorded by a read on disk (also in views and copies of its rows,
    which hold the file's values as they are)."""
    return adata.uns.get("tspg_import", {}).get("nan_fill_value")


def _sorted_rows(rows, n: int) -> np.ndarray | None:
    """``rows`` (positions or a boolean mask) as sorted unique positions; None for all rows."""
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.dtype == bool:
        return np.flatnonzero(rows)
    rows = rows.astype(np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"row positions must lie in [0, {n}), got {rows.min()}..{rows.max()}")
    return rows


def _read_in_order(X, cols, rows, *, nan_fill, dense: bool):
    """``X[rows][:, cols]`` with ``rows`` in any order (read sorted, then put back in order)."""
    order = None
    if rows is not None and len(rows) > 1 and (np.diff(rows) <= 0).any():
        uniq, inverse = np.unique(rows, return_inverse=True)
        rows, order = uniq, inverse
    n = X.shape[0] if rows is None else len(rows)
    n_out = X.shape[1] if cols is None else len(cols)
    if dense:
        out = np.empty((n, n_out), dtype=np.float32)
        for start, block in _blocks(X, cols, rows, nan_fill=nan_fill):
            out[start : start + block.shape[0]] = block.toarray() if sp.issparse(block) else block
    else:
        out = vstack_csr([b for _, b in _blocks(X, cols, rows, nan_fill=nan_fill)], n_out)
    return out if order is None else out[order]


def vstack_csr(blocks: list[sp.csr_matrix], n_cols: int) -> sp.csr_matrix:
    """Row blocks as one CSR matrix, each index array copied once."""
    if not blocks:
        return sp.csr_matrix((0, n_cols), dtype=np.float32)
    if len(blocks) == 1:
        return blocks[0]
    nnz = np.cumsum([0] + [b.nnz for b in blocks])
    indptr = np.concatenate([[0]] + [b.indptr[1:] + nnz[i] for i, b in enumerate(blocks)])
    data = np.concatenate([b.data for b in blocks])
    for b in blocks:
        b.data = b.data[:0]
    indices = np.concatenate([b.indices for b in blocks])
    n_rows = sum(b.shape[0] for b in blocks)
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))


def expression(adata: ad.AnnData, *, layer: str | None = None) -> np.ndarray:
    """The whole expression matrix (``X`` or a layer) as dense float32 (for small data:
    choose genes and rows first with :func:`align_genes` or :func:`gene_matrix`)."""
    X = _matrix(adata, layer)
    return _read_in_order(X, None, None, nan_fill=_nan_fill(adata), dense=True)


def rows_matrix(
    adata: ad.AnnData, rows=None, *, layer: str | None = None
) -> np.ndarray | sp.csr_matrix:
    """Every gene of some samples, in memory, as stored (dense float32 or float32 CSR).

    For per-gene statistics over a subset of samples (e.g. highly variable genes on the
    training split); from a sparse file on disk the rows are assembled without a second copy.
    """
    X = _matrix(adata, layer)
    rows = _sorted_rows(rows, X.shape[0])
    nan_fill = _nan_fill(adata)
    if _is_sparse_dataset(X):
        return _backed_csr_rows(X, rows, nan_fill=nan_fill)
    if not is_backed_matrix(X):  # in memory: one copy of the rows (none for all rows)
        X = _float_matrix(X, "data")
        return X if rows is None else X[rows]
    return _read_in_order(X, None, rows, nan_fill=nan_fill, dense=True)


def _backed_csr_rows(X, rows: np.ndarray | None, *, nan_fill) -> sp.csr_matrix:
    """Rows of a CSR matrix on disk in one preallocated CSR matrix (peak: the result plus a chunk)."""
    indptr_all = np.asarray(X.group["indptr"][:], dtype=np.int64)
    counts = np.diff(indptr_all)
    if rows is not None:
        rows = np.unique(rows)
        counts = counts[rows]
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    index_dtype = np.int32 if max(nnz, X.shape[1]) < 2**31 else np.int64
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=index_dtype)
    for start, block in _blocks(X, None, rows, nan_fill=nan_fill):
        a, b = indptr[start], indptr[start + block.shape[0]]
        data[a:b] = block.data
        indices[a:b] = block.indices
    if index_dtype == np.int32:
        indptr = indptr.astype(np.int32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(counts), X.shape[1]))


# ----------------------------------------------------------------------------- gene matching


@dataclass(frozen=True)
class GeneMatch:
    """How a model's genes were found in some data (the report of :func:`match_genes`).

    Attributes
    ----------
    genes
        The genes asked for (a bundle's), in order.
    index
        For each of them, its column in the data (``-1``: missing).
    missing
        Genes not found, in the order of ``genes``.
    case_matched
        Genes found only when ignoring case (e.g. ``Cd14`` for ``CD14``).
    from_var_column
        The ``var`` column whose names were matched (symbols beside ids, e.g.
        ``feature_name``), or None for ``var_names``.
    fill
        How missing genes are filled: ``"training mean"`` or ``"training minimum"``
        (see :func:`missing_gene_fill`), or None when none is missing.
    max_missing
        The share of missing genes that was allowed.
    """

    genes: list[str]
    index: np.ndarray
    missing: list[str] = field(default_factory=list)
    case_matched: list[str] = field(default_factory=list)
    from_var_column: str | None = None
    fill: str | None = None
    max_missing: float = 0.0

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_missing(self) -> int:
        return len(self.missing)

    @property
    def missing_share(self) -> float:
        return self.n_missing / max(self.n_genes, 1)

    @property
    def exact(self) -> bool:
        """Every gene found by its exact name in ``var_names``."""
        return not self.missing and not self.case_matched and self.from_var_column is None

    def summary(self) -> str:
        """One line for users: what was matched how, and what was filled."""
        return gene_match_summary(self.to_dict())

    def to_dict(self) -> dict:
        """Plain JSON types (for ``uns``, a manifest or the dashboard)."""
        return {
            "n_genes": self.n_genes,
            "n_missing": self.n_missing,
            "missing_share": self.missing_share,
            "missing": list(self.missing),
            "n_case_matched": len(self.case_matched),
            "case_matched": list(self.case_matched),
            "from_var_column": self.from_var_column,
            "fill": self.fill,
            "max_missing": self.max_missing,
        }


def gene_match_summary(match: dict) -> str:
    """One line from :meth:`GeneMatch.to_dict` (e.g. as stored in ``uns["tspg"]["gene_match"]``)."""
    n, missing = int(match["n_genes"]), list(match.get("missing", []))
    parts = [f"{n - len(missing)} of the model's {n} genes found"]
    if match.get("from_var_column"):
        parts.append(f"by the symbols in var[{match['from_var_column']!r}]")
    if match.get("n_case_matched"):
        parts.append(f"{match['n_case_matched']} only when ignoring case")
    if missing:
        parts.append(
            f"{len(missing)} missing ({100 * len(missing) / max(n, 1):.1f}%), filled with the "
            f"{match.get('fill')}: {_shown(missing)}"
        )
    return "; ".join(parts)


def _shown(names: Sequence[str], n: int = 10) -> str:
    return ", ".join(map(str, names[:n])) + (
        f" and {len(names) - n} more" if len(names) > n else ""
    )


def _match_names(names: Sequence[str], genes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Column of each gene in ``names``: exact first, then ignoring case when the lowercase
    form is unambiguous. Returns (index with -1 for missing, genes matched by case only)."""
    first: dict[str, int] = {}
    for j, name in enumerate(names):
        if isinstance(name, str) and name not in first:
            first[name] = j
    index = np.array([first.get(g, -1) for g in genes], dtype=np.int64)
    if (index >= 0).all():
        return index, []
    used = set(index[index >= 0].tolist())
    folded: dict[str, list[int]] = {}
    for name, j in first.items():
        folded.setdefault(name.casefold(), []).append(j)
    case = []
    for i in np.flatnonzero(index < 0):
        cands = [j for j in folded.get(str(genes[i]).casefold(), []) if j not in used]
        if len(cands) == 1:
            index[i] = cands[0]
            used.add(cands[0])
            case.append(str(genes[i]))
    return index, case


def match_genes(
    adata: ad.AnnData,
    genes: Sequence[str],
    *,
    max_missing: float = 0.0,
    var_column: str | None = None,
    fill: str | None = None,
    source: str = "data",
) -> GeneMatch:
    """Find a model's ``genes`` among the data's genes.

    Names are matched exactly, then ignoring case (reported in ``case_matched``). When
    ``var_names`` are ids (e.g. Ensembl), the symbols in a ``var`` column are used as
    scanpy does with ``gene_symbols``: ``var_column``, else the first of
    :data:`SYMBOL_COLUMNS` present that matches more genes than ``var_names``.

    Parameters
    ----------
    max_missing
        Largest share of ``genes`` that may be missing (0: none; perturbing new data uses
        :data:`MAX_MISSING_SHARE`).
    var_column
        Match against this ``var`` column instead of ``var_names``.
    fill
        Recorded in the report: how missing genes will be filled.

    Raises
    ------
    UserError
        One line naming how many and which genes are missing when more than
        ``max_missing`` of them are (or none is present).
    """
    genes = [str(g) for g in genes]
    if var_column is not None:
        if var_column not in adata.var:
            cols = ", ".join(map(str, adata.var.columns)) or "none"
            raise UserError(f"{source}: no column {var_column!r} in var (columns: {cols})")
        candidates = [var_column]
    else:
        candidates = [None] + [c for c in SYMBOL_COLUMNS if c in adata.var]
    best = None
    for column in candidates:
        names = adata.var_names if column is None else adata.var[column].astype(object)
        names = [n if isinstance(n, str) else None for n in names.tolist()]
        index, case = _match_names(names, genes)
        if best is None or (index >= 0).sum() > (best[1] >= 0).sum():
            best = (column, index, case)
        if (index >= 0).all():
            break
    column, index, case = best
    missing = [g for g, j in zip(genes, index, strict=True) if j < 0]
    where = f" (var[{column!r}])" if column else ""
    if len(missing) == len(genes):
        raise UserError(
            f"{source}: none of the model's {len(genes)} genes are present{where} (e.g. {missing[:3]})"
        )
    if len(missing) > max_missing * len(genes):
        limit = f" (at most {100 * max_missing:g}% may be missing)" if max_missing > 0 else ""
        raise UserError(
            f"{source}: {len(missing)} of the model's {len(genes)} genes are missing{where}{limit}: {_shown(missing)}"
        )
    if case:
        logger.info(
            "%s: %d of the model's genes matched only when ignoring case (e.g. %s)",
            source,
            len(case),
            case[0],
        )
    if missing:
        logger.warning(
            "%s: %d of the model's %d genes are missing and filled with the %s: %s",
            source,
            len(missing),
            len(genes),
            fill,
            _shown(missing),
        )
    return GeneMatch(
        genes, index, missing, case, column, fill if missing else None, float(max_missing)
    )


def missing_gene_fill(
    scaler: Scaler, training_mean: Sequence[float] | None = None
) -> tuple[np.ndarray, str]:
    """Raw values that stand in for missing genes, and how they were chosen.

    The mean of the training split over all classes (in the bundle's scaled space), mapped
    back to raw values: the value that says least about any class, and nothing about the
    target, so a filled gene neither helps nor hinders the move towards it. Bundles made
    before the mean was stored get the training minimum (scaled 0; for counts and log1p
    data: "not expressed", the most common value).
    """
    if training_mean is not None:
        mean = np.asarray(training_mean, dtype=np.float32)
        return scaler.inverse_transform(mean[None, :])[0], "training mean"
    return scaler.minimum.astype(np.float32), "training minimum"


def align_genes(
    adata: ad.AnnData,
    genes,
    *,
    layer: str | None = None,
    source: str = "data",
    rows=None,
    match: GeneMatch | None = None,
    fill: np.ndarray | None = None,
) -> np.ndarray:
    """Expression of ``genes`` in that order, dense float32: samples (``rows``, default all) x genes.

    Genes are found by :func:`match_genes` (exact, then ignoring case, then a symbols
    column of ``var``); pass its report as ``match`` to reuse it. Without ``fill`` any
    missing gene is an error naming them; with ``fill`` (one raw value per gene, see
    :func:`missing_gene_fill`) the missing genes the match allowed take those values.
    Only these genes of these rows are ever dense, read a chunk at a time.
    """
    genes = [str(g) for g in genes]
    if match is None:
        match = match_genes(adata, genes, source=source)
    if match.missing and fill is None:
        raise UserError(
            f"{source}: {match.n_missing} of the model's {match.n_genes} genes are missing: {_shown(match.missing)}"
        )
    X = _matrix(adata, layer)
    present = np.flatnonzero(match.index >= 0)
    rows = _sorted_rows(rows, X.shape[0])
    block = _read_in_order(X, match.index[present], rows, nan_fill=_nan_fill(adata), dense=True)
    if len(present) == len(genes):
        return block
    out = np.empty((block.shape[0], len(genes)), dtype=np.float32)
    out[:, present] = block
    absent = np.flatnonzero(match.index < 0)
    out[:, absent] = np.asarray(fill, dtype=np.float32)[absent]
    return out


def gene_matrix(
    adata: ad.AnnData,
    genes,
    *,
    layer: str | None = None,
    rows=None,
    source: str = "data",
) -> np.ndarray | sp.csr_matrix:
    """Expression of ``genes`` (all present) for ``rows`` (default all), kept sparse when it can be.

    From sparse data (in memory or on disk) the result is a float32 CSR matrix while fewer
    than :data:`SPARSE_MAX_DENSITY` of its values are non-zero, else dense float32; from
    dense data it is dense. Read a chunk of rows at a time: the whole GEM never is dense.
    """
    if not is_sparse(adata, layer=layer):
        return align_genes(adata, genes, layer=layer, source=source, rows=rows)
    match = match_genes(adata, genes, source=source)
    X = _matrix(adata, layer)
    rows = _sorted_rows(rows, X.shape[0])
    out = _read_in_order(X, match.index, rows, nan_fill=_nan_fill(adata), dense=False)
    if out.nnz > SPARSE_MAX_DENSITY * out.shape[0] * out.shape[1]:
        return out.toarray()
    return out


# ----------------------------------------------------------------------------- scaling


@dataclass(frozen=True)
class ScalingReport:
    """How well data fit a scaler's training range (the report of :meth:`Scaler.transform_report`).

    Attributes
    ----------
    n_samples
        Samples scaled.
    outside_by_gene
        Per gene, how many of its values fell outside the training range (by more than
        :data:`RANGE_TOLERANCE`) and were clipped.
    genes
        Gene names (None: genes are named ``#1``, ``#2``, ... by column).

    Properties: ``n_values``, ``n_outside``, ``outside_share`` (of all values),
    ``most_affected_gene`` (None when no value is outside), ``most_affected_share`` (that
    gene's share of values outside), ``warned`` (above :data:`OUT_OF_RANGE_WARNING`).
    """

    n_samples: int
    outside_by_gene: np.ndarray
    genes: Sequence[str] | None = None

    @property
    def n_values(self) -> int:
        return self.n_samples * len(self.outside_by_gene)

    @property
    def n_outside(self) -> int:
        return int(self.outside_by_gene.sum())

    @property
    def outside_share(self) -> float:
        return self.n_outside / self.n_values if self.n_values else 0.0

    @property
    def most_affected_gene(self) -> str | None:
        if self.n_outside == 0:
            return None
        j = int(self.outside_by_gene.argmax())
        return str(self.genes[j]) if self.genes is not None else f"#{j + 1}"

    @property
    def most_affected_share(self) -> float:
        if self.n_outside == 0:
            return 0.0
        return float(self.outside_by_gene.max() / self.n_samples)

    @property
    def warned(self) -> bool:
        """More than :data:`OUT_OF_RANGE_WARNING` outside: other units or another normalisation?"""
        return self.outside_share > OUT_OF_RANGE_WARNING

    def merge(self, other: ScalingReport) -> ScalingReport:
        """The report of both sets of samples (same genes)."""
        return ScalingReport(
            self.n_samples + other.n_samples,
            self.outside_by_gene + other.outside_by_gene,
            self.genes if self.genes is not None else other.genes,
        )

    def warn(self, source: str = "data") -> None:
        """Log the warning users see when :attr:`warned`."""
        if not self.warned:
            return
        gene = self.most_affected_gene
        logger.warning(
            "%s: %.0f%% of the values fall outside the range of the training data and are clipped to [0, 1] "
            "(most: gene %s, %.0f%% of its values); are the data in other units or normalised differently?",
            source,
            100 * self.outside_share,
            repr(gene) if self.genes is not None else gene,
            100 * self.most_affected_share,
        )

    def to_dict(self) -> dict:
        """Plain JSON types (for ``uns``, a manifest or the dashboard)."""
        return {
            "n_values": self.n_values,
            "n_outside": self.n_outside,
            "outside_share": self.outside_share,
            "most_affected_gene": self.most_affected_gene,
            "most_affected_share": self.most_affected_share,
            "warning_threshold": OUT_OF_RANGE_WARNING,
        }


@dataclass(frozen=True)
class Scaler:
    """Per-gene min-max scaling to [0, 1], fit on the training split only.

    Constant genes get range 1 so they scale to 0 rather than dividing by zero.

    Sparse data stay sparse when every training minimum is >= 0 (counts, log1p): a zero
    then scales to (0 - min) / range <= 0 and is clipped to 0, so zeros stay zeros. When a
    minimum is negative (e.g. z-scores) zeros would move, and the scaled matrix is dense.
    """

    minimum: np.ndarray
    range: np.ndarray

    @classmethod
    def fit(cls, X, *, rows=None) -> Scaler:
        """Fit on the ``rows`` (default all) of ``X``, dense or sparse (a sparse matrix's
        implicit zeros count), a chunk of rows at a time."""
        n, g = X.shape
        rows = np.arange(n) if rows is None else np.asarray(rows)
        if len(rows) == 0:
            raise UserError("cannot fit the scaler on no samples")
        minimum = np.full(g, np.inf, dtype=np.float32)
        maximum = np.full(g, -np.inf, dtype=np.float32)
        step = _rows_per_chunk(4 * g)
        for i in range(0, len(rows), step):
            block = X[rows[i : i + step]] if len(rows) < n else X[i : i + step]
            if sp.issparse(block):
                lo, hi = block.min(axis=0), block.max(axis=0)
                lo = np.asarray(lo.toarray() if sp.issparse(lo) else lo).ravel()
                hi = np.asarray(hi.toarray() if sp.issparse(hi) else hi).ravel()
            else:
                lo, hi = block.min(axis=0), block.max(axis=0)
            np.minimum(minimum, lo, out=minimum, casting="unsafe")
            np.maximum(maximum, hi, out=maximum, casting="unsafe")
        rng = (maximum - minimum).astype(np.float32)
        rng[rng <= 0] = 1.0
        return cls(minimum=minimum, range=rng)

    @property
    def keeps_sparse(self) -> bool:
        """Whether scaling keeps zeros at zero (every minimum >= 0)."""
        return bool((self.minimum >= 0).all())

    def transform(self, X, *, genes=None, source: str = "data"):
        """Scale to [0, 1] with the training minimum and range, clipping what falls outside.

        Dense in, dense float32 out. Sparse in: sparse out (float32 CSR sharing ``X``'s
        index arrays) when :attr:`keeps_sparse`, else dense. When more than
        :data:`OUT_OF_RANGE_WARNING` of the values fall outside the training range, a
        warning names the share and the most affected gene (by name when ``genes`` is
        given, else by column): new data in other units or with another normalisation.
        :meth:`transform_report` also returns those figures.
        """
        return self.transform_report(X, genes=genes, source=source)[0]

    def transform_report(self, X, *, genes=None, source: str = "data", warn: bool = True):
        """:meth:`transform`, and a :class:`ScalingReport` of the values outside the training
        range (``warn=False``: no warning logged; merge the reports of chunks, then warn once)."""
        n, g = X.shape
        if sp.issparse(X) and self.keeps_sparse:
            Xs, per_gene = self._transform_sparse(sp.csr_matrix(X))
        else:
            Xs = np.empty((n, g), dtype=np.float32)
            per_gene = np.zeros(g, dtype=np.int64)
            step = _rows_per_chunk(4 * g)
            for i in range(0, n, step):
                block = X[i : i + step]
                block = block.toarray() if sp.issparse(block) else np.asarray(block)
                scaled = (block - self.minimum) / self.range  # in the data's precision
                per_gene += (scaled < -RANGE_TOLERANCE).sum(0) + (scaled > 1 + RANGE_TOLERANCE).sum(
                    0
                )
                Xs[i : i + step] = np.clip(scaled, 0.0, 1.0, out=scaled)
            if sp.issparse(X):
                logger.info(
                    "%s: %d gene(s) have a negative training minimum, so zeros do not stay "
                    "zeros: the scaled matrix is dense (%d x %d)",
                    source,
                    int((self.minimum < 0).sum()),
                    n,
                    g,
                )
        report = ScalingReport(n, per_gene, None if genes is None else list(genes))
        if warn:
            report.warn(source)
        return Xs, report

    def _transform_sparse(self, X: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
        n, g = X.shape
        data = np.empty(X.nnz, dtype=np.float32)
        per_gene = np.zeros(g, dtype=np.int64)
        step = max(1, CHUNK_BYTES // 4)
        for a in range(0, X.nnz, step):
            cols = X.indices[a : a + step]
            out = data[a : a + step]
            np.subtract(X.data[a : a + step], self.minimum[cols], out=out)
            np.divide(out, self.range[cols], out=out)
            bad = (out < -RANGE_TOLERANCE) | (out > 1 + RANGE_TOLERANCE)
            per_gene += np.bincount(cols[bad], minlength=g)
            np.clip(out, 0.0, 1.0, out=out)
        # implicit zeros scale to -min/range: outside when the training minimum is above 0
        zero_outside = -self.minimum / self.range < -RANGE_TOLERANCE
        if zero_outside.any():
            stored = np.bincount(X.indices, minlength=g)
            per_gene += np.where(zero_outside, n - stored, 0)
        Xs = sp.csr_matrix((data, X.indices, X.indptr), shape=(n, g), copy=False)
        return Xs, per_gene

    def inverse_transform(self, Xs: np.ndarray) -> np.ndarray:
        return (Xs * self.range + self.minimum).astype(np.float32)


# ----------------------------------------------------------------------------- split, subsample


def stratified_split(
    labels, *, test_size: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``round(n_c * test_size)`` samples of each class go to test.

    Every class with two or more samples keeps at least one sample on each side; a class
    with a single sample stays in training. Returns sorted integer index arrays.
    """
    if not 0 < test_size < 1:
        raise UserError(f"test_size must be between 0 and 1, got {test_size}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * test_size))
        n_test = min(max(n_test, 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.extend(rng.permutation(idx)[:n_test].tolist())
    test = np.sort(np.array(test, dtype=int))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def subsample(labels, cap: int | None, *, seed: int = 0, min_per_class: int = 2) -> np.ndarray:
    """A fixed, seeded, class-stratified subsample of about ``cap`` positions (sorted).

    All positions when there are at most ``cap`` (or ``cap`` is None). Else each class
    keeps ``round(cap * n_c / n)`` of its ``n_c`` samples, and at least ``min_per_class``
    (or all it has), so a small class is never dropped: the result may exceed ``cap`` by
    up to ``min_per_class`` per class.
    """
    labels = np.asarray(labels).astype(str)
    n = len(labels)
    if cap is None or n <= cap:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx), max(min_per_class, int(round(cap * len(idx) / n))))
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


# ----------------------------------------------------------------------------- fingerprint


def fingerprint(X, genes, samples) -> str:
    """Short content hash of a GEM (values, genes, samples) to recognise a dataset.

    ``X`` (samples x genes) may be dense, sparse or on disk: it is hashed a chunk of rows
    at a time as its dense float32 values in row order, so the same data give the same
    fingerprint however they are stored.
    """
    h = hashlib.sha256()
    if isinstance(X, np.ndarray) and X.dtype == np.float32 and X.flags.c_contiguous:
        h.update(memoryview(X).cast("B"))
    else:
        for _, block in _blocks(X, None, None):
            h.update((block.toarray() if sp.issparse(block) else block).tobytes())
    return _finish(h, genes, samples)


def _finish(h, genes, samples) -> str:
    h.update("\n".join(map(str, genes)).encode())
    h.update("\n".join(map(str, samples)).encode())
    return h.hexdigest()[:16]


def dataset_fingerprint(
    adata: ad.AnnData, genes, *, layer: str | None = None, source: str = "data"
) -> str:
    """:func:`fingerprint` of ``adata``'s expression of ``genes`` (all samples), streamed:
    what training stored in the bundle, computed without densifying the whole matrix."""
    genes = [str(g) for g in genes]
    match = match_genes(adata, genes, source=source)
    if match.missing:
        raise UserError(
            f"{source}: {match.n_missing} of the model's {match.n_genes} genes are missing: {_shown(match.missing)}"
        )
    h = hashlib.sha256()
    for _, block in _blocks(_matrix(adata, layer), match.index, None, nan_fill=_nan_fill(adata)):
        h.update((block.toarray() if sp.issparse(block) else block).tobytes())
    return _finish(h, genes, list(adata.obs_names))


# ----------------------------------------------------------------------------- writing


def write_gem(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``adata`` as .h5ad (via a temporary file, so a crash leaves no half file).

    A matrix read on disk (``backed``) is copied a chunk of rows at a time (as float32,
    missing values filled), never whole in memory; only ``obs``, ``var`` and ``uns`` go with it.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: cannot write, {path.parent} is not a folder")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if is_backed_matrix(adata.X):
            _write_backed(adata, tmp)
        else:
            adata.write_h5ad(tmp)
        tmp.replace(path)
    except OSError:
        raise
    except Exception as err:  # anndata cannot store something in the AnnData
        raise UserError(f"{path}: cannot write ({str(err).splitlines()[0]})") from err
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a leftover after a failure
    return path


def _write_backed(adata: ad.AnnData, path: Path) -> None:
    """``adata`` whose X is on disk, streamed into a new .h5ad."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    uns = dict(adata.uns)
    if "tspg_import" in uns:  # the copy is an ordinary file, its missing values filled
        uns["tspg_import"] = {
            k: v for k, v in uns["tspg_import"].items() if k not in ("backed", "nan_fill_value")
        }
    ad.AnnData(obs=adata.obs, var=adata.var, uns=uns).write_h5ad(path)
    X, nan_fill = adata.X, _nan_fill(adata)
    with h5py.File(path, "a") as f:
        if _is_sparse_dataset(X):
            for start, block in _blocks(X, None, None, nan_fill=nan_fill):
                if start == 0:
                    write_elem(f, "X", block)
                    out = sparse_dataset(f["X"])
                else:
                    out.append(block)
        else:
            out = f.create_dataset("X", shape=X.shape, dtype=np.float32)
            out.attrs["encoding-type"], out.attrs["encoding-version"] = "array", "0.2.0"
            for start, block in _blocks(X, None, None, nan_fill=nan_fill):
                out[start : start + block.shape[0]] = block
