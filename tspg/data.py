"""Gene-expression matrices (GEMs) as AnnData: reading, validation, splitting and scaling.

A GEM is samples x genes. Every reader returns an :class:`anndata.AnnData` with
``obs_names`` = sample ids, ``var_names`` = genes and, when labels are known, a
categorical ``obs[label_key]``. Errors are :class:`tspg.errors.UserError` with one line naming the file,
sample or gene at fault.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
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
    "align_genes",
    "expression",
    "fill_missing",
    "fingerprint",
    "read_gem",
    "read_labels",
    "read_text",
    "Scaler",
    "stratified_split",
    "validate_labels",
    "write_gem",
]

logger = logging.getLogger(__name__)

NanPolicy = Literal["fill", "error"]
# Scaling new data: warn when more than this share of values falls outside the training
# range (by more than the tolerance, float rounding at the edges)
OUT_OF_RANGE_WARNING = 0.05
RANGE_TOLERANCE = 1e-6
TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t", ".tab": "\t"}


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

    Returns
    -------
    AnnData with a dense ``float32`` ``X``, unique gene names, and ``uns["tspg_import"]``
    recording the source file and the number of filled missing values.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        adata = _read_h5ad(path, layer=layer, use_raw=use_raw)
    elif suffix in TEXT_SUFFIXES:
        adata = _read_text(path, TEXT_SUFFIXES[suffix])
    elif suffix == ".npy":
        adata = _read_npy(path, row_names=row_names, col_names=col_names)
    else:
        raise UserError(
            f"{path}: unsupported file type {suffix!r}; use .h5ad, .csv, .tsv, .txt or .npy"
        )
    if transpose:
        adata = adata.T.copy()
    if labels is not None:
        label_key = label_key or "label"
        adata.obs[label_key] = read_labels(labels, adata.obs_names)
    adata.X = _dense_float(adata.X, path)
    n_filled = fill_missing(
        adata.X, nan=nan, source=path, samples=adata.obs_names, genes=adata.var_names
    )
    _check_names(adata, path)
    if label_key is not None:
        validate_labels(adata, label_key, source=path)
    adata.uns["tspg_import"] = {"source": str(path), "n_missing_filled": int(n_filled)}
    return adata


def _read_h5ad(path: Path, *, layer: str | None, use_raw: bool) -> ad.AnnData:
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a corrupt file
        raise UserError(f"{path}: not a readable .h5ad file ({err})") from err
    if use_raw and layer:
        raise UserError(f"{path}: choose either a layer or .raw, not both")
    if use_raw:
        if adata.raw is None:
            raise UserError(f"{path}: has no .raw; drop --use-raw to read .X")
        return ad.AnnData(
            X=adata.raw.X, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.raw.var_names)
        )
    if layer:
        if layer not in adata.layers:
            raise UserError(f"{path}: no layer {layer!r}; layers are {list(adata.layers)}")
        return ad.AnnData(X=adata.layers[layer], obs=adata.obs.copy(), var=adata.var.copy())
    return adata


def _read_text(path: Path, sep: str) -> ad.AnnData:
    try:
        df = pd.read_csv(path, sep=sep, dtype={0: str})  # ids stay text: "001" is not 1
    except Exception as err:
        raise UserError(
            f"{path}: cannot parse as {'comma' if sep == ',' else 'tab'}-separated text ({err})"
        ) from err
    if isinstance(
        df.index, pd.RangeIndex
    ):  # else pandas took the first column as the index (header one short)
        df = df.set_index(df.columns[0])
    if df.shape[1] == 0:
        raise UserError(f"{path}: no gene columns found (is the separator right?)")
    # pandas renames repeated header names ("G1" -> "G1.1"); restore them so that a
    # repeated gene (or, transposed, sample) is reported instead of silently kept twice.
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh, delimiter=sep), [])
    if len(header) >= df.shape[1]:
        df.columns = [str(c) for c in header[len(header) - df.shape[1] :]]
    for j in range(df.shape[1]):
        column = df.iloc[:, j]
        if pd.api.types.is_numeric_dtype(column):
            continue
        values = pd.to_numeric(column, errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() & column.notna().to_numpy())
        if not len(bad):  # no rows at all: reported as an empty matrix
            continue
        i = int(bad[0])
        raise UserError(
            f"{path}: non-numeric value {column.iloc[i]!r} at row {df.index[i]!r}, column {df.columns[j]!r}"
        )
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    return ad.AnnData(
        X=df.to_numpy(dtype=np.float32),
        obs=pd.DataFrame(index=df.index),
        var=pd.DataFrame(index=df.columns),
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
        X=X.astype(np.float32), obs=pd.DataFrame(index=rows), var=pd.DataFrame(index=cols)
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


def read_labels(path: str | Path, samples: pd.Index) -> pd.Categorical:
    """Read a labels file and return the labels of ``samples`` in order.

    Accepts the reference two-column format (sample <tab> label, no header) or a CSV/TSV
    with a header row whose first column is the sample id and second the label.
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
        raise UserError(f"{path}: no label for sample {missing[0]!r}{more}")
    return pd.Categorical(series.loc[list(samples)].to_numpy())


def _dense_float(X, source: Path) -> np.ndarray:
    if sp.issparse(X):
        X = X.toarray()
    X = np.asarray(X)
    if not np.issubdtype(X.dtype, np.number):
        raise UserError(f"{source}: expression values are not numeric (dtype {X.dtype})")
    return np.ascontiguousarray(X, dtype=np.float32)


def fill_missing(
    X: np.ndarray, *, nan: NanPolicy = "fill", source: str | Path = "data", samples=None, genes=None
) -> int:
    """Fill NaN in place with the matrix minimum (``nan="fill"``) or refuse them.

    Infinite values are always refused. Returns the number of values filled.
    """
    bad = np.isinf(X)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise UserError(
            f"{source}: infinite value at sample {_name(samples, i)!r}, gene {_name(genes, j)!r}"
        )
    missing = np.isnan(X)
    n = int(missing.sum())
    if n == 0:
        return 0
    if nan == "error":
        i, j = map(int, np.argwhere(missing)[0])
        raise UserError(
            f"{source}: {n} missing values, first at sample {_name(samples, i)!r}, gene {_name(genes, j)!r} (use --nan fill to fill them with the minimum)"
        )
    if n == X.size:
        raise UserError(f"{source}: every value is missing")
    X[missing] = np.nanmin(X)
    logger.warning("%s: filled %d missing values with the matrix minimum", source, n)
    return n


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


def expression(adata: ad.AnnData, *, layer: str | None = None) -> np.ndarray:
    """The expression matrix (``X`` or a layer) as dense float32."""
    X = adata.layers[layer] if layer else adata.X
    return _dense_float(X, Path("data"))


def align_genes(
    adata: ad.AnnData, genes, *, layer: str | None = None, source: str = "data"
) -> np.ndarray:
    """Expression of ``genes`` in that order; a clear error when any is missing."""
    genes = pd.Index(genes)
    present = genes.isin(adata.var_names)
    if not present.all():
        missing = list(genes[~present])
        if not present.any():
            raise UserError(
                f"{source}: none of the model's {len(genes)} genes are present (e.g. {missing[:3]})"
            )
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise UserError(
            f"{source}: {len(missing)} of the model's {len(genes)} genes are missing: {shown}"
        )
    idx = adata.var_names.get_indexer(genes)
    X = expression(adata, layer=layer)
    return np.ascontiguousarray(X[:, idx])


@dataclass(frozen=True)
class Scaler:
    """Per-gene min-max scaling to [0, 1], fit on the training split only.

    Constant genes get range 1 so they scale to 0 rather than dividing by zero.
    """

    minimum: np.ndarray
    range: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> Scaler:
        minimum = X.min(axis=0).astype(np.float32)
        rng = (X.max(axis=0) - minimum).astype(np.float32)
        rng[rng <= 0] = 1.0
        return cls(minimum=minimum, range=rng)

    def transform(self, X: np.ndarray, *, genes=None, source: str = "data") -> np.ndarray:
        """Scale to [0, 1] with the training minimum and range, clipping what falls outside.

        When more than :data:`OUT_OF_RANGE_WARNING` of the values fall outside the training
        range, a warning names the share and the most affected gene (by name when ``genes``
        is given, else by column): new data in other units or with another normalisation.
        """
        Xs = (X - self.minimum) / self.range
        outside = (Xs < -RANGE_TOLERANCE) | (Xs > 1 + RANGE_TOLERANCE)  # samples x genes
        share = float(outside.mean()) if outside.size else 0.0
        if share > OUT_OF_RANGE_WARNING:
            per_gene = outside.mean(axis=0)
            j = int(per_gene.argmax())
            gene = repr(str(genes[j])) if genes is not None else f"#{j + 1}"
            logger.warning(
                "%s: %.0f%% of the values fall outside the range of the training data and are clipped to [0, 1] "
                "(most: gene %s, %.0f%% of its values); are the data in other units or normalised differently?",
                source,
                100 * share,
                gene,
                100 * per_gene[j],
            )
        return np.clip(Xs, 0.0, 1.0).astype(np.float32)

    def inverse_transform(self, Xs: np.ndarray) -> np.ndarray:
        return (Xs * self.range + self.minimum).astype(np.float32)


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


def fingerprint(X: np.ndarray, genes, samples) -> str:
    """Short content hash of a GEM (values, genes, samples) to recognise a dataset."""
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    h.update("\n".join(map(str, genes)).encode())
    h.update("\n".join(map(str, samples)).encode())
    return h.hexdigest()[:16]


def write_gem(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``adata`` as .h5ad (via a temporary file, so a crash leaves no half file)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: cannot write, {path.parent} is not a folder")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        adata.write_h5ad(tmp)
        tmp.replace(path)
    except OSError:
        raise
    except Exception as err:  # anndata cannot store something in the AnnData
        raise UserError(f"{path}: cannot write ({str(err).splitlines()[0]})") from err
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a leftover after a failure
    return path
