"""Tests for tspg.enrichment: Enrichr through gseapy against a local fake server, offline GMT."""

from __future__ import annotations

import logging
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
    offline_gmt_files,
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
    monkeypatch.delenv("TSPG_ENRICHR_URL", raising=False)
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
    res = enrich(
        QUERY, background=BACKGROUND, backend="enrichr", url=server.url, cache_dir=tmp_path
    )
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
        res = enrich(
            QUERY, background=BACKGROUND, backend="enrichr", url=fake.url, cache_dir=tmp_path
        )
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
        res = enrich(
            QUERY,
            background=BACKGROUND,
            backend="auto",
            url=url,
            timeout=timeout,
            retries=1,
            cache_dir=tmp_path,
        )
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
            enrich(
                QUERY,
                background=None,
                backend="enrichr",
                url=url,
                timeout=timeout,
                cache_dir=tmp_path / "other",
            )


def test_enrichr_url_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TSPG_ENRICHR_URL", server.url)
    res = enrich(QUERY, background=None, backend="enrichr", cache_dir=tmp_path / "a")
    assert (
        res.backend == "enrichr" and res.table.iloc[0]["term"] == "Classical Monocyte Blood Human"
    )
    assert server.count > 0 and server.lists  # the list went to the server named by the variable
    # an explicit url wins over the variable
    monkeypatch.setenv("TSPG_ENRICHR_URL", closed_port_url())
    n = server.count
    again = enrich(
        QUERY, background=None, backend="enrichr", url=server.url, cache_dir=tmp_path / "b"
    )
    assert again.backend == "enrichr" and server.count > n
    with pytest.raises(EnrichrError, match="could not be reached"):
        enrich(QUERY, background=None, backend="enrichr", timeout=2, cache_dir=tmp_path / "c")


def test_fallback_is_logged_once_and_urllib3_retries_are_quiet(tmp_path, caplog):
    pool = logging.getLogger("urllib3.connectionpool")
    level = pool.level
    with caplog.at_level(logging.DEBUG):
        df = enrich_directions(
            QUERY,
            ["CD3D"],
            background=BACKGROUND + ["CD3D"],
            url=closed_port_url(),
            timeout=2.0,
            retries=2,
            cache_dir=tmp_path,
        )
    assert df.attrs["backend"] == {"up": "offline", "down": "offline"}
    assert caplog.text.count("Enrichr could not be used") == 1  # once per call, not per direction
    assert "could not be reached" in df.attrs["messages"]["down"]  # each direction still says why
    assert not [
        r for r in caplog.records if r.name.startswith("urllib3") and r.levelno >= logging.WARNING
    ]
    assert pool.level == level
    # urllib3's warnings from other threads still get through
    with caplog.at_level(logging.WARNING):
        pool.warning("Retrying (test) from another thread")
    assert "Retrying (test)" in caplog.text


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
    res = enrich(
        query,
        background=background,
        gmt_files=[gmt],
        backend="offline",
        cache_dir=tmp_path / "cache",
        threshold=0.05,
    )
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


def test_offline_correction_over_all_sets_by_hand(tmp_path):
    background = [f"G{i}" for i in range(1, 21)]
    sets = {
        "A": ["G1", "G2", "G3", "G4", "G5"],
        "B": ["G4", "G5", "G6", "G7", "G8"],
        "C": ["G11", "G12", "G13"],
        "D": ["G15", "G16"],  # shares no gene with the list, but is tested
        "E": ["X1", "X2"],  # no gene in the background: cannot be tested
    }
    gmt = _write_gmt(tmp_path / "tiny.gmt", sets)
    query = ["G1", "G2", "G3", "G4", "G11"]
    kw = dict(
        background=background, gmt_files=[gmt], backend="offline", cache_dir=tmp_path / "cache"
    )
    hits = enrich(query, **kw).table.set_index("term")
    every = enrich(query, correct_over="all", **kw).table.set_index("term")
    assert set(hits.index) == set(every.index) == {"A", "B", "C"}  # the same rows, the same p
    pd.testing.assert_series_equal(hits["p"], every.loc[hits.index, "p"])
    p = list(hits.loc[["A", "B", "C"], "p"])
    for table, tests in ((hits, p), (every, p + [1.0])):  # "all": D counts as a 4th test, E not
        np.testing.assert_allclose(
            table.loc[["A", "B", "C"], "q"], _bh_by_hand(tests)[:3], rtol=1e-12
        )
    assert (every["q"] >= hits.loc[every.index, "q"]).all()
    message = enrich(query, correct_over="all", **kw).message
    assert "every gene set with a gene in the background" in message and "4 in tiny" in message
    assert "terms sharing a gene with the list" in enrich(query, **kw).message
    with pytest.raises(ValueError, match="correct_over='all' needs backend='offline'"):
        enrich(query, background=background, correct_over="all", backend="auto")
    with pytest.raises(ValueError, match="correct_over"):
        enrich(query, correct_over="every", **kw)


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
    third = enrich(
        QUERY, background=BACKGROUND + ["G99"], backend="offline", cache_dir=tmp_path / "c"
    )
    assert not third.from_cache


def test_enrich_directions_offline(tmp_path):
    df = enrich_directions(
        QUERY[:5],
        ["CD3D", "CD3E", "IL7R"],
        background=BACKGROUND + ["CD3D", "CD3E", "IL7R"],
        backend="offline",
        cache_dir=tmp_path,
    )
    assert list(df.columns) == ["direction", *COLUMNS]
    assert set(df["direction"]) == {"up", "down"}
    assert df[df["direction"] == "up"].iloc[0]["term"] == "CD14_Monocyte"
    assert set(df.attrs["messages"]) == {"up", "down"} and df.attrs["backend"]["down"] == "offline"
    only_up = enrich_directions(
        QUERY, [], background=BACKGROUND, backend="offline", cache_dir=tmp_path
    )
    assert set(only_up["direction"]) == {"up"} and "No down" in only_up.attrs["messages"]["down"]


def test_enrich_directions_skips_enrichr_after_a_failure(tmp_path):
    with FakeEnrichr("slow", delay=6.0) as fake:
        start = time.monotonic()
        df = enrich_directions(
            QUERY,
            ["CD3D"],
            background=BACKGROUND + ["CD3D"],
            url=fake.url,
            timeout=1.0,
            cache_dir=tmp_path,
        )
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
    sets = {
        f[0]: f[2:]
        for f in (line.split("\t") for line in lines if line and not line.startswith("#"))
    }
    assert 12 <= len(sets) <= 16
    assert all(10 <= len(genes) <= 25 for genes in sets.values())
    demo = set(pbmc.raw.var_names)
    for name in [
        "CD14_Monocyte",
        "FCGR3A_Monocyte",
        "B_cell",
        "NK_cell",
        "CD8_T",
        "Dendritic_cell",
    ]:
        assert len(set(sets[name]) & demo) >= 8, name


@pytest.fixture(scope="module")
def demo_bundle():
    """The demo generator exactly as ``tspg-train --demo`` trains it (seeded; ~10 s on a CPU)."""
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo
    from tspg.pipeline import train

    adata = demo()
    return train(
        adata, label_key=DEMO_LABEL_KEY, target=DEMO_TARGET, device="cpu", dataset="pbmc68k_reduced"
    ), adata


def test_demo_generator_up_genes_rank_a_monocyte_set_first(demo_bundle, tmp_path):
    """The generator's consensus top-20 up genes, as ``tspg enrich`` and the Enrichment page
    compute them (held-out non-target samples), against the bundled marker sets.

    In pbmc68k_reduced the bulk label "CD14+ Monocyte" marks cells that express FCGR3A
    (96% of them), LST1 and AIF1 highly, while the classical markers LYZ, CST3, MNDA and
    LGALS2 are higher in the cells labelled "Dendritic". Moving the other classes into the
    target therefore raises non-classical (CD16+) monocyte markers (AIF1, LST1, FCGR3A,
    C1QA, IFITM3, RHOC) next to pan-monocyte genes (TYROBP, FCER1G, CTSS, FCN1): both
    monocyte sets are enriched (FCGR3A_Monocyte ahead of CD14_Monocyte when trained), and no
    lymphoid or other set is.
    """
    from tspg.datasets import DEMO_TARGET
    from tspg.genesets import read_gene_sets
    from tspg.perturbation import consensus_top, perturb_adata

    bundle, adata = demo_bundle
    held_out = adata[bundle.split["test"]]
    sources = held_out[held_out.obs[bundle.label_key].astype(str) != DEMO_TARGET]
    up = consensus_top(perturb_adata(sources, bundle).P, bundle.genes, k=20)["up"]
    assert len(up) == 20

    res = enrich(up, background=bundle.genes, backend="offline", cache_dir=tmp_path)
    table = res.table.set_index("term")
    monocyte = {"CD14_Monocyte", "FCGR3A_Monocyte"}
    assert res.table.iloc[0]["term"] in monocyte
    assert (
        res.table.iloc[0]["q"] < 1e-4 and res.table.iloc[0]["significant"]
    )  # the default threshold
    assert set(res.table.loc[res.table["significant"], "term"]) <= monocyte
    lymphoid = ["B_cell", "Plasma_cell", "NK_cell", "CD8_T", "CD4_T_naive", "CD4_T_memory", "Treg"]
    assert (
        not table.reindex(lymphoid)["q"].lt(0.05).any()
    )  # absent (no shared gene) or far from significant
    # the reported overlap is the list's genes in the set (and in the background)
    sets = read_gene_sets(MARKER_GMT)
    for term in monocyte & set(table.index):
        shared = set(up) & set(sets[term]) & set(bundle.genes)
        assert set(table.loc[term, "genes"].split(";")) == shared and table.loc[
            term, "n_overlap"
        ] == len(shared)


def test_offline_gmt_files_for_a_bundle(demo_bundle, tmp_path, monkeypatch):
    from tspg.bundle import Bundle
    from tspg.genesets import select_genes

    trained, _ = demo_bundle
    genes = trained.genes

    def bundle_with(selection):
        info = {"name": selection.name, "source": selection.source}
        return Bundle(
            {**trained.manifest, "gene_set": info},
            trained.generator,
            trained.discriminator,
            trained.target_model,
        )

    gmt = _write_gmt(
        tmp_path / "immune.gmt", {"MONO": ["LYZ", "CST3", "FCN1"], "NK": ["NKG7", "GNLY", "GZMB"]}
    )
    ref_list = tmp_path / "example.genesets.txt"  # the reference implementation's list format
    ref_list.write_text("mono-set\tLYZ\tCST3\tFCN1\nnk-set\tNKG7\tGNLY\n")
    plain = tmp_path / "mine.txt"  # a plain --genes list, not a gene-set file
    plain.write_text("LYZ\nCST3\nNKG7\n")
    extra = _write_gmt(tmp_path / "extra.gmt", {"X": ["LYZ"]})
    folder = tmp_path / "gmts"
    folder.mkdir()
    env_b, env_a = (
        _write_gmt(folder / "b.gmt", {"B": ["CD79A"]}),
        _write_gmt(folder / "a.gmt", {"A": ["CD3D"]}),
    )
    (folder / "notes.txt").write_text("not a GMT\n")

    gmt_bundle = bundle_with(select_genes(genes, gene_set=f"{gmt}:MONO"))
    assert offline_gmt_files(gmt_bundle) == [MARKER_GMT, gmt]
    monkeypatch.setenv("TSPG_GMT_DIR", str(folder))
    assert offline_gmt_files(gmt_bundle, extra=[extra]) == [MARKER_GMT, gmt, env_a, env_b, extra]
    assert offline_gmt_files(None) == offline_gmt_files() == [MARKER_GMT, env_a, env_b]
    monkeypatch.delenv("TSPG_GMT_DIR")
    assert offline_gmt_files(bundle_with(select_genes(genes, gene_set=f"{ref_list}:nk-set"))) == [
        MARKER_GMT,
        ref_list,
    ]
    # not gene-set files of the bundle: a plain gene list, all genes, the bundled demo
    assert offline_gmt_files(bundle_with(select_genes(genes, genes_file=plain))) == [MARKER_GMT]
    assert offline_gmt_files(bundle_with(select_genes(genes))) == [MARKER_GMT]
    assert offline_gmt_files(trained) == [MARKER_GMT]

    # the offline backend reads the bundle's own file, under its stem
    files = offline_gmt_files(gmt_bundle)
    res = enrich(
        ["LYZ", "CST3", "FCN1", "S100A9"],
        background=genes,
        gmt_files=files,
        backend="offline",
        cache_dir=tmp_path / "cache",
    )
    assert "immune.gmt" in res.message and "blood_markers.gmt" in res.message
    mono = res.table[(res.table["library"] == "immune") & (res.table["term"] == "MONO")].iloc[0]
    assert mono["overlap"] == "3/3"
    # the same file twice (e.g. the bundle's file is also in TSPG_GMT_DIR) is read once
    twice = enrich(
        ["LYZ", "CST3"],
        background=genes,
        gmt_files=files + [gmt],
        backend="offline",
        cache_dir=tmp_path / "cache",
    )
    assert (twice.table["library"] == "immune").sum() == 1
    copy = folder / "immune.gmt"  # a copy with the same name: read once; a different file: an error
    copy.write_bytes(gmt.read_bytes())
    enrich(
        ["LYZ"],
        background=genes,
        gmt_files=files + [copy],
        backend="offline",
        cache_dir=tmp_path / "cache",
    )
    copy.write_text("MONO\tdesc\tLYZ\n")
    with pytest.raises(ValueError, match="both be called 'immune'"):
        enrich(
            ["LYZ"],
            background=genes,
            gmt_files=files + [copy],
            backend="offline",
            cache_dir=tmp_path / "cache",
        )

    # a file that moved, or no longer holds the set, is left out
    gmt.write_text("OTHER\tdesc\tLYZ\n")
    assert offline_gmt_files(gmt_bundle) == [MARKER_GMT]
    gmt.unlink()
    assert offline_gmt_files(gmt_bundle) == [MARKER_GMT]
