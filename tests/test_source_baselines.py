"""Source-aware baselines (issue 11 item 2): per-source DE and mean shift beside TSPG's genes.

Real scanpy Wilcoxon tests on a synthetic GEM with planted programmes; ``tspg evaluate``'s
"by source class" section through the command line on the shared quick bundle.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tiny_adata

from tspg.baselines import (
    GENE_COLUMNS,
    SOURCE_COLUMNS,
    baselines_of,
    de_ranked,
    differential_expression,
    far_rank,
    gene_table,
    per_class_subsample,
    source_comparison,
    source_table,
)
from tspg.cli import main
from tspg.datasets import planted_gem

TARGET = "type-00"


@pytest.fixture(scope="module")
def planted():
    """500 samples x 200 genes, 5 classes; each raises 10 planted genes and lowers 10 others
    (disjoint between classes); scaled to [0, 1] per gene as a bundle would."""
    a = planted_gem(500, 200, n_classes=5, seed=0)
    X = np.asarray(a.X, dtype=np.float64)
    lo, hi = X.min(0), X.max(0)
    X = ((X - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)
    return X, a.obs["label"].astype(str).to_numpy(), list(a.var_names), a.uns["truth"]


def test_per_source_de_finds_the_planted_genes(planted):
    X, y, genes, truth = planted
    base = baselines_of(X, y, genes, TARGET)
    assert sorted(base.de_by_source) == ["type-01", "type-02", "type-03", "type-04"]
    assert base.n_train == {c: int((y == c).sum()) for c in base.de_by_source}
    rest = de_ranked(base.de)
    for s, de in base.de_by_source.items():
        lists = de_ranked(de)
        # target vs s: up = the target's raised genes and the ones s lowers; down the reverse
        up = set(truth["up"][TARGET]) | set(truth["down"][s])
        down = set(truth["down"][TARGET]) | set(truth["up"][s])
        assert set(lists["up"][:20]) == up and set(lists["down"][:20]) == down, s
        # against the rest, s's own programme is diluted by the other classes
        assert len(set(rest["down"][:20]) & set(truth["up"][s])) < 10
    # the test uses only the target's and the source's samples
    pair = (y == TARGET) | (y == "type-02")
    alone = differential_expression(X[pair], y[pair], genes, TARGET, reference="rest")
    assert alone["gene"].tolist() == base.de_by_source["type-02"]["gene"].tolist()
    np.testing.assert_allclose(alone["score"], base.de_by_source["type-02"]["score"])
    # target mean and sd over the target's training samples
    np.testing.assert_allclose(base.target_mean, X[y == TARGET].mean(0), rtol=1e-6)
    np.testing.assert_allclose(base.target_sd, X[y == TARGET].std(0), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2 samples of 'type-00' and 2 samples of 'x'"):
        differential_expression(
            X, np.where(np.arange(len(y)) == 0, "x", y), genes, TARGET, reference="x"
        )


def test_per_class_subsample_bounds_each_class():
    labels = np.array(["a"] * 50 + ["b"] * 3 + ["c"] * 20)
    keep = per_class_subsample(labels, 10, seed=1)
    counts = {c: int((labels[keep] == c).sum()) for c in "abc"}
    assert counts == {"a": 10, "b": 3, "c": 10}
    assert np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(keep, per_class_subsample(labels, 10, seed=1))  # seeded
    assert len(per_class_subsample(labels, None)) == len(labels)


def _direct(P, X, labels, s, base, genes, k):
    """Per direction: the TSPG-only and baseline-only genes of source s, computed here."""
    rows = labels == s
    n = len(genes)
    far = max(50, int(np.ceil(2.5 * k)))
    shift = base.shifts.loc[s].to_numpy(np.float64)
    Xs = X[rows].astype(np.float64)
    change = np.clip(Xs + shift, 0, 1) - Xs
    score = base.de_by_source[s].set_index("gene")["score"].reindex(genes).to_numpy()
    out = {}
    for d, sign in (("up", -1.0), ("down", 1.0)):

        def rank(values, sign=sign):
            r = np.empty(n, int)
            r[np.argsort(sign * values, kind="stable")] = np.arange(1, n + 1)
            return r

        r_t = rank(P[rows].astype(np.float64).mean(0))
        r_ms = rank(change.mean(0))
        r_de = rank(score)
        g = np.asarray(genes)
        out[d] = (
            set(g[(r_t <= k) & (r_de > far) & (r_ms > far)]),
            set(g[(r_de <= k) & (r_ms <= k) & (r_t > far)]),
            set(g[r_t <= k]),
        )
    return out


def test_source_comparison_against_a_direct_computation(planted):
    X, y, genes, truth = planted
    base = baselines_of(X, y, genes, TARGET)
    # a "generator" that applies each source's mean shift, with planted departures
    P = np.stack(
        [np.clip(x + base.shifts.loc[c].to_numpy(), 0, 1) - x for x, c in zip(X, y, strict=True)]
    ).astype(np.float32)
    src = "type-01"
    rows = y == src
    shift = base.shifts.loc[src].to_numpy()
    # A: a gene neither baseline moves up for type-01 (mean shift < 0), raised by +0.6
    flat = [i for i in np.argsort(shift) if genes[i] not in truth["up"][src]]
    a = flat[0]
    P[rows, a] = np.clip(X[rows, a] + 0.6, 0, 1) - X[rows, a]
    # B: the target's strongest planted up gene, pushed down instead
    b = genes.index(de_ranked(base.de_by_source[src])["up"][0])
    P[rows, b] = -X[rows, b]
    # type-04: gene-wise random moves, so the three rankings disagree in every way
    rng = np.random.default_rng(0)
    rows4 = y == "type-04"
    P[rows4] = rng.normal(0, 0.2, len(genes)) + rng.normal(0, 0.02, (rows4.sum(), len(genes)))
    # ... and a DE that disagrees with the mean shift (on the planted data the two agree)
    # (its 10 first genes per direction kept, the others' scores shuffled)
    de4 = base.de_by_source["type-04"].copy()
    score = de4["score"].to_numpy().copy()
    score[10:-10] = rng.permutation(score[10:-10])
    de4["score"] = score
    base.de_by_source["type-04"] = de4.sort_values("score", ascending=False, ignore_index=True)
    pred = np.where(np.arange(len(y)) % 5 == 0, "type-02", TARGET)
    # the selection: every non-target sample, but only one of type-03
    one = np.flatnonzero(y == "type-03")[0]
    keep = (y != TARGET) & ((y != "type-03") | (np.arange(len(y)) == one))
    labels = y[keep].copy()
    labels[np.flatnonzero(labels == "type-02")[:2]] = "novel"  # a class never trained on
    k = 20
    cmp = source_comparison(
        P[keep], X[keep], labels, genes, base, target=TARGET, k=k, pred_after=pred[keep]
    )
    assert list(cmp.sources.columns) == SOURCE_COLUMNS and list(cmp.genes.columns) == GENE_COLUMNS
    assert cmp.far == far_rank(k) == 50 and far_rank(40) == 100
    rows_by = {r["source"]: r for r in cmp.sources.to_dict(orient="records")}
    assert sorted(rows_by) == ["novel", "type-01", "type-02", "type-03", "type-04"]
    assert (
        rows_by["type-03"]["n"] == 1 and rows_by["type-03"]["status"] == "too few samples (1 < 2)"
    )
    assert rows_by["type-03"]["de_up"] is None or np.isnan(rows_by["type-03"]["de_up"])
    assert rows_by["novel"]["status"] == "no baseline: 0 training samples (needs 2)"
    assert set(cmp.genes["source"]) == {"type-01", "type-02", "type-04"}  # none for the flagged
    for s in ("type-01", "type-02", "type-04"):
        r = rows_by[s]
        assert r["status"] == "ok" and r["n"] == int((labels == s).sum())
        assert r["accuracy"] == pytest.approx(np.mean(pred[keep][labels == s] == TARGET))
        direct = _direct(P[keep], X[keep], labels, s, base, genes, k)
        g = cmp.genes[cmp.genes["source"] == s]
        for d in ("up", "down"):
            only_t, only_b, top = direct[d]
            mine = g[g["direction"] == d]
            assert set(mine.loc[mine["list"] == "tspg", "gene"]) == top
            assert set(mine.loc[mine["tspg_only"], "gene"]) == only_t
            assert set(mine.loc[mine["list"] == "baselines", "gene"]) == only_b
            assert r[f"tspg_only_{d}"] == len(only_t) and r[f"baseline_only_{d}"] == len(only_b)
            if s == "type-04":  # the random moves make every kind of gene
                beyond_one = mine[
                    (mine["list"] == "tspg") & ((mine["de_rank"] > 50) != (mine["ms_rank"] > 50))
                ]
                assert len(only_t) and len(only_b) and len(beyond_one), d
                # DE top k but not MS top k, beyond in TSPG: not baseline-only
                de_k = set(de_ranked(base.de_by_source[s])[d][:k])
                assert de_k - only_b - top, d
            de_top = set(de_ranked(base.de_by_source[s])[d][:k])
            assert r[f"de_{d}"] == len(top & de_top)
    g1 = cmp.genes[cmp.genes["source"] == src].set_index(["direction", "gene"])
    # the planted departures are picked out, with their flags
    a_row = g1.loc[("up", genes[a])]
    assert a_row["tspg_only"] and a_row["against_source"] and a_row["list"] == "tspg"
    assert "TSPG only" in a_row["flags"] and "against the source's direction" in a_row["flags"]
    b_row = g1.loc[("up", genes[b])]
    assert b_row["baseline_only"] and b_row["list"] == "baselines" and b_row["de_rank"] == 1
    assert b_row["mean_P"] < 0 and "baselines only" in b_row["flags"]
    # the flags of every row, computed directly
    for (_d, gene), rec in g1.iterrows():
        j = genes.index(gene)
        mean_P = P[keep][labels == src, j].astype(np.float64).mean()
        x_adv = (X[keep][labels == src, j] + P[keep][labels == src, j]).astype(np.float64).mean()
        assert rec["mean_P"] == pytest.approx(mean_P, abs=1e-6)
        assert rec["against_source"] == bool(mean_P * shift[j] < 0)
        assert rec["beyond_target"] == bool(
            abs(x_adv - base.target_mean[j]) > base.target_sd[j] + 1e-9
        )
    # the mean shift itself is never TSPG-only against itself (type-02 was left as it is)
    assert rows_by["type-02"]["tspg_only_up"] == rows_by["type-02"]["tspg_only_down"] == 0
    assert rows_by["type-02"]["ms_up"] == rows_by["type-02"]["ms_down"] == k
    # the readable tables
    table = source_table(cmp.sources)
    assert table.loc[table["source"] == "type-03", "TSPG∩DE up/down"].item() == ""
    assert table.loc[table["source"] == "type-02", "TSPG∩MS up/down"].item() == f"{k} / {k}"
    row, tspg, base_only = cmp.source(src)
    assert len(gene_table(tspg)) == 2 * k and gene_table(base_only)["gene"].tolist()
    d = cmp.to_dict()
    json.dumps(d, allow_nan=False)  # plain JSON, NaN as None
    assert d["sources"][-2]["source"] == "type-03" and d["sources"][-2]["de_up"] is None
    assert d["sources"][0]["source"] == "novel" and d["sources"][0]["ms_up"] is None


def test_evaluate_by_source_json_text_and_a_too_small_source(quick_bundle, tmp_path, capsys):
    adata = make_tiny_adata()
    # leave 'gamma' one held-out sample: the others are relabelled 'alpha' (training untouched)
    held = [s for s in quick_bundle.split["test"] if adata.obs.loc[s, "cell_type"] == "gamma"]
    assert len(held) >= 3
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[held[1:], "cell_type"] = "alpha"
    path = tmp_path / "tiny.h5ad"
    adata.write_h5ad(path)
    js = tmp_path / "metrics.json"
    argv = ["evaluate", str(quick_bundle.path), str(path), "--k", "5", "--json", str(js)]
    assert main([*argv, "--genes"]) == 0
    text = capsys.readouterr().out
    assert "by source class" in text and "too few samples (1 < 2)" in text
    assert "alpha: TSPG's top 5 genes" in text and "gamma: TSPG" not in text
    assert "differential expression (target vs rest) up top-5" in text
    res = json.loads(js.read_text())
    bs = res["by_source"]
    assert bs["k"] == 5 and bs["far"] == 50 and bs["min_samples"] == 2
    src = {r["source"]: r for r in bs["sources"]}
    assert set(src) == {"alpha", "gamma"}
    assert src["gamma"]["n"] == 1 and src["gamma"]["de_up"] is None
    n_alpha = int(adata.obs.loc[quick_bundle.split["test"], "cell_type"].eq("alpha").sum())
    assert src["alpha"]["status"] == "ok" and src["alpha"]["n"] == n_alpha
    assert src["alpha"]["accuracy"] == pytest.approx(
        res["perturbation_accuracy"]["by_source"]["alpha"]["accuracy"]
    )
    genes = [g for g in bs["genes"] if g["source"] == "alpha" and g["list"] == "tspg"]
    up = [g["gene"] for g in sorted(genes, key=lambda g: g["tspg_rank"]) if g["direction"] == "up"]
    assert len(up) == 5 and set(genes[0]) == set(GENE_COLUMNS)
    # alpha's top genes by mean P over alpha's held-out samples: beta's block G05..G09 up
    assert len(set(up) & {f"G{j:02d}" for j in range(5, 10)}) >= 3
    # without --genes, the table only
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "by source class" in out and "alpha: TSPG's top 5 genes" not in out


def test_a_seed_ensemble_carries_its_support(planted):
    from tspg.ranking import member_support

    X, y, genes, _ = planted
    base = baselines_of(X, y, genes, TARGET, max_per_class=40)
    assert max(base.n_train.values()) == 40  # the per-class bound
    rng = np.random.default_rng(1)
    ms = np.stack(
        [np.clip(x + base.shifts.loc[c].to_numpy(), 0, 1) - x for x, c in zip(X, y, strict=True)]
    )
    members = np.stack([ms + rng.normal(0, 0.05, ms.shape) for _ in range(3)]).astype(np.float32)
    keep = y != TARGET
    cmp = source_comparison(
        members.mean(0)[keep],
        X[keep],
        y[keep],
        genes,
        base,
        target=TARGET,
        k=10,
        members=members[:, keep],
    )
    rows = y[keep] == "type-01"
    support = member_support(members[:, keep][:, rows], k=10)
    _, tspg, only_b = cmp.source("type-01")
    for d in ("up", "down"):
        mine = tspg[tspg["direction"] == d]
        expected = [int(support[d][genes.index(g)]) for g in mine["gene"]]
        assert mine["support"].tolist() == expected and set(mine["n_members"]) == {3}
    assert only_b["support"].isna().all()  # only TSPG's own genes carry it
    shown = gene_table(tspg)["support"]
    assert shown.str.fullmatch(r"[0-3]/3").all() and (shown == "3/3").any()
    with pytest.raises(ValueError, match="members have shape"):
        source_comparison(
            members.mean(0)[keep], X[keep], y[keep], genes, base, target=TARGET, members=members
        )
