"""Data to try things on: the PBMC demo, synthetic GEMs for benchmarks, the reference example."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

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


# ----------------------------------------------------------------------------- count data


ATLAS_LABEL_KEY = "cell_type"
_CELLS_PER_CHUNK = 2048  # fixed, so a seed gives the same cells whatever the total


class CountModel:
    """Counts of a single-cell-like GEM: a negative binomial per gene and cell, with
    class-specific gene programs and library-size variation.

    Count of gene g in cell i of class c: Poisson(L_i * gamma_im * pi_cg), where pi_c is the
    class's expression profile (a shared log-normal base, times up and down programs),
    L_i the cell's library size (log-normal around ``library``) and gamma_im ~ Gamma(r, 1/r)
    the activity of gene g's module m in that cell (genes are split at random into
    ``n_modules`` co-varying modules). Marginally each count is negative binomial with mean
    L_i pi_cg and size r (``dispersion``).

    Sampled read by read, so the work grows with the counts, not with cells x genes: a
    cell's reads per module are multinomial, and a read's gene inside its module is drawn
    from a per-class alias table (Walker's method, O(1) a read).
    """

    def __init__(
        self,
        n_genes: int,
        n_classes: int,
        *,
        rng: np.random.Generator,
        n_up: int,
        n_down: int,
        up_fold: tuple[float, float] = (4.0, 8.0),
        down_fold: tuple[float, float] = (0.1, 0.25),
        base_sigma: float = 1.2,
        dispersion: float = 3.0,
        n_modules: int = 100,
    ):
        if n_classes * (n_up + n_down) > n_genes:
            raise ValueError(
                f"{n_classes} classes x ({n_up} up + {n_down} down) program genes exceed {n_genes} genes"
            )
        self.n_genes, self.n_classes, self.dispersion = n_genes, n_classes, dispersion
        base = rng.lognormal(0.0, base_sigma, n_genes)
        # disjoint programs: up genes from the middle of the abundance range (a rise is
        # visible), down genes from the top quarter (a fall is visible)
        by_abundance = np.argsort(base)
        top = rng.permutation(by_abundance[-n_genes // 4 :])
        down_pool = top[: n_classes * n_down]
        rest = np.setdiff1d(np.arange(n_genes), down_pool)
        middle = rest[(base[rest] > np.quantile(base, 0.25))]
        if len(middle) < n_classes * n_up:
            middle = rest
        up_pool = rng.permutation(middle)[: n_classes * n_up]
        self.up = [np.sort(up_pool[c * n_up : (c + 1) * n_up]) for c in range(n_classes)]
        self.down = [np.sort(down_pool[c * n_down : (c + 1) * n_down]) for c in range(n_classes)]
        profile = np.tile(base, (n_classes, 1))
        for c in range(n_classes):
            profile[c, self.up[c]] *= rng.uniform(*up_fold, n_up)
            profile[c, self.down[c]] *= rng.uniform(*down_fold, n_down)
        self.profile = profile / profile.sum(1, keepdims=True)  # (classes, genes), rows sum to 1
        # modules: genes in module order; per class and module its share and alias tables
        n_modules = max(1, min(n_modules, n_genes))
        module = rng.integers(0, n_modules, n_genes)
        module[rng.permutation(n_genes)[:n_modules]] = np.arange(n_modules)  # none empty
        self.order = np.argsort(module, kind="stable")
        sizes = np.bincount(module, minlength=n_modules)
        self.start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.size = sizes
        self.n_modules = n_modules
        ordered = self.profile[:, self.order]  # (classes, genes in module order)
        mod_of = module[self.order]
        self.module_share = np.stack(
            [np.bincount(mod_of, weights=ordered[c], minlength=n_modules) for c in range(n_classes)]
        )  # (classes, modules)
        self.alias_prob = np.empty((n_classes, n_genes), dtype=np.float64)
        self.alias = np.empty((n_classes, n_genes), dtype=np.int64)
        for c in range(n_classes):
            for m in range(n_modules):
                a, b = self.start[m], self.start[m] + sizes[m]
                prob, alias = _alias_table(ordered[c, a:b])
                self.alias_prob[c, a:b], self.alias[c, a:b] = prob, alias + a

    def expected_density(self, library: float, library_sigma: float) -> float:
        """Expected share of non-zero counts for a median library size ``library``."""
        q = np.exp(np.log(library) + library_sigma * np.array([-1.15, -0.32, 0.32, 1.15]))
        r = self.dispersion
        zero = (1.0 + q[:, None, None] * self.profile[None] / r) ** -r  # P(count = 0)
        return float(1.0 - zero.mean())

    def library_for(self, density: float, library_sigma: float) -> float:
        """The median library size that gives ``density`` non-zero counts (bisection)."""
        lo, hi = 1.0, 1e7
        for _ in range(40):
            mid = np.sqrt(lo * hi)
            lo, hi = (mid, hi) if self.expected_density(mid, library_sigma) < density else (lo, mid)
        return float(np.sqrt(lo * hi))

    def counts(
        self, classes: np.ndarray, library: np.ndarray, rng: np.random.Generator
    ) -> sp.csr_matrix:
        """Counts (cells x genes, float32 CSR) of cells of ``classes`` with library sizes ``library``."""
        n, r = len(classes), self.dispersion
        gamma = rng.standard_gamma(r, (n, self.n_modules)) / r
        w = gamma * self.module_share[classes]  # (cells, modules)
        rate = w.sum(1)
        reads = rng.poisson(library * rate)
        per_module = rng.multinomial(reads, w / rate[:, None])  # (cells, modules)
        flat = per_module.ravel()
        cell = np.repeat(np.repeat(np.arange(n), self.n_modules), flat)
        mod = np.repeat(np.tile(np.arange(self.n_modules), n), flat)
        # a read's gene inside its module: Walker's alias method
        j = self.start[mod] + (rng.random(len(mod), dtype=np.float32) * self.size[mod]).astype(
            np.int64
        )
        np.minimum(j, self.start[mod] + self.size[mod] - 1, out=j)  # float32 rounding at 1
        c = classes[cell]
        keep = rng.random(len(mod), dtype=np.float32) < self.alias_prob[c, j]
        pos = np.where(keep, j, self.alias[c, j])
        # (cell, gene) of each read; reads of the same pair add up
        dtype = np.uint32 if n * self.n_genes < 2**32 else np.uint64
        key = cell.astype(dtype) * dtype(self.n_genes) + self.order[pos].astype(dtype)
        key.sort()
        first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        count = np.diff(np.append(first, len(key)))
        rows, cols = np.divmod(key[first], dtype(self.n_genes))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
        return sp.csr_matrix(
            (count.astype(np.float32), cols.astype(np.int32), indptr), shape=(n, self.n_genes)
        )


def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table of ``weights``: (probability of keeping a bucket, its alias)."""
    k = len(weights)
    p = weights * (k / weights.sum())
    prob, alias = np.ones(k), np.arange(k)
    small = [i for i in range(k) if p[i] < 1.0]
    large = [i for i in range(k) if p[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = p[s], g
        p[g] -= 1.0 - p[s]
        (small if p[g] < 1.0 else large).append(g)
    return prob, alias


def _log1p_normalised(counts: sp.csr_matrix) -> sp.csr_matrix:
    """scanpy's ``normalize_total`` (to 10,000 per cell) then ``log1p``, on a CSR matrix."""
    import warnings

    import scanpy as sc

    tmp = ad.AnnData(X=counts)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some cells have zero counts")  # they stay zero
        sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return sp.csr_matrix(tmp.X, dtype=np.float32)


def _count_gem_chunks(
    n_cells: int,
    n_genes: int,
    *,
    n_classes: int,
    n_up: int,
    n_down: int,
    density: float,
    library_sigma: float,
    seed: int,
    label_key: str,
):
    """(model, obs, var, iterator of log1p CSR chunks) of a count-model GEM."""
    rng = np.random.default_rng(seed)
    model = CountModel(n_genes, n_classes, rng=rng, n_up=n_up, n_down=n_down)
    library = model.library_for(density, library_sigma)
    weights = rng.uniform(0.3, 1.7, n_classes)
    classes = rng.choice(n_classes, size=n_cells, p=weights / weights.sum())
    sizes = library * rng.lognormal(0.0, library_sigma, n_cells)
    names = [f"type-{c:02d}" for c in range(n_classes)]
    obs = pd.DataFrame(
        {label_key: pd.Categorical.from_codes(classes, names)},
        index=pd.Index([f"cell-{i:07d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene-{j:05d}" for j in range(n_genes)]))
    truth = {
        "up": {names[c]: [var.index[g] for g in model.up[c]] for c in range(n_classes)},
        "down": {names[c]: [var.index[g] for g in model.down[c]] for c in range(n_classes)},
        "label_key": label_key,
        "median_library_size": library,
    }

    def chunks():
        for k, a in enumerate(range(0, n_cells, _CELLS_PER_CHUNK)):
            b = min(a + _CELLS_PER_CHUNK, n_cells)
            counts = model.counts(classes[a:b], sizes[a:b], np.random.default_rng([seed, k]))
            yield _log1p_normalised(counts)

    return obs, var, truth, chunks()


def atlas_gem(
    n_cells: int = 300_000,
    n_genes: int = 20_000,
    *,
    n_classes: int = 20,
    density: float = 0.05,
    seed: int = 0,
    label_key: str = ATLAS_LABEL_KEY,
) -> ad.AnnData:
    """A single-cell-atlas-like sparse GEM (defaults: 300,000 cells x 20,000 genes, 20 cell
    types, about 5% non-zero), log1p-normalised, in memory.

    Counts come from :class:`CountModel` (negative binomial, class-specific programs of
    1% of the genes up and 0.5% down, log-normal library sizes whose median is chosen for
    ``density``), then scanpy's ``normalize_total`` (10,000 per cell) and ``log1p``, as an
    atlas's ``X``. Unequal class sizes. Seeded: the same seed gives the same GEM.

    Returns
    -------
    AnnData with a float32 CSR ``X``, ``obs[label_key]`` (``type-00`` ...), genes
    ``gene-00000`` ..., and ``uns["truth"]``: each class's up and down program genes.
    To write one too big for memory, use :func:`write_atlas_gem`.
    """
    from .data import vstack_csr

    obs, var, truth, chunks = _atlas_chunks(n_cells, n_genes, n_classes, density, seed, label_key)
    X = vstack_csr(list(chunks), n_genes)
    return ad.AnnData(X=X, obs=obs, var=var, uns={"truth": truth})


def _atlas_chunks(n_cells, n_genes, n_classes, density, seed, label_key):
    """The atlas's obs, var, truth and its chunks of cells (shared by the two writers)."""
    return _count_gem_chunks(
        n_cells,
        n_genes,
        n_classes=n_classes,
        n_up=max(1, n_genes // 100),
        n_down=max(1, n_genes // 200),
        density=density,
        library_sigma=0.5,
        seed=seed,
        label_key=label_key,
    )


def write_atlas_gem(
    path: str | Path,
    n_cells: int = 300_000,
    n_genes: int = 20_000,
    *,
    n_classes: int = 20,
    density: float = 0.05,
    seed: int = 0,
    label_key: str = ATLAS_LABEL_KEY,
) -> Path:
    """:func:`atlas_gem` written to ``path`` (.h5ad) a chunk of cells at a time, never whole
    in memory; the file holds the same GEM as ``atlas_gem`` with the same arguments."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    path = Path(path)
    obs, var, truth, chunks = _atlas_chunks(n_cells, n_genes, n_classes, density, seed, label_key)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        ad.AnnData(obs=obs, var=var, uns={"truth": truth}).write_h5ad(tmp)
        with h5py.File(tmp, "a") as f:
            for k, block in enumerate(chunks):
                if k == 0:
                    write_elem(f, "X", block)
                    X = sparse_dataset(f["X"])
                else:
                    X.append(block)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def planted_gem(
    n_samples: int = 600,
    n_genes: int = 500,
    *,
    n_classes: int = 4,
    n_up: int = 10,
    n_down: int = 10,
    density: float = 0.6,
    seed: int = 0,
    label_key: str = "label",
    sparse: bool = False,
) -> ad.AnnData:
    """A small GEM with planted truth: each class has known defining genes, ``n_up`` raised
    4-8x and ``n_down`` lowered to 10-25% against the shared base (disjoint between classes).

    The same count model as :func:`atlas_gem` (negative binomial, log1p-normalised), small
    enough for tests and benchmarks, so a method's top genes can be scored against the
    truth (:func:`truth_recovery`). ``density`` sets the median library size (0.6: about
    60% of the values non-zero, bulk-like; 0.05 is single-cell-like).

    Returns
    -------
    AnnData (``X`` dense float32, or CSR with ``sparse``), ``obs[label_key]``
    (``type-00`` ...) and ``uns["truth"]`` = ``{"up": {class: [genes]}, "down": {class:
    [genes]}, "label_key", "median_library_size"}``; :func:`planted_truth` reads it as a table.
    """
    from .data import vstack_csr

    obs, var, truth, chunks = _count_gem_chunks(
        n_samples,
        n_genes,
        n_classes=n_classes,
        n_up=n_up,
        n_down=n_down,
        density=density,
        library_sigma=0.25,
        seed=seed,
        label_key=label_key,
    )
    X = vstack_csr(list(chunks), n_genes)
    return ad.AnnData(X=X if sparse else X.toarray(), obs=obs, var=var, uns={"truth": truth})


def planted_truth(adata: ad.AnnData) -> pd.DataFrame:
    """The planted defining genes of :func:`planted_gem` / :func:`atlas_gem` as a tidy table:
    ``class``, ``direction`` (up / down), ``gene``."""
    truth = adata.uns.get("truth")
    if not truth or "up" not in truth:
        raise ValueError("this AnnData has no planted truth (uns['truth'] of tspg.datasets)")
    rows = [(c, d, str(g)) for d in ("up", "down") for c, genes in truth[d].items() for g in genes]
    return pd.DataFrame(rows, columns=["class", "direction", "gene"])


def truth_recovery(adata: ad.AnnData, target: str, *, up=None, down=None) -> dict:
    """How many of a method's ``up`` / ``down`` genes are the target class's planted ones.

    Returns ``{"up": share of up that are planted up genes of target, "down": the same
    for down, "n_up", "n_down": list lengths, "planted_up", "planted_down": sizes of the
    planted programs}`` (a share is None for an empty or missing list).
    """
    table = planted_truth(adata)
    mine = table[table["class"] == str(target)]
    if mine.empty:
        raise ValueError(f"class {target!r} has no planted genes")
    out = {}
    for d, genes in (("up", up), ("down", down)):
        planted = set(mine.loc[mine["direction"] == d, "gene"])
        genes = list(genes or [])
        out[d] = sum(g in planted for g in genes) / len(genes) if genes else None
        out[f"n_{d}"] = len(genes)
        out[f"planted_{d}"] = len(planted)
    return out


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
