"""The fault catalogue, part 2 (issue 10, items 4-6): the command line.

Each :class:`CliFault` builds one bad input in a fresh folder and names the one line the
user sees: ``tspg ...`` (``tspg train ...`` is ``tspg-train``) exits with 2, stderr holds
exactly one error line, that one, and no traceback, and nothing in the folder was written,
changed or lost (it is byte-for-byte the same before and after). To add a case, append a
``CliFault`` to :data:`CLI_FAULTS`.

Messages are templates: ``{dir}`` is the case's folder (resolved); ``{any}`` stands for a
library's own words. A usage error (``usage=True``: argparse's, before anything is read)
prints the usage and ``tspg <command>: error: <message>``; any other ends with
``error: <message>``.

Below the catalogue: the cases that are not errors but a documented, visible warning
(a class skipped by ``--all-targets``, short rows read with ``--short-rows fill``, a GEM
that looks genes x samples), the one that needs a process of its own (an ``--out`` whose
permission is denied, checked as user ``nobody``), and a run that fails after its first
bundle was saved (the bundle stays).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_adata
from test_faults import _as_nobody, expected_pattern, snapshot

from tspg.bundle import list_bundles, load_bundle
from tspg.cli import main
from tspg.config import TrainConfig
from tspg.errors import UserError
from tspg.pipeline import check_run, train_all_targets

# the networks and epochs of these runs: tiny; the cases are about the command, not the
# science (no -q: a progress bar, "epoch/s", shows training began)
SMALL = [
    "--seeds",
    "1",
    "--epochs",
    "2",
    "--target-epochs",
    "2",
    "--batch-size",
    "32",
    "--gen-encoder",
    "32,16",
    "--gen-residual",
    "1",
    "--gen-decoder",
    "32",
    "--disc-hidden",
    "32,16",
    "--target-hidden",
    "32,16",
    "--device",
    "cpu",
]

# ----------------------------------------------------------------------------- the frame


@dataclass
class Case:
    """Where a case builds its bad input: a fresh folder, and the session's quick bundle."""

    dir: Path
    quick_bundle: Path

    @property
    def models(self) -> Path:
        return self.dir / "models"

    def gem(self, name: str = "tiny.h5ad", *, n_per_class: int = 10, keep=None) -> str:
        """The tiny GEM (three classes, 10 samples each: s000-s009 alpha, s010-s019 beta,
        s020-s029 gamma) as .h5ad, only the samples ``keep`` (ids) when given."""
        adata = make_tiny_adata(n_per_class=n_per_class)
        if keep is not None:
            adata = adata[np.isin(adata.obs_names, keep)].copy()
        adata.write_h5ad(self.dir / name)
        return str(self.dir / name)

    def one_alpha(self) -> str:
        """alpha has one sample (s000); beta and gamma ten each."""
        return self.gem("one.h5ad", keep=["s000", *(f"s{i:03d}" for i in range(10, 30))])

    def text(self, name: str = "gem.csv", *, transposed: bool = False, cut=()) -> str:
        """The tiny GEM of 60 samples x 30 genes as delimited text (by the suffix), with the
        data lines ``cut`` (1 = the first sample's) each losing their last three fields."""
        df = make_tiny_adata().to_df()
        df = df.T if transposed else df
        sep = "," if name.endswith(".csv") else "\t"
        lines = df.to_csv(sep=sep).splitlines()
        for i in cut:
            lines[i] = sep.join(lines[i].split(sep)[:-3])
        (self.dir / name).write_text("\n".join(lines) + "\n")
        return str(self.dir / name)

    def labels(self, name: str = "labels.txt") -> str:
        """The labels of :meth:`text`'s 60 samples."""
        adata = make_tiny_adata()
        adata.obs["cell_type"].astype(str).to_csv(self.dir / name, sep="\t", header=False)
        return str(self.dir / name)

    def bundle_named(self, name: str) -> Path:
        """A copy of the quick bundle (tiny, target beta) in the models folder, as ``name``."""
        shutil.copytree(self.quick_bundle, self.models / name)
        return self.models / name

    def file(self, name: str, text: str = "not a folder") -> str:
        (self.dir / name).parent.mkdir(parents=True, exist_ok=True)
        (self.dir / name).write_text(text)
        return str(self.dir / name)


def train(case: Case, data: str, *extra: str) -> list[str]:
    """``tspg train DATA --label-key cell_type`` with small networks, into ``case.models``."""
    return ["train", data, "--label-key", "cell_type", "--out", str(case.models), *SMALL, *extra]


@dataclass(frozen=True)
class CliFault:
    """One bad command line: ``build(case)`` makes its input and returns the argv of ``tspg``."""

    id: str
    item: int  # issue 10's item
    build: Callable[[Case], list[str]]
    message: str
    usage: bool = False  # argparse's usage error: refused before anything is read


def _gem_short(c: Case, suffix: str) -> str:
    return c.text(f"gem.{suffix}", cut=(5, 9))


def _bundle(c: Case) -> str:
    return str(c.bundle_named("b"))


CLI_FAULTS: list[CliFault] = [
    # --- 4: a long run never fails at the end: all of it checked before the first epoch
    CliFault(
        "--target with a class of one sample",
        4,
        lambda c: train(c, c.one_alpha(), "--target", "alpha"),
        "one: class 'alpha' cannot be a target: it has only 1 sample; a generator needs at "
        "least 2 training samples of its target class",
    ),
    CliFault(
        "--test-size 0.99 leaves the target one training sample",
        4,
        lambda c: train(c, c.gem(), "--target", "beta", "--test-size", "0.99"),
        "tiny: class 'beta' cannot be a target: it keeps 1 of its 10 samples for training, the "
        "others are held out (--test-size 0.99); a generator needs at least 2",
    ),
    CliFault(
        "--all-targets with --test-size 0.99: no class can be a target",
        4,
        lambda c: train(c, c.gem(), "--all-targets", "--test-size", "0.99"),
        "tiny: no class can be a target; class 'alpha': it keeps 1 of its 10 samples for "
        "training, the others are held out (--test-size 0.99); a generator needs at least 2 "
        "(and 2 more class(es) alike)",
    ),
    CliFault(
        "one sample of the other classes for the generator to perturb",
        4,
        lambda c: train(
            c,
            c.gem("two.h5ad", keep=["s000", *(f"s{i:03d}" for i in range(10, 20))]),
            "--target",
            "beta",
        ),  # fmt: skip
        "two: class 'beta' cannot be a target: only 1 training sample(s) of the other classes "
        "are left for its generator to perturb; at least 2 are needed",
    ),
    CliFault(
        "--target not a class",
        4,
        lambda c: train(c, c.gem(), "--target", "delta"),
        "target class 'delta' is not among the 3 classes of 'cell_type': alpha, beta, gamma",
    ),
    CliFault(
        "--out is a file",
        4,
        lambda c: [*train(c, c.gem(), "--target", "beta"), "--out", c.file("afile")],
        "{dir}/afile: is a file; the bundles go into a folder (--out)",
    ),
    CliFault(
        "--out under a file",
        4,
        lambda c: [*train(c, c.gem(), "--target", "beta"), "--out", c.file("afile") + "/sub/x"],
        "{dir}/afile: is a file; the bundles go into a folder (--out)",
    ),
    CliFault(
        "a second run to the same --out",
        4,
        lambda c: (c.bundle_named("tiny-beta"), train(c, c.gem(), "--target", "beta"))[1],
        "{dir}/models/tiny-beta: a bundle of that name exists; pass --overwrite or choose --name",
    ),
    CliFault(
        "--all-targets: one of the names exists",
        4,
        lambda c: (c.bundle_named("tiny-gamma"), train(c, c.gem(), "--all-targets"))[1],
        "{dir}/models/tiny-gamma: a bundle of that name exists; pass --overwrite or choose --name",
    ),
    CliFault(
        "--overwrite onto a folder that is not a bundle",
        4,
        lambda c: (
            c.file("models/tiny-beta/notes.txt", "mine"),
            train(c, c.gem(), "--target", "beta", "--overwrite"),
        )[1],
        "{dir}/models/tiny-beta: in the way and not a bundle (a folder without manifest.json); "
        "--overwrite replaces bundles only: move it away or choose --name",
    ),
    CliFault(
        "--overwrite onto a file",
        4,
        lambda c: (
            c.file("models/x", "mine"),
            train(c, c.gem(), "--target", "beta", "--name", "x", "--overwrite"),
        )[1],
        "{dir}/models/x: in the way and not a bundle (not a folder); --overwrite replaces "
        "bundles only: move it away or choose --name",
    ),
    CliFault(
        "every loss weight 0",
        4,
        lambda c: train(
            c, c.gem(), "--target", "beta", "--w-gan", "0", "--w-adv", "0", "--w-ed", "0"
        ),
        "every loss weight (--w-gan, --w-adv, --w-norm, --w-td, --w-ed) is 0: the generator "
        "would learn nothing",
        usage=True,
    ),
    CliFault(
        "--batch-size 1 (BatchNorm: no step would run)",
        4,
        lambda c: train(c, c.gem(), "--target", "beta", "--batch-size", "1"),
        "--batch-size 1: must be at least 2",
        usage=True,
    ),
    # --- 5: silently misread input
    CliFault(
        "CSV row with too few fields (import)",
        5,
        lambda c: ["import", _gem_short(c, "csv"), "-o", str(c.dir / "out.h5ad")],
        "{dir}/gem.csv: line 6 (row 's004') has 28 of 31 fields (and 1 more row(s) like it): "
        "a row cut short? Refused; --short-rows fill reads the missing fields as missing values",
    ),
    CliFault(
        "TSV row with too few fields (tspg-train)",
        5,
        lambda c: train(c, _gem_short(c, "tsv"), "--labels", c.labels(), "--target", "beta"),
        "{dir}/gem.tsv: line 6 (row 's004') has 28 of 31 fields (and 1 more row(s) like it): "
        "a row cut short? Refused; --short-rows fill reads the missing fields as missing values",
    ),
    CliFault(
        "short rows filled, missing values refused",
        5,
        lambda c: [
            "import",
            _gem_short(c, "csv"),
            "--short-rows",
            "fill",
            "--nan",
            "error",
            "-o",
            str(c.dir / "out.h5ad"),
        ],  # fmt: skip
        "{dir}/gem.csv: 6 missing values, first at sample 's004', gene 'G27' (use --nan fill to "
        "fill them with the minimum)",
    ),
    CliFault(
        "genes x samples with labels, no --transpose",
        5,
        lambda c: [
            "import",
            c.text(transposed=True),
            "--labels",
            c.labels(),
            "-o",
            str(c.dir / "o.h5ad"),
        ],  # fmt: skip
        "{dir}/labels.txt: no label for sample 'G00' and 29 more: its samples are the GEM's "
        "columns, not its rows; read it with --transpose",
    ),
    CliFault(
        "tspg list of a folder that does not exist",
        5,
        lambda c: ["list", "--models", str(c.dir / "nonexistent")],
        "{dir}/nonexistent: no such models folder (give the folder with --models)",
    ),
    CliFault(
        "tspg list of a file",
        5,
        lambda c: ["list", "--models", c.file("afile")],
        "{dir}/afile: not a folder (--models is the folder that holds the bundles)",
    ),
    # --- 6: every option bounded, the message naming it
    *[
        CliFault(
            f"{cmd} {opt} {value}",
            6,
            lambda c, cmd=cmd, opt=opt, value=value: [
                cmd,
                *([] if cmd == "app" else [_bundle(c)]),
                opt,
                value,
                *(["-o", str(c.dir / "out.csv")] if cmd in ("map", "enrich") else []),
                *(
                    ["-o", str(c.dir / "out.h5ad"), str(c.dir / "none.h5ad")]
                    if cmd == "perturb"
                    else []
                ),
            ],  # fmt: skip
            message,
            usage=True,
        )
        for cmd, opt, value, message in [
            ("map", "--seed", "-1", "argument --seed: must be 0 or more, not -1"),
            (
                "map",
                "--seed",
                "100000000000000000000",
                "argument --seed: must be at most 4294967295, not 100000000000000000000",
            ),
            ("evaluate", "--seed", "-1", "argument --seed: must be 0 or more, not -1"),
            ("map", "--n-per-class", "0", "argument --n-per-class: must be at least 1, not 0"),
            ("evaluate", "--k", "1e3", "argument --k: invalid int value: '1e3'"),
            ("perturb", "--k", "0", "argument --k: must be at least 1, not 0"),
            ("perturb", "--k", "10**20", "argument --k: invalid int value: '10**20'"),
            ("evaluate", "--k", "200000", "argument --k: must be at most 100000, not 200000"),
            ("enrich", "--threshold", "0", "argument --threshold: must be between 0 and 1, not 0"),
            (
                "enrich",
                "--threshold",
                "1.5",
                "argument --threshold: must be between 0 and 1, not 1.5",
            ),
            (
                "enrich",
                "--threshold",
                "nan",
                "argument --threshold: must be a finite number, not nan",
            ),
            ("enrich", "--timeout", "inf", "argument --timeout: must be a finite number, not inf"),
            ("enrich", "--timeout", "0", "argument --timeout: must be more than 0, not 0"),
            ("enrich", "--timeout", "1e6", "argument --timeout: must be at most 600, not 1e6"),
            ("app", "--port", "0", "argument --port: must be at least 1, not 0"),
            ("app", "--port", "65536", "argument --port: must be at most 65535, not 65536"),
            ("app", "--demo-epochs", "0", "argument --demo-epochs: must be at least 1, not 0"),
            (
                "app",
                "--demo-epochs",
                "1000000",
                "argument --demo-epochs: must be at most 100000, not 1000000",
            ),
        ]
    ],
    *[
        CliFault(
            f"tspg-train {' '.join(opts)}",
            6,
            lambda c, opts=opts: train(c, c.gem(), "--target", "beta", *opts),
            message,
            usage=True,
        )
        for opts, message in [
            (("--threads", "0"), "argument --threads: must be at least 1, not 0"),
            (
                ("--threads", "100000000000000000000"),
                "argument --threads: must be at most 1024, not 100000000000000000000",
            ),
            (("--n-top-genes", "0"), "argument --n-top-genes: must be at least 1, not 0"),
            (("--epochs", "1e22"), "argument --epochs: invalid int value: '1e22'"),
            (
                ("--epochs", "10000000000000000000000"),
                "--epochs 10000000000000000000000: must be at most 100000",
            ),
            (
                ("--seed", "100000000000000000000"),
                "--seed 100000000000000000000: must be at most 4294967295",
            ),
            (("--split-seed", "-1"), "--split-seed -1: must be 0 or more"),
            (("--test-size", "1"), "--test-size 1.0: must be between 0 and 1 (exclusive)"),
            (("--test-size", "nan"), "--test-size nan: must be a finite number"),
            (("--kappa", "1e300"), "--kappa 1e+300: must be at most 1000000"),
            (("--w-ed", "inf"), "--w-ed inf: must be a finite number"),
            (("--gen-residual", "65"), "--gen-residual 65: must be at most 64"),
            (("--target-hidden", "0"), "--target-hidden 0: widths must be at least 1"),
        ]
    ],
    # --- outputs: checked before the work whose result they would hold
    CliFault(
        "map -o into a folder that does not exist",
        4,
        lambda c: ["map", _bundle(c), "-o", str(c.dir / "nowhere" / "map.csv")],
        "{dir}/nowhere/map.csv: cannot write, {dir}/nowhere is not a folder",
    ),
    CliFault(
        "enrich -o a folder",
        4,
        lambda c: ["enrich", _bundle(c), "--offline", "-o", str(c.dir)],
        "{dir}: cannot write, it is a folder",
    ),
    CliFault(
        "perturb --csv -o a file",
        4,
        lambda c: ["perturb", _bundle(c), c.gem(), "--csv", "-o", c.file("afile")],
        "{dir}/afile: cannot write into it, it is not a folder",
    ),
    CliFault(
        "evaluate --json under a file",
        4,
        lambda c: ["evaluate", _bundle(c), "--json", c.file("afile") + "/m.json"],
        "{dir}/afile/m.json: cannot write, {dir}/afile is not a folder",
    ),
]


@pytest.fixture
def case(quick_bundle, tmp_path) -> Case:
    return Case(tmp_path.resolve(), quick_bundle.path)


def error_line(err: str, *, usage: bool) -> str:
    """The one error line of stderr, without its prefix; no traceback."""
    assert "Traceback" not in err, err
    prefix = r"tspg[\w -]*: error: " if usage else r"error: "
    lines = [line for line in err.splitlines() if re.match(prefix, line)]
    assert len(lines) == 1, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    return re.sub("^" + prefix, "", lines[0])


def run_tspg(argv: list[str], capsys) -> tuple[int, str, str]:
    """``tspg argv``: (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fault", CLI_FAULTS, ids=[f.id for f in CLI_FAULTS])
def test_cli_fault(case: Case, capsys, fault: CliFault):
    argv = [str(a) for a in fault.build(case)]
    before = snapshot(case.dir)
    code, _, err = run_tspg(argv, capsys)
    assert code == 2, err
    line = error_line(err, usage=fault.usage)
    pattern = fault.message.replace("{dir}", "\0").replace("{any}", "\1")
    pattern = ".+".join(re.escape(p) for p in pattern.split("\1")).replace(
        re.escape("\0"), re.escape(str(case.dir))
    )
    assert re.fullmatch(pattern, line), line
    assert "epoch/s" not in err  # refused before any training
    assert snapshot(case.dir) == before  # nothing written, changed or lost


def test_cli_catalogue_is_well_formed():
    ids = [f.id for f in CLI_FAULTS]
    assert len(ids) == len(set(ids))
    assert {f.item for f in CLI_FAULTS} == {4, 5, 6}
    assert expected_pattern  # (the bundle catalogue's templates: the same {any} convention)


# ----------------------------------------------------------------------------- warnings, not errors


def test_all_targets_skips_a_class_of_one_sample_with_a_warning(case: Case, capsys, caplog):
    """The decision for --all-targets: a class that cannot be a target is skipped, named in a
    warning (before training) and in the summary; every other class gets its bundle."""
    with caplog.at_level(logging.WARNING):
        code, out, _ = run_tspg(train(case, case.one_alpha(), "--all-targets"), capsys)
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "one: no generator for class 'alpha' (skipped): it has only 1 sample; a generator needs "
        "at least 2 training samples of its target class"
    ) in warnings
    assert (
        "trained 2 of 3 classes; no generator for 'alpha' (too few samples: see the warning above)"
        in out
    )
    assert sorted(p.name for p in case.models.iterdir()) == ["one-beta", "one-gamma"]
    assert [load_bundle(case.models / n).target for n in ("one-beta", "one-gamma")] == [
        "beta",
        "gamma",
    ]


def test_short_rows_filled_when_asked_with_a_warning(case: Case, capsys, caplog):
    gem = case.text("gem.csv", cut=(5, 9))
    with caplog.at_level(logging.WARNING):
        argv = ["import", gem, "--short-rows", "fill", "-o", str(case.dir / "o.h5ad")]
        code, out, _ = run_tspg(argv, capsys)
    assert code == 0
    assert (
        f"{gem}: line 6 (row 's004') has 28 of 31 fields (and 1 more row(s) like it): its missing "
        "fields are read as missing values (--short-rows fill)"
    ) in caplog.text
    assert "6 missing values filled" in out and (case.dir / "o.h5ad").exists()


def test_missing_values_written_as_such_are_not_short_rows(case: Case, capsys):
    """A row ending in an empty field or NA has all its fields: missing values, not a short row."""
    df = make_tiny_adata(n_per_class=10).to_df()
    lines = df.to_csv().splitlines()
    lines[3] = ",".join(lines[3].split(",")[:-1]) + ","
    lines[4] = ",".join(lines[4].split(",")[:-1]) + ",NA"
    (case.dir / "gem.csv").write_text("\n".join(lines) + "\n")
    argv = ["import", str(case.dir / "gem.csv"), "-o", str(case.dir / "o.h5ad")]
    code, out, _ = run_tspg(argv, capsys)
    assert code == 0 and "2 missing values filled" in out


def test_genes_x_samples_without_transpose_warns_and_never_transposes(case: Case, capsys, caplog):
    gem = case.text("gem.tsv", transposed=True)
    with caplog.at_level(logging.WARNING):
        code, out, _ = run_tspg(["import", gem, "-o", str(case.dir / "o.h5ad")], capsys)
    assert code == 0
    expected = (
        f"{gem}: its 30 rows look like genes (100% gene-like, e.g. G00, G01, G02) and its 60 "
        "columns like samples (e.g. s000, s001, s002): is the file genes x samples? Then read "
        "it with --transpose"
    )
    assert expected in caplog.text
    assert "30 samples x 60 genes" in out  # read as asked
    import anndata as ad

    written = ad.read_h5ad(case.dir / "o.h5ad")
    assert written.shape == (30, 60) and list(written.uns["tspg_import"]["warnings"]) == [expected]
    caplog.clear()
    code, *_ = run_tspg(["import", gem, "--transpose", "-o", str(case.dir / "t.h5ad")], capsys)
    assert code == 0 and "look like genes" not in caplog.text


def test_tspg_list_escapes_control_characters(case: Case, capsys):
    """A folder name with a line break and a tab is listed on one line, its columns intact."""
    case.bundle_named("a\nb\tc")
    case.bundle_named("good")
    code, out, _ = run_tspg(["list", "--models", str(case.models)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("a\\nb\\tc\t") and lines[0].count("\t") == 5
    assert lines[1].startswith("good\ttiny\tbeta\t30 genes\t")


# ----------------------------------------------------------------------------- permission denied


def test_out_without_permission_is_refused_before_training(quick_bundle):
    """An --out the user may not write into, refused before training (as user ``nobody``
    when the tests run as root, who may write anywhere)."""
    base = Path(tempfile.mkdtemp())  # not under pytest's tmp_path: that is private to root
    try:
        base.chmod(0o755)
        make_tiny_adata(n_per_class=10).write_h5ad(base / "tiny.h5ad")
        (base / "tiny.h5ad").chmod(0o644)
        (base / "models").mkdir(mode=0o755)  # root's: others may not write
        before = snapshot(base)

        def run() -> tuple[int, str]:
            err = io.StringIO()
            argv = ["train", str(base / "tiny.h5ad"), "--label-key", "cell_type"]
            argv += ["--target", "beta", *SMALL]
            with contextlib.redirect_stderr(err):
                code = main([*argv, "--out", str(base / "models")])
                code2 = main([*argv, "--out", str(base / "models" / "sub")])
            return code, code2, err.getvalue()

        code, code2, err = _as_nobody(run)
        assert (code, code2) == (2, 2)
        assert err.splitlines() == [
            f"error: {base}/models: cannot write bundles here (permission denied)",
            f"error: {base}/models/sub: cannot write bundles here (permission denied)",
        ]
        assert snapshot(base) == before
    finally:
        shutil.rmtree(base)


# ----------------------------------------------------------------------------- a failure after the first bundle


def test_a_failure_after_the_first_bundle_keeps_it(tmp_path):
    """Each bundle is saved as soon as its generator is trained: when the second cannot be
    saved (here another process took its name meanwhile), the first is kept, and the message
    names the class that failed and the bundles that are saved."""
    adata = make_tiny_adata(n_per_class=10)
    models = tmp_path / "models"
    config = TrainConfig(
        seeds=1,
        epochs=2,
        target_epochs=2,
        batch_size=32,
        gen_encoder=(32, 16),
        gen_residual=1,
        gen_decoder=(32,),
        disc_hidden=(32, 16),
        target_hidden=(32, 16),
    )

    def meanwhile(bundle):  # after the first bundle is saved, its neighbour's name is taken
        if bundle.target == "alpha":
            (models / "tiny-beta").mkdir()

    with pytest.raises(UserError) as err:
        train_all_targets(
            adata,
            label_key="cell_type",
            targets=["alpha", "beta", "gamma"],
            config=config,
            dataset="tiny",
            device="cpu",
            out=models,
            on_bundle=meanwhile,
        )
    assert str(err.value) == (
        f"generator for class 'beta': {models}/tiny-beta: a bundle of that name exists; pass "
        f"--overwrite or choose --name (the 1 bundle(s) trained before it are saved in {models}: "
        "tiny-alpha)"
    )
    entries = {e.name: e.error for e in list_bundles(models)}
    assert entries["tiny-alpha"] is None and "not a bundle" in entries["tiny-beta"]
    assert load_bundle(models / "tiny-alpha").target == "alpha"
    assert sorted(p.name for p in models.iterdir()) == ["tiny-alpha", "tiny-beta"]


def test_check_run_is_the_api_of_the_up_front_checks(tmp_path):
    """The same checks, for the app and the sweep: the plan of a run, nothing written."""
    adata = make_tiny_adata(n_per_class=10)
    adata = adata[adata.obs_names != "s001"].copy()  # alpha: 9
    plan = check_run(adata, label_key="cell_type", dataset="tiny", out=tmp_path / "m")
    assert plan.targets == ["alpha", "beta", "gamma"]
    assert plan.names == ["tiny-alpha", "tiny-beta", "tiny-gamma"]
    assert plan.skipped == {} and plan.n_train == {"alpha": 7, "beta": 8, "gamma": 8}
    assert plan.out == tmp_path / "m" and not (tmp_path / "m").exists()
    cfg = TrainConfig(test_size=0.85)  # alpha keeps 1 of 9, beta and gamma 2 of 10
    plan = check_run(adata, label_key="cell_type", config=cfg, dataset="tiny")
    assert plan.targets == ["beta", "gamma"] and list(plan.skipped) == ["alpha"]
    with pytest.raises(UserError, match="class 'alpha' cannot be a target: it keeps 1 of its 9"):
        check_run(adata, label_key="cell_type", targets=["alpha"], config=cfg, dataset="tiny")
    with pytest.raises(UserError, match="would both be saved as bundle 'x'"):
        check_run(adata, label_key="cell_type", targets=["beta", "gamma"], names=["x", "x"])
