"""``tspg perturb``, ``tspg evaluate`` and ``tspg enrich`` through ``main([...])`` in tmp_path."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_adata
from scipy.stats import hypergeom

from tspg.cli import main
from tspg.perturbation import consensus_top, perturb_adata


@pytest.fixture
def tiny_h5ad(tmp_path):
    path = tmp_path / "tiny.h5ad"
    make_tiny_adata().write_h5ad(path)
    return path


def test_perturb_writes_h5ad(quick_bundle, tiny_h5ad, tmp_path, capsys):
    out = tmp_path / "perturbed.h5ad"
    assert (
        main(["perturb", str(quick_bundle.path), str(tiny_h5ad), "-o", str(out), "--k", "4"]) == 0
    )
    text = capsys.readouterr().out
    assert "towards 'beta'" in text and "all non-target" in text
    a = ad.read_h5ad(out)
    assert a.shape == (60, 30) and list(a.var_names) == quick_bundle.genes
    assert {"tspg_x", "tspg_perturbation", "tspg_perturbed"} <= set(a.layers)
    assert {"cell_type", "tspg_pred_before", "tspg_pred_after", "tspg_prob_target_after"} <= set(
        a.obs
    )
    uns = a.uns["tspg"]
    assert uns["params"]["k"] == 4 and uns["params"]["bundle"] == quick_bundle.name
    assert uns["top_genes"]["up"].shape == (60, 4) and uns["top_genes"]["down_P"].shape == (60, 4)
    P = a.layers["tspg_perturbation"]
    assert uns["top_genes"]["up"][0, 0] == quick_bundle.genes[int(np.argmax(P[0]))]
    assert set(uns["consensus"]) == {"gene", "direction", "count", "frequency", "mean_P"}
    np.testing.assert_allclose(a.layers["tspg_perturbed"], np.clip(a.layers["tspg_x"] + P, 0, 1))


def test_perturb_csv(quick_bundle, tmp_path, capsys):
    gem = make_tiny_adata(n_per_class=3)
    path = tmp_path / "gem.tsv"
    pd.DataFrame(gem.X, index=gem.obs_names, columns=gem.var_names).to_csv(path, sep="\t")
    labels = tmp_path / "labels.txt"
    gem.obs["cell_type"].to_csv(labels, sep="\t", header=False)
    out = tmp_path / "csv"
    assert (
        main(
            [
                "perturb",
                str(quick_bundle.path),
                str(path),
                "--labels",
                str(labels),
                "--csv",
                "-o",
                str(out),
                "--k",
                "3",
            ]
        )
        == 0
    )
    P = pd.read_csv(out / "perturbation.csv", index_col=0)
    assert P.shape == (9, 30) and list(P.columns) == quick_bundle.genes
    assert pd.read_csv(out / "perturbed.csv", index_col=0).shape == (9, 30)
    pred = pd.read_csv(out / "predictions.csv", index_col=0)
    assert pred["label"].tolist() == gem.obs["cell_type"].astype(str).tolist()
    top = pd.read_csv(out / "top_genes.csv")
    assert (
        list(top.columns) == ["sample", "direction", "rank", "gene", "P"] and len(top) == 9 * 2 * 3
    )
    assert set(pd.read_csv(out / "consensus.csv")["direction"]) == {"up", "down"}
    assert "all non-target" in capsys.readouterr().out


def test_evaluate_json(quick_bundle, tiny_h5ad, tmp_path, capsys):
    js = tmp_path / "metrics.json"
    assert (
        main(["evaluate", str(quick_bundle.path), str(tiny_h5ad), "--json", str(js), "--k", "5"])
        == 0
    )
    text = capsys.readouterr().out
    for words in (
        "perturbation accuracy by source",
        "energy distance",
        "spread ratio",
        "discriminator",
        "consensus top-5 up genes",
    ):
        assert words in text
    res = json.loads(js.read_text())
    assert res["bundle"]["name"] == quick_bundle.name and res["params"]["k"] == 5
    assert res["perturbation_accuracy"]["non_target"] == pytest.approx(
        quick_bundle.metrics["perturbation_accuracy_non_target"]
    )
    assert len(res["top_genes"]["consensus_up"]) == 5


def test_errors_exit_2_with_one_line(quick_bundle, tmp_path, capsys, monkeypatch):
    gem = make_tiny_adata()
    missing = tmp_path / "missing.h5ad"
    # 3 of 30 genes missing: more than the 5% that perturbing fills
    gem[:, [g for g in gem.var_names if g not in ("G07", "G08", "G09")]].copy().write_h5ad(missing)
    assert (
        main(["perturb", str(quick_bundle.path), str(missing), "-o", str(tmp_path / "o.h5ad")]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and "G07, G08, G09" in err and err.count("\n") == 1
    assert "3 of the model's 30 genes are missing" in err
    monkeypatch.setenv("TSPG_MODELS_DIR", str(tmp_path))
    assert main(["evaluate", "no-such-bundle"]) == 2
    assert "no bundle 'no-such-bundle'" in capsys.readouterr().err
    assert main(["evaluate", str(quick_bundle.path)]) == 2  # not the demo: DATA is needed
    assert "give that data file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["perturb", str(quick_bundle.path), str(missing), "-o", str(tmp_path / "o.txt")])
    assert exc.value.code == 2


def test_enrich_offline(quick_bundle, tiny_h5ad, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TSPG_CACHE_DIR", str(tmp_path / "cache"))
    gmt = tmp_path / "blocks.gmt"
    gmt.write_text(
        "beta_block\tna\t" + "\t".join(f"G{j:02d}" for j in range(5, 10)) + "\n"
        "alpha_block\tna\t" + "\t".join(f"G{j:02d}" for j in range(0, 5)) + "\n"
    )
    out = tmp_path / "enrich.csv"
    code = main(
        [
            "enrich",
            str(quick_bundle.path),
            str(tiny_h5ad),
            "--offline",
            "--gmt",
            str(gmt),
            "--k",
            "5",
            "--direction",
            "up",
            "--threshold",
            "0.05",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "up: backend offline" in text and "held-out non-target samples" in text
    table = pd.read_csv(out)
    assert set(table["direction"]) == {"up"}
    # the consensus top-5 up genes of the held-out non-target samples, computed here
    adata = make_tiny_adata()
    held_out = adata[quick_bundle.split["test"]]
    sources = held_out[held_out.obs["cell_type"].astype(str) != "beta"]
    up = consensus_top(perturb_adata(sources, quick_bundle).P, quick_bundle.genes, k=5)["up"]
    assert all(g in text for g in up)  # the list it enriched is shown
    beta = {f"G{j:02d}" for j in range(5, 10)}
    hits = [g for g in up if g in beta]
    assert len(hits) >= 3  # the generator raises the target's own genes
    first = table.iloc[0]
    assert (first["library"], first["term"], first["overlap"]) == (
        "blocks",
        "beta_block",
        f"{len(hits)}/5",
    )
    assert set(first["genes"].split(";")) == set(hits)
    assert first["p"] == pytest.approx(
        hypergeom.sf(len(hits) - 1, 30, 5, 5), rel=1e-9
    )  # 30 genes, 5 in the set, 5 drawn
    assert first["q"] < 0.05 and bool(first["significant"])
    assert not table["significant"].iloc[1:].any()  # the alpha block (at most 2 genes) is not
    assert (
        main(
            [
                "enrich",
                str(quick_bundle.path),
                str(tiny_h5ad),
                "--offline",
                "--samples",
                "nope",
                "-o",
                str(out),
            ]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err


def test_map_writes_the_tidy_frame(quick_bundle, tiny_h5ad, tmp_path, capsys):
    out = tmp_path / "map.csv"
    assert main(["map", str(quick_bundle.path), str(tiny_h5ad), "-o", str(out)]) == 0
    assert "held-out non-target samples placed" in capsys.readouterr().out
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["x", "y", "sample", "class", "predicted", "kind"]
    real, pert = frame[frame.kind == "real"], frame[frame.kind == "perturbed"]
    assert len(real) == 60 and set(real["class"]) == {"alpha", "beta", "gamma"}
    test = set(quick_bundle.split["test"])
    labels = make_tiny_adata().obs["cell_type"].astype(str)
    assert set(pert["sample"]) == {s for s in test if labels[s] != "beta"}
    assert (pert["class"] != "beta").all() and set(frame["predicted"]) <= set(quick_bundle.classes)
    assert np.isfinite(frame[["x", "y"]].to_numpy()).all()

    # chosen classes and samples, a subsample of each class
    assert (
        main(
            [
                "map",
                str(quick_bundle.path),
                str(tiny_h5ad),
                "--classes",
                "alpha",
                "--n-per-class",
                "6",
                "--samples",
                "s000",
                "s045",
                "--seed",
                "1",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    frame = pd.read_csv(out)
    real, pert = frame[frame.kind == "real"], frame[frame.kind == "perturbed"]
    assert real["class"].value_counts().to_dict() == {
        "beta": 6,
        "alpha": 6,
    }  # the target is always shown
    assert pert["sample"].tolist() == ["s000", "s045"] and pert["class"].tolist() == [
        "alpha",
        "gamma",
    ]
    assert (
        main(["map", str(quick_bundle.path), str(tiny_h5ad), "--classes", "delta", "-o", str(out)])
        == 2
    )
    assert "delta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["map", str(quick_bundle.path), str(tiny_h5ad), "--n-per-class", "0", "-o", str(out)])


# ----------------------------------------------------------------------------- big data: bounded


def test_evaluate_and_map_on_a_seeded_subsample_say_so(
    quick_bundle, tiny_h5ad, tmp_path, capsys, monkeypatch
):
    """On big data evaluate and map use a fixed, seeded subsample, and print the counts used
    (the caps are lowered here so the tiny GEM counts as big)."""
    import functools
    import json

    import tspg.embedding
    import tspg.metrics

    monkeypatch.setattr(
        tspg.metrics,
        "evaluate",
        functools.partial(tspg.metrics.evaluate, max_train=15, max_heldout=6),
    )
    js = tmp_path / "e.json"
    args = ["evaluate", str(quick_bundle.path), str(tiny_h5ad), "--k", "3", "--json", str(js)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "on a seeded subsample of 15 of the 48 training samples (--seed 0)" in out
    assert "on a seeded subsample of 6 of the 12 held-out samples (--seed 0)" in out
    first = json.loads(js.read_text())
    assert first["samples"]["heldout"] == 6 and first["samples"]["heldout_total"] == 12
    assert first["params"]["max_heldout"] == 6
    assert main(args) == 0
    again = json.loads(js.read_text())
    assert first["perturbation_accuracy"] == again["perturbation_accuracy"]  # fixed subsample

    monkeypatch.setattr(tspg.embedding, "MAP_MAX_PLACED", 4)
    out_csv = tmp_path / "map.csv"
    assert main(["map", str(quick_bundle.path), str(tiny_h5ad), "-o", str(out_csv)]) == 0
    assert "held-out non-target samples (a seeded subsample of 4 of 8) placed" in (
        capsys.readouterr().out
    )
    frame = pd.read_csv(out_csv)
    assert (frame.kind == "perturbed").sum() == 4 and (frame.kind == "real").sum() == 60


def test_perturb_new_data_with_other_gene_names(quick_bundle, tmp_path, capsys):
    """Lowercase symbols, Ensembl ids with symbols in var, and a gene missing: perturbed,
    and the output says how the genes were matched and filled."""
    import anndata as ad

    gem = make_tiny_adata()
    expected = perturb_adata(gem, quick_bundle)
    lower = gem.copy()
    lower.var_names = [g.lower() for g in gem.var_names]
    ids = gem.copy()
    ids.var["feature_name"] = list(gem.var_names)
    ids.var_names = [f"ENSG{j:011d}" for j in range(gem.n_vars)]
    for name, data, key in (("lower", lower, "n_case_matched"), ("ids", ids, "from_var_column")):
        path = tmp_path / f"{name}.h5ad"
        data.write_h5ad(path)
        out = tmp_path / f"{name}-out.h5ad"
        assert main(["perturb", str(quick_bundle.path), str(path), "-o", str(out)]) == 0
        res = ad.read_h5ad(out)
        np.testing.assert_array_equal(res.layers["tspg_perturbation"], expected.P)
        assert list(res.var_names) == quick_bundle.genes
        match = res.uns["tspg"]["gene_match"]
        assert match["n_missing"] == 0
        assert match[key] == (30 if key == "n_case_matched" else "feature_name")
        printed = capsys.readouterr().out
        assert (
            "genes: 30 of the model's 30 genes found; 30 only when ignoring case" in printed
            if name == "lower"
            else "genes: 30 of the model's 30 genes found; by the symbols in var['feature_name']"
            in printed
        )
    lacking = gem[:, [g for g in gem.var_names if g != "G03"]].copy()
    path = tmp_path / "lacking.h5ad"
    lacking.write_h5ad(path)
    out = tmp_path / "lacking-out.h5ad"
    assert main(["perturb", str(quick_bundle.path), str(path), "-o", str(out)]) == 0
    assert (
        "genes: 29 of the model's 30 genes found; 1 missing (3.3%), filled with the training mean: G03"
        in capsys.readouterr().out
    )
    res = ad.read_h5ad(out)
    match = res.uns["tspg"]["gene_match"]
    assert match["n_missing"] == 1 and list(match["missing"]) == ["G03"]
    assert match["fill"] == "training mean"
    j = quick_bundle.genes.index("G03")
    np.testing.assert_allclose(
        res.layers["tspg_x"][:, j], quick_bundle.manifest["training_mean"][j], atol=1e-6
    )
    assert res.var["tspg_data_name"].iloc[j] == ""


def test_map_and_enrich_print_the_selections_verdict(
    quick_bundle, tiny_h5ad, tmp_path, capsys, monkeypatch
):
    """Every command that shows a result on perturbed samples shows their verdict too: the
    level of tspg.verdict.selection_verdict on those samples, as tspg perturb prints it."""
    from tspg.verdict import selection_verdict

    monkeypatch.setenv("TSPG_CACHE_DIR", str(tmp_path / "cache"))
    adata = make_tiny_adata()
    held_out = adata[quick_bundle.split["test"]]
    sources = held_out[held_out.obs["cell_type"].astype(str) != "beta"]
    level = selection_verdict(quick_bundle, perturb_adata(sources, quick_bundle))["level"]
    want = f"verdict: {level.upper()} (the worst of"
    assert main(["map", str(quick_bundle.path), str(tiny_h5ad), "-o", str(tmp_path / "m.csv")]) == 0
    assert want in capsys.readouterr().out
    gmt = tmp_path / "blocks.gmt"
    gmt.write_text("beta_block\tna\t" + "\t".join(f"G{j:02d}" for j in range(5, 10)) + "\n")
    argv = ["enrich", str(quick_bundle.path), str(tiny_h5ad), "--offline", "--gmt", str(gmt)]
    assert main([*argv, "-o", str(tmp_path / "e.csv")]) == 0
    assert want in capsys.readouterr().out
