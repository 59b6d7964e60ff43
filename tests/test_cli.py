"""Command line: ``tspg import``, ``tspg-train`` / ``tspg train`` and ``tspg list`` (tspg/cli.py)."""

from __future__ import annotations

import logging
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CLASSES, make_tiny_adata

from tspg.bundle import load_bundle
from tspg.cli import main, train_main
from tspg.config import config_options
from tspg.datasets import write_reference_example

# the paper's networks, trained for a moment: these tests are about the command, not the science
FAST = ["--epochs", "2", "--target-epochs", "2", "--batch-size", "32", "--device", "cpu", "-q"]
FAST += ["--seeds", "1"]  # one generator: these tests are not about ensembles


@pytest.fixture
def tiny_h5ad(tmp_path):
    path = tmp_path / "tiny.h5ad"
    make_tiny_adata().write_h5ad(path)
    return path


def one_error_line(err: str) -> str:
    """stderr of a failed command: exactly one 'error:' line and no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def no_bundle_written(models) -> bool:
    return not models.exists() or not any(models.iterdir())


def usage_error(func, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        func(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- tspg import


def import_and_read(argv, out, capsys) -> ad.AnnData:
    assert main(["import", *argv, "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    return ad.read_h5ad(out)


def tiny_frame() -> tuple[pd.DataFrame, pd.Series]:
    adata = make_tiny_adata()
    return adata.to_df(), adata.obs["cell_type"].astype(str)


def write_labels(path, labels: pd.Series):
    labels.to_csv(path, sep="\t", header=False)
    return path


def assert_same_gem(adata: ad.AnnData, key: str = "label"):
    df, labels = tiny_frame()
    assert list(adata.obs_names) == list(df.index) and list(adata.var_names) == list(df.columns)
    np.testing.assert_allclose(adata.X, df.to_numpy(), rtol=1e-6)
    assert list(adata.obs[key]) == list(labels)


def test_import_csv_with_labels(tmp_path, capsys):
    df, labels = tiny_frame()
    df.to_csv(tmp_path / "gem.csv")
    adata = import_and_read(
        [str(tmp_path / "gem.csv"), "--labels", str(write_labels(tmp_path / "l.txt", labels))],
        tmp_path / "out.h5ad",
        capsys,
    )
    assert_same_gem(adata)


def test_import_tsv_transposed_with_label_key(tmp_path, capsys):
    df, labels = tiny_frame()
    df.T.to_csv(tmp_path / "gem.tsv", sep="\t")
    argv = [
        str(tmp_path / "gem.tsv"),
        "--transpose",
        "--labels",
        str(write_labels(tmp_path / "l.txt", labels)),
        "--label-key",
        "cell_type",
    ]
    assert_same_gem(import_and_read(argv, tmp_path / "out.h5ad", capsys), key="cell_type")


def test_import_reference_text(tmp_path, capsys):
    df, labels = tiny_frame()
    df.to_csv(tmp_path / "gem.emx.txt", sep="\t")
    argv = [
        str(tmp_path / "gem.emx.txt"),
        "--labels",
        str(write_labels(tmp_path / "gem.labels.txt", labels)),
    ]
    assert_same_gem(import_and_read(argv, tmp_path / "out.h5ad", capsys))


def test_import_npy_with_names_files(tmp_path, capsys):
    df, labels = tiny_frame()
    np.save(tmp_path / "gem.npy", df.to_numpy())
    (tmp_path / "gem.rownames.txt").write_text("\n".join(df.index))
    (tmp_path / "genes.txt").write_text("\n".join(df.columns))
    argv = [
        str(tmp_path / "gem.npy"),
        "--col-names",
        str(tmp_path / "genes.txt"),
        "--labels",
        str(write_labels(tmp_path / "l.txt", labels)),
    ]
    assert_same_gem(import_and_read(argv, tmp_path / "out.h5ad", capsys))


def test_import_h5ad_raw(tmp_path, capsys):
    src = make_tiny_adata()
    src.raw = src.copy()
    src = src[:, :5].copy()
    src.write_h5ad(tmp_path / "in.h5ad")
    adata = import_and_read(
        [str(tmp_path / "in.h5ad"), "--use-raw", "--label-key", "cell_type"],
        tmp_path / "out.h5ad",
        capsys,
    )
    assert adata.n_vars == 30
    assert_same_gem(adata, key="cell_type")


def test_import_reports_filled_values_or_refuses_them(tmp_path, capsys):
    df, _ = tiny_frame()
    df.iloc[3, 4] = np.nan
    df.to_csv(tmp_path / "gem.csv")
    out = tmp_path / "out.h5ad"
    assert main(["import", str(tmp_path / "gem.csv"), "-o", str(out)]) == 0
    assert "1 missing values filled" in capsys.readouterr().out
    out.unlink()
    assert main(["import", str(tmp_path / "gem.csv"), "--nan", "error", "-o", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "sample 's003', gene 'G04'" in line
    assert not out.exists()


def test_import_usage_and_file_errors(tmp_path, capsys):
    assert "the following arguments are required: -o/--output" in usage_error(
        main, ["import", "x.csv"], capsys
    )
    assert main(["import", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o.h5ad")]) == 2
    assert "nope.csv: file not found" in one_error_line(capsys.readouterr().err)


def test_import_unreadable_inputs_and_output_named(tmp_path, capsys):
    df, labels = tiny_frame()
    df.to_csv(tmp_path / "gem.csv")
    (tmp_path / "labels.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    argv = [
        "import",
        str(tmp_path / "gem.csv"),
        "--labels",
        str(tmp_path / "labels.txt"),
        "-o",
        str(tmp_path / "o.h5ad"),
    ]
    assert main(argv) == 2
    assert f"error: {tmp_path / 'labels.txt'}: cannot read labels" in one_error_line(
        capsys.readouterr().err
    )
    out = tmp_path / "nowhere" / "o.h5ad"
    assert main(["import", str(tmp_path / "gem.csv"), "-o", str(out)]) == 2
    assert f"error: {out}: cannot write, {out.parent} is not a folder" == one_error_line(
        capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gem.csv", "labels.txt"]


# ----------------------------------------------------------------------------- tspg-train


def test_train_writes_a_bundle_and_prints_accuracies(tiny_h5ad, tmp_path, capsys):
    models = tmp_path / "models"
    assert (
        train_main(
            [
                str(tiny_h5ad),
                "--label-key",
                "cell_type",
                "--target",
                "beta",
                "--out",
                str(models),
                *FAST,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"bundle {models / 'tiny-beta'}" in out
    assert re.search(r"target model held-out accuracy: \d\.\d{3}", out)
    assert re.search(
        r"perturbation accuracy \(held-out\): all \d\.\d{3}, non-target \d\.\d{3} \(n=8\)", out
    )
    assert re.search(r"wall time: \d+\.\d s", out)
    b = load_bundle(models / "tiny-beta")
    assert (
        b.target == "beta"
        and b.config.epochs == 2
        and b.config.target_epochs == 2
        and b.config.recipe == "tspg+"
    )
    assert b.manifest["dataset"]["name"] == "tiny"


def test_train_usage_errors_exit_2(tiny_h5ad, tmp_path, capsys):
    assert "give a data file (or --demo)" in usage_error(train_main, [], capsys)
    both = [str(tiny_h5ad), "--label-key", "cell_type", "--target", "beta", "--all-targets"]
    assert "give --target or --all-targets, not both" in usage_error(train_main, both, capsys)
    assert "--target CLASS (or --all-targets) is required" in usage_error(
        train_main, [str(tiny_h5ad), "--label-key", "cell_type"], capsys
    )
    assert "--label-key (or --labels) is required" in usage_error(
        train_main, [str(tiny_h5ad), "--target", "beta"], capsys
    )
    assert "invalid choice: 'fancy'" in usage_error(
        train_main, [str(tiny_h5ad), "--recipe", "fancy"], capsys
    )
    assert "invalid int value" in usage_error(
        train_main, [str(tiny_h5ad), "--epochs", "many"], capsys
    )
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--batch-size", "1", "--batch-size 1: must be at least 2"),
        ("--epochs", "-1", "--epochs -1: must be at least 1"),
        ("--target-epochs", "0", "--target-epochs 0: must be at least 1"),
        ("--target-batch-size", "0", "--target-batch-size 0: must be at least 2"),
        ("--cov-rank", "0", "--cov-rank 0: must be at least 1"),
        ("--seed", "-1", "--seed -1: must be 0 or more"),
        ("--kappa", "nan", "--kappa nan: must be a finite number"),
        ("--kappa", "-1", "--kappa -1.0: must be 0 or more"),
        ("--g-lr", "-1", "--g-lr -1.0: must be more than 0"),
        ("--d-lr", "0", "--d-lr 0.0: must be more than 0"),
        ("--target-lr", "inf", "--target-lr inf: must be a finite number"),
        ("--test-size", "1", "--test-size 1.0: must be between 0 and 1 (exclusive)"),
        ("--test-size", "0", "--test-size 0.0: must be between 0 and 1 (exclusive)"),
        ("--ed-repulsion", "1.5", "--ed-repulsion 1.5: must be between 0 and 1"),
    ],
)
def test_train_numeric_options_range_checked(tiny_h5ad, tmp_path, capsys, option, value, expected):
    models = tmp_path / "models"
    err = usage_error(
        train_main,
        [
            str(tiny_h5ad),
            "--label-key",
            "cell_type",
            "--target",
            "beta",
            "--out",
            str(models),
            *FAST,
            option,
            value,
        ],
        capsys,
    )
    assert f"error: {expected}" in err
    assert not models.exists()


def test_every_loss_weight_must_be_finite_and_not_negative(tiny_h5ad, capsys):
    weights = [name for name in config_options() if name.startswith("w_")]
    assert {"w_gan", "w_adv", "w_norm", "w_td", "w_ed"} <= set(weights)
    for name in weights:
        option = "--" + name.replace("_", "-")
        for value, problem in (
            ("-0.5", "must be 0 or more"),
            ("nan", "must be a finite number"),
            ("inf", "must be a finite number"),
        ):
            err = usage_error(
                train_main,
                [str(tiny_h5ad), "--label-key", "cell_type", "--target", "beta", option, value],
                capsys,
            )
            assert f"error: {option} {float(value)}: {problem}" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--label-key", "tissue", "--target", "beta"],
            r"tiny\.h5ad: no label column 'tissue' in obs \(columns: cell_type\)",
        ),
        (
            ["--label-key", "cell_type", "--target", "delta"],
            r"target class 'delta' is not among the 3 classes of 'cell_type': alpha, beta, gamma",
        ),
        (
            ["--label-key", "cell_type", "--target", "beta", "--gene-set", "absent.gmt:X"],
            r"absent\.gmt: gene-set file not found",
        ),
        (
            ["--label-key", "cell_type", "--target", "beta", "--target-model", "no-such-bundle"],
            r"no bundle 'no-such-bundle'",
        ),
    ],
    ids=["label-key", "target", "gene-set", "target-model"],
)
def test_train_bad_input_exit_2_one_line_no_bundle(tiny_h5ad, tmp_path, capsys, argv, expected):
    models = tmp_path / "models"
    assert train_main([str(tiny_h5ad), *argv, "--out", str(models), *FAST]) == 2
    assert re.search(expected, one_error_line(capsys.readouterr().err))
    assert no_bundle_written(models)


def test_train_gene_set_folder_named(tiny_h5ad, tmp_path, capsys):
    models = tmp_path / "models"
    assert (
        train_main(
            [
                str(tiny_h5ad),
                "--label-key",
                "cell_type",
                "--target",
                "beta",
                "--gene-set",
                str(tmp_path),
                "--out",
                str(models),
                *FAST,
            ]
        )
        == 2
    )
    assert (
        one_error_line(capsys.readouterr().err)
        == f"error: {tmp_path}: cannot read the gene-set file (Is a directory)"
    )
    assert no_bundle_written(models)


def test_train_missing_file_exit_2(tmp_path, capsys):
    models = tmp_path / "models"
    assert (
        train_main(
            [
                str(tmp_path / "nope.h5ad"),
                "--label-key",
                "x",
                "--target",
                "a",
                "--out",
                str(models),
                *FAST,
            ]
        )
        == 2
    )
    assert "nope.h5ad: file not found" in one_error_line(capsys.readouterr().err)
    assert no_bundle_written(models)


def test_all_targets_through_tspg_train(tiny_h5ad, tmp_path, capsys):
    models = tmp_path / "models"
    assert (
        main(
            [
                "train",
                str(tiny_h5ad),
                "--label-key",
                "cell_type",
                "--all-targets",
                "--out",
                str(models),
                *FAST,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert sorted(p.name for p in models.iterdir()) == [f"tiny-{c}" for c in TINY_CLASSES]
    assert out.count("bundle ") == 3 and out.count("wall time") == 1
    splits = {c: load_bundle(models / f"tiny-{c}").split["test"] for c in TINY_CLASSES}
    assert splits["alpha"] == splits["beta"] == splits["gamma"]


def test_target_model_reuses_a_bundle(tiny_h5ad, tmp_path, capsys):
    models = tmp_path / "models"
    base = [str(tiny_h5ad), "--label-key", "cell_type", "--out", str(models), *FAST]
    assert train_main([*base, "--target", "alpha", "--name", "first", "--split-seed", "3"]) == 0
    # FAST's --target-epochs 2 is what made 'first': no conflict; the seed is the generator's own
    assert (
        train_main(
            [
                *base,
                "--target",
                "gamma",
                "--name",
                "second",
                "--target-model",
                "first",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    first, second = load_bundle(models / "first"), load_bundle(models / "second")
    assert second.split == first.split and second.config.split_seed == 3 and second.config.seed == 5
    assert second.manifest["target_model_from"] == "first"
    assert second.manifest["scaler"] == first.manifest["scaler"]
    for key, v in first.target_model.state_dict().items():
        assert torch.equal(v, second.target_model.state_dict()[key]), key
    # a path to the bundle folder works too
    assert (
        train_main(
            [*base, "--target", "beta", "--name", "third", "--target-model", str(models / "first")]
        )
        == 0
    )
    assert load_bundle(models / "third").split == first.split
    assert "--name needs a single --target" in usage_error(
        train_main, [*base, "--all-targets", "--name", "x"], capsys
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--split-seed", "5"],
            "--split-seed 5 conflicts with --target-model first, whose target model and split were made with --split-seed 0; drop --split-seed",
        ),
        (["--test-size", "0.3"], "--test-size 0.3 conflicts with --target-model first"),
        (
            ["--target-epochs", "3"],
            "--target-epochs 3 conflicts with --target-model first, whose target model and split were made with --target-epochs 2",
        ),
        (["--target-lr", "0.01"], "--target-lr 0.01 conflicts with --target-model first"),
        (["--gene-set", "any.gmt:X"], "--gene-set and --genes cannot be used with --target-model"),
        (["--genes", "genes.txt"], "--gene-set and --genes cannot be used with --target-model"),
    ],
    ids=["split-seed", "test-size", "target-epochs", "target-lr", "gene-set", "genes"],
)
def test_target_model_refuses_options_it_would_ignore(tiny_h5ad, tmp_path, capsys, argv, expected):
    models = tmp_path / "models"
    base = [str(tiny_h5ad), "--label-key", "cell_type", "--out", str(models), *FAST]
    assert train_main([*base, "--target", "alpha", "--name", "first"]) == 0
    err = usage_error(
        train_main, [*base, "--target", "gamma", "--target-model", "first", *argv], capsys
    )
    assert expected in err
    assert sorted(p.name for p in models.iterdir()) == ["first"]


def test_existing_bundle_needs_overwrite(tiny_h5ad, tmp_path, capsys):
    argv = [
        str(tiny_h5ad),
        "--label-key",
        "cell_type",
        "--target",
        "beta",
        "--out",
        str(tmp_path / "m"),
        *FAST,
    ]
    assert train_main(argv) == 0
    assert train_main(argv) == 2
    assert "a bundle of that name exists" in one_error_line(capsys.readouterr().err)
    assert train_main([*argv, "--overwrite"]) == 0


NOT_QUIET = [a for a in FAST if a != "-q"]


def test_output_problems_stop_before_training(tiny_h5ad, tmp_path, capsys):
    """An existing bundle (of any target, with --all-targets), a bad --name or an --out that is
    a file end the run before any epoch: no progress bar, nothing written."""
    base = [str(tiny_h5ad), "--label-key", "cell_type", *NOT_QUIET]
    models = tmp_path / "models"
    (models / "tiny-gamma").mkdir(parents=True)
    assert train_main([*base, "--all-targets", "--out", str(models)]) == 2
    err = capsys.readouterr().err
    assert (
        one_error_line(err)
        == f"error: {models / 'tiny-gamma'}: a bundle of that name exists; pass --overwrite or choose --name"
    )
    assert "epoch/s" not in err
    assert sorted(p.name for p in models.iterdir()) == ["tiny-gamma"]
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out in (afile, afile / "sub"):
        assert train_main([*base, "--target", "beta", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert (
            one_error_line(err)
            == f"error: {afile}: is a file; the bundles go into a folder (--out)"
        )
        assert "epoch/s" not in err
    assert afile.read_text() == "not a folder"
    err = usage_error(
        train_main, [*base, "--target", "beta", "--name", "../up", "--out", str(models)], capsys
    )
    assert "error: --name: invalid bundle name '../up'" in err and "epoch/s" not in err


def test_progress_bars_of_both_stages_without_quiet(tiny_h5ad, tmp_path, capsys, caplog):
    models = tmp_path / "models"
    with caplog.at_level(logging.INFO):
        assert (
            train_main(
                [
                    str(tiny_h5ad),
                    "--label-key",
                    "cell_type",
                    "--target",
                    "beta",
                    "--recipe",
                    "paper",
                    "--out",
                    str(models),
                    *NOT_QUIET,
                ]
            )
            == 0
        )
    captured = capsys.readouterr()
    bars = captured.err.replace("\r", "\n")
    assert re.search(r"target model: 100%.*\b2/2\b.*epoch/s, target_loss=\d", bars)
    assert re.search(
        r"generator beta: 100%.*\b2/2\b.*epoch/s, gan=[\d.]+, adv=[\d.]+, norm=[\d.]+, td=[\d.]+",
        bars,
    )
    assert "L_td draws from the full empirical covariance" in caplog.text
    assert "recipe paper, device cpu, L_td covariance: full" in captured.out


def test_no_non_target_held_out_sample_prints_na(tmp_path, capsys):
    """Classes of one sample stay in training, so the held-out split can hold only the target."""
    adata = make_tiny_adata(n_per_class=10)
    keep = (adata.obs["cell_type"] == "beta").to_numpy() | np.isin(
        adata.obs_names, ["s000", "s020"]
    )
    adata[keep].copy().write_h5ad(tmp_path / "few.h5ad")
    models = tmp_path / "models"
    assert (
        train_main(
            [
                str(tmp_path / "few.h5ad"),
                "--label-key",
                "cell_type",
                "--target",
                "beta",
                "--out",
                str(models),
                *FAST,
            ]
        )
        == 0
    )
    assert (
        "perturbation accuracy (held-out): all 1.000, non-target n/a (n=0)"
        in capsys.readouterr().out
    )
    assert load_bundle(models / "few-beta").metrics["perturbation_accuracy_non_target"] is None


def test_reference_example_end_to_end(tmp_path, capsys):
    paths = write_reference_example(tmp_path)
    h5ad = tmp_path / "x.h5ad"
    assert (
        main(["import", str(paths["emx"]), "--labels", str(paths["labels"]), "-o", str(h5ad)]) == 0
    )
    assert "200 samples x 60 genes" in capsys.readouterr().out
    models = tmp_path / "models"
    argv = [
        str(h5ad),
        "--label-key",
        "label",
        "--target",
        "class-01",
        "--gene-set",
        f"{paths['genesets']}:gene-set-000",
        "--out",
        str(models),
        *FAST,
    ]
    assert train_main(argv) == 0
    b = load_bundle(models / "x-class-01")
    wanted = paths["genesets"].read_text().splitlines()[0].split("\t")[1:]
    assert b.manifest["gene_set"]["name"] == "gene-set-000" and sorted(b.genes) == sorted(wanted)
    assert b.classes == ["class-00", "class-01", "class-02"]
    sizes = pd.read_csv(paths["labels"], sep="\t", header=None)[1].value_counts()
    assert len(b.split["test"]) == sum(round(n * 0.2) for n in sizes) == 39  # 67, 67, 66 samples


# ----------------------------------------------------------------------------- tspg list


def test_list_shows_bundles_and_unreadable_ones(quick_bundle, tmp_path, capsys):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(quick_bundle.path, models / "good")
    shutil.copytree(quick_bundle.path, models / "bad")
    (models / "bad" / "manifest.json").write_text("{")
    assert main(["list", "--models", str(models)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bad\tUNREADABLE: ") and "manifest.json: not valid JSON" in lines[0]
    acc = quick_bundle.metrics["perturbation_accuracy_non_target"]
    assert lines[1] == f"good\ttiny\tbeta\t30 genes\tperturbation accuracy {acc:.3f}\t1 generator"
    (tmp_path / "empty").mkdir()
    assert main(["list", "--models", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == "no bundles"
    # a folder that is not there is an error (issue 10, item 5), not an empty listing
    assert main(["list", "--models", str(tmp_path / "gone")]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert (
        err == f"error: {tmp_path / 'gone'}: no such models folder (give the folder with --models)"
    )


# ----------------------------------------------------------------------------- tspg perturb --samples, tspg enrich


def test_perturb_only_the_chosen_samples(quick_bundle, tiny_h5ad, tmp_path, capsys):
    out = tmp_path / "chosen.h5ad"
    argv = ["perturb", str(quick_bundle.path), str(tiny_h5ad), "--k", "3", "-o", str(out)]
    assert main([*argv, "--samples", "s045", "s001", "s045"]) == 0
    assert "2 samples x 30 genes perturbed towards 'beta'" in capsys.readouterr().out
    a = ad.read_h5ad(out)
    assert list(a.obs_names) == ["s045", "s001"] and list(a.obs["cell_type"]) == ["gamma", "alpha"]
    out.unlink()
    assert main([*argv, "--samples", "s001", "nope", "s999"]) == 2
    assert (
        one_error_line(capsys.readouterr().err)
        == f"error: {tiny_h5ad}: 2 of the 3 sample ids given are not in the data: nope, s999"
    )
    assert not out.exists()


# ----------------------------------------------------------------------------- errors, --debug, --help


def test_help_imports_neither_torch_nor_anndata():
    """``tspg --help`` and ``tspg-train --help`` answer without the heavy libraries."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from tspg.cli import main, train_main\n"
        "for f, argv in ((main, ['--help']), (main, ['perturb', '--help']), (train_main, ['--help'])):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        f(argv)\n"
        "heavy = [m for m in ('torch', 'anndata', 'scanpy', 'streamlit', 'pandas') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import tspg\n"
        "assert 'torch' not in sys.modules and callable(tspg.train)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_top_level_names_are_the_functions_not_modules():
    import tspg
    import tspg.metrics  # noqa: F401  (imports the submodule tspg.perturbation)
    import tspg.training  # noqa: F401
    from tspg.perturbation import perturb

    assert tspg.perturb is perturb and tspg.train.__module__ == "tspg.pipeline"
    assert tspg.evaluate.__module__ == "tspg.metrics" and set(tspg.__all__) <= set(dir(tspg))
    with pytest.raises(AttributeError):
        tspg.no_such_name  # noqa: B018


def test_widths_options_and_their_errors(tiny_h5ad, tmp_path, capsys):
    models = tmp_path / "models"
    argv = [str(tiny_h5ad), "--label-key", "cell_type", "--target", "beta", "--out", str(models)]
    nets = ["--target-hidden", "16,8", "--gen-encoder", "16", "--gen-decoder", "16,16"]
    nets += ["--disc-hidden", "8", "--gen-residual", "0"]
    assert train_main([*argv, *FAST, *nets]) == 0
    c = load_bundle(models / "tiny-beta").config
    assert (c.target_hidden, c.gen_encoder, c.gen_decoder, c.disc_hidden, c.gen_residual) == (
        (16, 8),
        (16,),
        (16, 16),
        (8,),
        0,
    )
    err = usage_error(train_main, [*argv, "--target-hidden", "16,x"], capsys)
    assert "argument --target-hidden: invalid literal for int()" in err
    err = usage_error(train_main, [*argv, "--gen-encoder", "16,0"], capsys)
    assert "error: --gen-encoder 16,0: widths must be at least 1" in err
    err = usage_error(train_main, [*argv, "--disc-hidden", "16,,8"], capsys)
    assert "argument --disc-hidden: '16,,8' is not a list of widths" in err


def test_user_error_one_line_exit_2_debug_adds_the_traceback(tmp_path, capsys):
    argv = ["import", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o.h5ad")]
    assert main(argv) == 2
    assert one_error_line(capsys.readouterr().err).endswith("nope.csv: file not found")
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError" in err and err.strip().endswith("file not found")


def test_a_bug_is_not_dressed_as_a_user_error(tiny_h5ad, tmp_path, monkeypatch):
    """Any exception but UserError keeps its traceback (here: a ValueError inside the reader)."""
    import tspg.data

    def broken(*args, **kwargs):
        raise ValueError("internal: something tspg did wrong")

    monkeypatch.setattr(tspg.data, "read_gem", broken)
    with pytest.raises(ValueError, match="internal"):
        main(["import", str(tiny_h5ad), "-o", str(tmp_path / "o.h5ad")])


def test_output_file_os_errors_name_the_file(quick_bundle, tiny_h5ad, tmp_path, capsys):
    target = tmp_path / "no-such-folder" / "metrics.json"
    argv = ["evaluate", str(quick_bundle.path), str(tiny_h5ad), "--k", "3", "--json", str(target)]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {target}: cannot write, {target.parent} is not a folder"
