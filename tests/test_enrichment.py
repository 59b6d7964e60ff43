"""Tests for tspg.enrichment: Enrichr through gseapy against a local fake server, offline GMT."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy.stats import hypergeom

from tspg.enrichment import (
    COLUMNS,
    DEFAULT_LIBRARIES,
    MARKER_GMT,
    EnrichmentResult,
    EnrichrError,
    enrich,
    enrich_directions,
)

try:
    from tests.enrichr_server import ROWS, FakeEnrichr, closed_port_url
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from enrichr_server import ROWS, FakeEnrichr, closed_port_url

QUERY = ["LYZ", "S100A8", "S100A9", "CST3", "FCN1", "TYROBP", "FCER1G", "CD14"]
BACKGROUND = QUERY + [f"G{i}" for i in range(40)]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No real network or real cache: proxies bypassed for 127.0.0.1, TSPG_* unset."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("TSPG_GMT_DIR", raising=False)
    monkeypatch.setenv("TSPG_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture
def server():
    with FakeEnrichr("ok") as fake:
        yield fake


def _write_gmt(path, sets, header="# test gene sets\t(comment with\ttabs)\n"):
    path.write_text(header + "".join(f"{k}\tdesc\t" + "\t".join(v) + "\n" for k, v in sets.items()))
    return path


def _bh_by_hand(p):
    """Benjamini-Hochberg written out the textbook way: q_(i) = min_{j>=i} p_(j) n / j."""
    p = list(p)
    n = len(p)
    order = sorted(range(n), key=lambda i: p[i])
    q = [0.0] * n
    for rank, i in enumerate(order, start=1):
        q[i] = min(min(p[j] * n / r for r, j in enumerate(order, start=1) if r >= rank), 1.0)
    return q


# --------------------------------------------------------------------------------------
# online: the real gseapy client against the local server
# --------------------------------------------------------------------------------------


def test_enrichr_ok_table_and_bh(server, tmp_path):
    res = enrich(QUERY, background=BACKGROUND, backend="enrichr", url=server.url, cache_dir=tmp_path)
    assert isinstance(res, EnrichmentResult)
    assert res.backend == "enrichr" and not res.from_cache
    assert tuple(res.table.columns) == COLUMNS
    assert set(res.table["library"]) == set(DEFAULT_LIBRARIES)
    assert len(res.table) == sum(len(rows) for rows in ROWS.values())
    top = res.table.iloc[0]
    assert top["term"] == "Classical Monocyte Blood Human"
    assert top["overlap"] == "6/120" and top["n_overlap"] == 6
    assert top["genes"] == ";".join(QUERY[:6])
    assert (res.table["backend"] == "enrichr").all()
    # q is recomputed per library with Benjamini-Hochberg, not copied from the server
    for lib, rows in ROWS.items():
        sub = res.table[res.table["library"] == lib].set_index("term")
        terms = [r[0] for r in rows]
        expected = _bh_by_hand([r[2] for r in rows])
        np.testing.assert_allclose(sub.loc[terms, "q"], expected, rtol=1e-12)
    assert list(res.table["significant"]) == list(res.table["q"] < 1e-4)
    assert res.table["q"].is_monotonic_increasing
    # the gseapy client went to our server: libraries, list upload, one export per library
    paths = [p for _, p in server.requests]
    assert paths[:2] == ["/Enrichr/datasetStatistics", "/Enrichr/addList"]
    assert paths.count("/Enrichr/export") == len(DEFAULT_LIBRARIES)


def test_enrichr_no_hits_is_an_empty_table(tmp_path):
    with FakeEnrichr("nohits") as fake:
        res = enrich(QUERY, background=BACKGROUND, backend="enrichr", url=fake.url, cache_dir=tmp_path)
    assert res.backend == "enrichr"
    assert res.table.empty and tuple(res.table.columns) == COLUMNS


def test_cache_hit_needs_no_request_and_survives_server_failure(server, tmp_path):
    kw = dict(background=BACKGROUND, url=server.url, cache_dir=tmp_path, timeout=2)
    first = enrich(QUERY, backend="enrichr", **kw)
    n = server.count
    second = enrich(list(reversed(QUERY)), backend="enrichr", **kw)  # order does not matter
    assert second.from_cache and not first.from_cache
    assert server.count == n  # no new request
    pd.testing.assert_frame_equal(first.table, second.table)
    assert list(tmp_path.glob("*.csv")) and not list(tmp_path.glob("*.pkl"))
    # the server breaks: "auto" still answers with the cached Enrichr result
    server.mode = "http500"
    third = enrich(QUERY, backend="auto", **kw)
    assert third.backend == "enrichr" and third.from_cache
    assert server.count == n


FAILURES = {
    # mode: words the message must contain
    "slow": "within 1 s",
    "http500": "500",
    "bad_json": "could not be read",
    "garbage_export": "could not be read",
    "refused": "could not be reached",
}


@pytest.mark.parametrize("mode", list(FAILURES))
def test_enrichr_failure_falls_back_offline_in_time(mode, tmp_path, caplog):
    timeout = 1.0
    with FakeEnrichr("ok" if mode == "refused" else mode, delay=6.0) as fake:
        url = closed_port_url() if mode == "refused" else fake.url
        start = time.monotonic()
        res = enrich(QUERY, background=BACKGROUND, backend="auto", url=url, timeout=timeout,
                     retries=1, cache_dir=tmp_path)
        elapsed = time.monotonic() - start
        assert elapsed < timeout + 2
        assert res.backend == "offline" and not res.from_cache
        assert FAILURES[mode] in res.message and "blood_markers.gmt" in res.message
        assert "Enrichr could not be used" in caplog.text
        assert res.table.iloc[0]["term"] == "CD14_Monocyte"
        assert (res.table["backend"] == "offline").all()
        if mode == "http500":
            assert fake.count == 2  # bounded retries: one request plus one retry
        with pytest.raises(EnrichrError, match=FAILURES[mode].split()[0]):
            enrich(QUERY, background=None, backend="enrichr", url=url, timeout=timeout,
                   cache_dir=tmp_path / "other")


# --------------------------------------------------------------------------------------
# offline: gseapy.enrich on GMT files, checked by hand
# --------------------------------------------------------------------------------------


def test_offline_hypergeometric_and_bh_by_hand(tmp_path):
    background = [f"G{i}" for i in range(1, 21)]  # N = 20
    sets = {
        "A": ["G1", "G2", "G3", "G4", "G5"],
        "B": ["G4", "G5", "G6", "G7", "G8", "G9", "G10", "X1"],  # X1 is outside the background
        "C": ["G11", "G12", "G13"],
        "D": ["G15", "G16"],  # no overlap: not reported
    }
    gmt = _write_gmt(tmp_path / "tiny.gmt", sets)
    query = ["G1", "G2", "G3", "G4", "G11", "NOT_IN_BACKGROUND"]  # k = 5 after the background
    res = enrich(query, background=background, gmt_files=[gmt], backend="offline",
                 cache_dir=tmp_path / "cache", threshold=0.05)
    table = res.table[res.table["library"] == "tiny"].set_index("term")
    assert set(table.index) == {"A", "B", "C"}
    assert table.loc["A", "overlap"] == "4/5"
    assert table.loc["B", "overlap"] == "1/7"  # only G4; X1 is not counted
    p = {
        "A": hypergeom.sf(4 - 1, 20, 5, 5),
        "B": hypergeom.sf(1 - 1, 20, 7, 5),
        "C": hypergeom.sf(1 - 1, 20, 3, 5),
    }
    for term, value in p.items():
        assert table.loc[term, "p"] == pytest.approx(value, rel=1e-9)
    q = dict(zip(p, _bh_by_hand(list(p.values())), strict=True))
    for term, value in q.items():
        assert table.loc[term, "q"] == pytest.approx(value, rel=1e-9)
    assert bool(table.loc["A", "significant"]) == (q["A"] < 0.05)
    assert res.backend == "offline" and "tiny.gmt" in res.message
    assert set(res.table["library"]) <= {"tiny", "blood_markers"}


def test_offline_libraries_from_env_dir_and_cache(tmp_path, monkeypatch):
    folder = tmp_path / "gmts"
    folder.mkdir()
    _write_gmt(folder / "extra.gmt", {"MONO": QUERY[:4]})
    monkeypatch.setenv("TSPG_GMT_DIR", str(folder))
    first = enrich(QUERY, background=BACKGROUND, backend="offline", cache_dir=tmp_path / "c")
    assert "extra" in set(first.table["library"]) and "blood_markers" in set(first.table["library"])
    second = enrich(QUERY, background=BACKGROUND, backend="offline", cache_dir=tmp_path / "c")
    assert second.from_cache and not first.from_cache
    pd.testing.assert_frame_equal(first.table, second.table)
    # a different background is a different question
    third = enrich(QUERY, background=BACKGROUND + ["G99"], backend="offline", cache_dir=tmp_path / "c")
    assert not third.from_cache


def test_enrich_directions_offline(tmp_path):
    df = enrich_directions(QUERY[:5], ["CD3D", "CD3E", "IL7R"], background=BACKGROUND + ["CD3D", "CD3E", "IL7R"],
                           backend="offline", cache_dir=tmp_path)
    assert list(df.columns) == ["direction", *COLUMNS]
    assert set(df["direction"]) == {"up", "down"}
    assert df[df["direction"] == "up"].iloc[0]["term"] == "CD14_Monocyte"
    assert set(df.attrs["messages"]) == {"up", "down"} and df.attrs["backend"]["down"] == "offline"
    only_up = enrich_directions(QUERY, [], background=BACKGROUND, backend="offline", cache_dir=tmp_path)
    assert set(only_up["direction"]) == {"up"} and "No down" in only_up.attrs["messages"]["down"]


def test_enrich_directions_skips_enrichr_after_a_failure(tmp_path):
    with FakeEnrichr("slow", delay=6.0) as fake:
        start = time.monotonic()
        df = enrich_directions(QUERY, ["CD3D"], background=BACKGROUND + ["CD3D"], url=fake.url,
                               timeout=1.0, cache_dir=tmp_path)
        assert time.monotonic() - start < 1.0 + 2  # one timeout, not two
    assert df.attrs["backend"] == {"up": "offline", "down": "offline"}


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_value_error(tmp_path):
    kw = dict(background=BACKGROUND, backend="offline", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        enrich([], **kw)
    with pytest.raises(ValueError, match="empty"):
        enrich(["  ", ""], **kw)
    with pytest.raises(ValueError, match="single string"):
        enrich("LYZ", **kw)
    with pytest.raises(ValueError, match="background"):
        enrich(QUERY, background=[], backend="offline", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="backend"):
        enrich(QUERY, background=BACKGROUND, backend="online")
    missing = tmp_path / "nope.gmt"
    with pytest.raises(ValueError, match="nope.gmt"):
        enrich(QUERY, gmt_files=[missing], **kw)
    bad = tmp_path / "bad.gmt"
    bad.write_text("# header\nOK\tdesc\tLYZ\tCD14\nBROKEN LINE WITHOUT TABS\n")
    with pytest.raises(ValueError, match=r"bad\.gmt, line 3"):
        enrich(QUERY, gmt_files=[bad], **kw)


# --------------------------------------------------------------------------------------
# the bundled marker sets on the demo data
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pbmc():
    sc = pytest.importorskip("scanpy")
    return sc.datasets.pbmc68k_reduced()


def test_marker_gmt_is_well_formed_and_covers_the_demo_genes(pbmc):
    lines = MARKER_GMT.read_text().splitlines()
    assert lines[0].startswith("#") and "Seurat" in "\n".join(lines[:10])
    sets = {f[0]: f[2:] for f in (line.split("\t") for line in lines if line and not line.startswith("#"))}
    assert 12 <= len(sets) <= 16
    assert all(10 <= len(genes) <= 25 for genes in sets.values())
    demo = set(pbmc.raw.var_names)
    for name in ["CD14_Monocyte", "FCGR3A_Monocyte", "B_cell", "NK_cell", "CD8_T", "Dendritic_cell"]:
        assert len(set(sets[name]) & demo) >= 8, name


def test_demo_monocyte_top20_ranks_a_monocyte_set_first(pbmc, tmp_path):
    """Stand-in for the generator's consensus list: top-20 genes by mean difference."""
    raw = pbmc.raw
    x = raw.X.toarray() if hasattr(raw.X, "toarray") else np.asarray(raw.X)
    is_mono = (pbmc.obs["bulk_labels"] == "CD14+ Monocyte").to_numpy()
    diff = x[is_mono].mean(0) - x[~is_mono].mean(0)
    top20 = list(raw.var_names[np.argsort(-diff)[:20]])
    background = list(raw.var_names)
    res = enrich(top20, background=background, backend="offline", cache_dir=tmp_path)
    table = res.table
    # The bulk "CD14+ Monocyte" label of pbmc68k is dominated by FCGR3A, AIF1, LST1, IFITM3,
    # C1QA (non-classical markers), so both monocyte sets lead; nothing else is close.
    assert set(table["term"].iloc[:2]) == {"CD14_Monocyte", "FCGR3A_Monocyte"}
    assert table["significant"].iloc[:2].all()
    assert not table["significant"].iloc[2:].any()
    # a classical-monocyte list like the generator's (LYZ, S100A8/9, CST3, FCN1, ...)
    classical = ["LYZ", "S100A8", "S100A9", "CST3", "FCN1", "TYROBP", "FCER1G", "CTSS", "MNDA",
                 "LGALS2", "G0S2", "IL1B", "FTL", "PSAP", "CFD", "SPI1", "IFI30", "TIMP1", "NCF1", "CD33"]
    assert set(classical) <= set(background)
    res2 = enrich(classical, background=background, backend="offline", cache_dir=tmp_path)
    assert res2.table.iloc[0]["term"] == "CD14_Monocyte" and res2.table.iloc[0]["significant"]
