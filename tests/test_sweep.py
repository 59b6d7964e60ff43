"""Sweeps on Dask (tspg/sweep.py, ``tspg sweep``): a real LocalCluster of 2 worker processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_NETS

distributed = pytest.importorskip("distributed")

from tspg.bundle import _HOST, load_bundle  # noqa: E402
from tspg.cli import main  # noqa: E402
from tspg.config import TrainConfig  # noqa: E402
from tspg.datasets import synthetic_gem  # noqa: E402
from tspg.errors import UserError  # noqa: E402
from tspg.genesets import write_gmt  # noqa: E402
from tspg.sweep import (  # noqa: E402
    COLUMNS,
    GeneSet,
    jobqueue_cluster,
    read_gene_set_files,
    read_results,
    sweep,
    sweep_genes_df,
)

try:
    import pyarrow  # noqa: F401

    HAVE_PYARROW = True  # the results table is also written as parquet
except ImportError:
    HAVE_PYARROW = False
RESULTS = ["sweep.csv", "sweep.parquet"] if HAVE_PYARROW else ["sweep.csv"]
CONFIG = TrainConfig.for_recipe("tspg+", epochs=2, target_epochs=2, batch_size=32, **SMALL_NETS)
TARGETS = ["class-00", "class-01", "class-02"]


@pytest.fixture(scope="module")
def client():
    """Two worker processes (one task each), offering a GPU resource (for the cuda test)."""
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            resources={"GPU": 1},
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def gem():
    return synthetic_gem(n_samples=90, n_genes=30, n_classes=3, seed=0)


def gene_sets(adata) -> list[GeneSet]:
    g = list(adata.var_names)
    return [
        GeneSet("SET_A", tuple(g[:10])),
        GeneSet("SET_B", tuple(g[8:20])),
        GeneSet("SET_C", tuple(g[18:])),
    ]


def run(adata, out, client, **kw):
    kw = {"gene_sets": gene_sets(adata), "config": CONFIG, "dataset": "syn", **kw}
    return sweep(adata, label_key="label", out=out, client=client, threads=1, **kw)


def tasks_run(client, fn):
    """The keys of the tasks the cluster ran during fn()."""
    with distributed.get_task_stream(client) as ts:
        result = fn()
    return result, sorted({t["key"] for t in ts.data})


def leftovers(out: Path) -> list[str]:
    """Hidden folders and files a sweep must not leave behind (temporary bundles, staging)."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def finished(client, gem, tmp_path_factory):
    """A 3 gene sets x 3 targets sweep, done once; tests that change its folder copy it."""
    out = tmp_path_factory.mktemp("sweep")
    calls = []
    table = run(gem, out, client, progress=lambda row, counts: calls.append((row, counts)))
    return out, table, calls


def test_every_bundle_is_written_and_loadable(finished, gem, client):
    out, table, calls = finished
    assert list(table.columns) == COLUMNS and len(table) == 9
    assert (table["status"] == "trained").all(), table[["bundle", "error"]]
    workers = set(client.scheduler_info(n_workers=-1)["workers"])
    by_set = {}
    for row in table.itertuples(index=False):
        b = load_bundle(out / row.bundle)
        assert (b.target, b.manifest["gene_set"]["name"]) == (row.target, row.gene_set)
        assert b.genes == [g for g in gem.var_names if g in dict(gs_genes(gem))[row.gene_set]]
        assert row.genes == len(b.genes) and row.worker in workers
        assert row.target_model_accuracy == b.metrics["target_model_accuracy"]
        realism = b.manifest["verdict"]["checks"]["realism"]["figures"]
        assert row.e_distance == realism["perturbed"]["value"]
        assert row.e_distance_mean_shift == realism["mean_shift"]["value"]
        assert row.top_up.split(";") == b.manifest["sweep"]["top_up"]
        assert len(row.top_up.split(";")) == min(20, len(b.genes)) and row.wall_seconds > 0
        by_set.setdefault(row.gene_set, []).append(b)
    for bundles in by_set.values():  # one target model (and split) per gene set
        first = bundles[0].target_model.state_dict()
        for b in bundles[1:]:
            assert b.split == bundles[0].split
            for k, v in b.target_model.state_dict().items():
                assert np.array_equal(v.numpy(), first[k].numpy())
    assert leftovers(out) == []
    # the progress callback: the start, then one call per generator; a bar's counts
    assert calls[0][0] is None and calls[0][1] == {"trained": 0, "failed": 0, "total": 9}
    assert [c[1]["trained"] for c in calls[1:]] == list(range(1, 10))


def gs_genes(adata):
    return [(s.name, s.genes) for s in gene_sets(adata)]


def test_results_table_is_read_back(finished):
    out, table, _ = finished
    assert (out / "sweep.csv").exists()
    assert (out / "sweep.parquet").exists() == HAVE_PYARROW
    back = read_results(out)
    assert list(back.columns) == COLUMNS
    pd.testing.assert_series_equal(back["bundle"], table["bundle"])
    assert back["top_up"].map(len).tolist() == [min(20, n) for n in table["genes"]]
    assert back["perturbation_accuracy"].dtype == float
    levels = [load_bundle(out / b).manifest["verdict"]["level"] for b in back["bundle"]]
    assert back["verdict"].tolist() == levels and set(levels) <= {"ok", "caution", "fail"}
    long = sweep_genes_df(back)
    assert set(long.columns) == {"gene_set", "target", "direction", "rank", "gene"}
    assert len(long) == 2 * back["top_up"].map(len).sum()
    if HAVE_PYARROW:
        os.rename(out / "sweep.parquet", out / "hidden.parquet")  # the CSV alone reads the same
        try:
            csv = read_results(out)
        finally:
            os.rename(out / "hidden.parquet", out / "sweep.parquet")
        pd.testing.assert_frame_equal(csv, back)


def test_a_rerun_does_nothing(finished, gem, client):
    out, _, _ = finished
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*")}
    table, keys = tasks_run(client, lambda: run(gem, out, client))
    assert keys == []  # not one task reached the cluster
    assert (table["status"] == "skipped").all()
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*")} == stamps


def test_a_rerun_trains_what_is_missing_with_the_gene_sets_target_model(
    finished, gem, client, tmp_path
):
    out = tmp_path / "resume"
    shutil.copytree(finished[0], out)
    lost = "syn-set-b-class-01"
    shutil.rmtree(out / lost)
    table, keys = tasks_run(client, lambda: run(gem, out, client))
    assert len(keys) == 2 and any("target-model-set-b" in k for k in keys)  # reused, not trained
    assert table.set_index("bundle")["status"].to_dict() == {
        b: "trained" if b == lost else "skipped" for b in table["bundle"]
    }
    new, sibling = load_bundle(out / lost), load_bundle(out / "syn-set-b-class-00")
    assert new.manifest["target_model_from"] in {"syn-set-b-class-00", "syn-set-b-class-02"}
    for k, v in new.target_model.state_dict().items():
        assert np.array_equal(v.numpy(), sibling.target_model.state_dict()[k].numpy())


def test_an_existing_bundle_of_other_settings_is_never_replaced(finished, gem, client, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(finished[0], out)
    with pytest.raises(
        UserError,
        match=r"syn-set-a-class-00: a bundle of that name holds other settings \(epochs = 2, not 3\)",
    ):
        run(gem, out, client, config=replace(CONFIG, epochs=3))


class KillOnce(distributed.WorkerPlugin):
    """Kill this worker's process (SIGKILL) while it runs its first generator task, once in
    the whole cluster (the marker file says it happened, and in which task)."""

    def __init__(self, marker: str, delay: float):
        self.marker, self.delay = marker, delay

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or not str(key).startswith("tspg-generator-"):
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)

        def kill():
            ts = self.worker.state.tasks.get(key)
            Path(self.marker).write_text(f"{key} {ts.state if ts else 'gone'}")
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Timer(self.delay, kill).start()


@pytest.fixture
def own_client():
    """Two worker processes of its own, for a test that kills one (the module's cluster
    need not wait for the nanny to bring it back: slow on a busy machine)."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def test_a_worker_killed_in_a_task_leaves_no_half_bundle(gem, own_client, tmp_path):
    client = own_client
    out, marker = tmp_path / "killed", tmp_path / "killed.marker"
    slow = replace(CONFIG, epochs=200)  # still running when the kill comes, on a fast machine too
    gone = subprocess.Popen(["true"])  # a process id that no longer runs
    gone.wait()
    # what a save killed in an earlier run left half written (its writer's pid and host)
    stale = out / f".syn-set-a-class-01.tmp-{gone.pid}-{_HOST}-abcd1234"
    stale.mkdir(parents=True)
    (stale / "generator.safetensors").write_bytes(b"half")
    client.register_plugin(KillOnce(str(marker), 0.1), name="kill-once")
    table = run(gem, out, client, config=slow, gene_sets=gene_sets(gem)[:1])
    key, state = marker.read_text().split()
    assert key.startswith("tspg-generator-syn-set-a-") and state == "executing"
    assert (table["status"] == "trained").all(), table[["bundle", "error"]]
    for name in table["bundle"]:
        load_bundle(out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted([*table["bundle"], *RESULTS])


def test_a_bad_gene_set_is_reported_and_the_rest_finish(client, tmp_path):
    adata = synthetic_gem(n_samples=90, n_genes=30, n_classes=3, seed=1)
    rare = adata.obs_names[:2]  # a class of 2 samples: 1 to train on, too few for a generator
    adata.obs["label"] = adata.obs["label"].cat.add_categories("rare")
    adata.obs.loc[rare, "label"] = "rare"
    sets = [GeneSet("GOOD", tuple(adata.var_names[:12])), GeneSet("BAD", ("NOPE1", "NOPE2"))]
    table, keys = tasks_run(
        client,
        lambda: run(adata, tmp_path, client, gene_sets=sets, targets=["class-00", "rare"]),
    )
    rows = table.set_index(["gene_set", "target"])
    assert rows.loc[("GOOD", "class-00"), "status"] == "trained"
    for target in ("class-00", "rare"):
        assert rows.loc[("BAD", target), "error"] == "none of the 2 genes of 'BAD' are in the GEM"
    assert rows.loc[("GOOD", "rare"), "error"] == (
        "the target class has 1 training samples; at least 2 are needed"
    )
    assert rows.loc[("GOOD", "rare"), "status"] == "failed"
    assert len(keys) == 3  # GOOD's target model and 2 generators; a bad input is not retried
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*RESULTS, "syn-good-class-00"])


def test_cuda_tasks_ask_for_a_gpu_resource(gem, client, tmp_path):
    """The workers offer GPU=1, so the tasks run (and say there is no CUDA on this machine)."""
    table = run(gem, tmp_path, client, device="cuda", gene_sets=gene_sets(gem)[:1])
    assert (table["status"] == "failed").all()
    assert table["error"].str.fullmatch("target model: .*no CUDA GPU is available.*").all()
    assert not (tmp_path / table["bundle"][0]).exists()


def test_cuda_without_gpu_workers_is_refused(gem, tmp_path):
    with (
        distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as c,
        pytest.raises(UserError, match="no Dask worker offers a GPU resource.*--resources GPU=1"),
    ):
        run(gem, tmp_path, c, device="cuda", gene_sets=gene_sets(gem)[:1])
    assert leftovers(tmp_path) == []


def test_the_command_line_on_a_running_scheduler(gem, client, tmp_path, capsys):
    data, gmt = tmp_path / "syn.h5ad", tmp_path / "sets.gmt"
    gem.write_h5ad(data)
    write_gmt(dict(gs_genes(gem)), gmt)
    out = tmp_path / "models"
    argv = [
        "sweep",
        str(data),
        "--label-key",
        "label",
        "--gene-sets",
        str(gmt),
        "--sets",
        "SET_A",
        "SET_C",
    ]
    argv += ["--targets", "class-00", "--scheduler", client.scheduler.address, "--out", str(out)]
    argv += ["--epochs", "2", "--target-epochs", "2", "--gen-residual", "1", "--threads", "1", "-q"]
    argv += ["--seeds", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert (
        "sweep of 2 gene sets x 1 targets: 2 trained, 0 skipped (finished earlier), 0 failed"
        in text
    )
    assert f"results: {out / 'sweep.csv'}" in text
    assert sorted(read_results(out)["bundle"]) == ["syn-set-a-class-00", "syn-set-c-class-00"]
    assert main(argv) == 0
    assert "0 trained, 2 skipped" in capsys.readouterr().out


def test_gene_set_files_and_filters(gem, tmp_path):
    g = list(gem.var_names)
    gmt = write_gmt(
        {"HALLMARK_A": g[:5], "HALLMARK_B": [*g[5:8], "X1", "X2"], "OTHER": g}, tmp_path / "h.gmt"
    )
    ref = tmp_path / "ref.txt"
    ref.write_text("REF_SET\t" + "\t".join(g[:3]) + "\n")
    sets = read_gene_set_files([gmt, ref])
    assert [s.name for s in sets] == ["HALLMARK_A", "HALLMARK_B", "OTHER", "REF_SET"]
    assert sets[3].genes == tuple(g[:3]) and sets[3].source == str(ref.resolve())
    pick = read_gene_set_files([gmt, ref], names=["HALLMARK_*", "REF_SET"])
    assert [s.name for s in pick] == ["HALLMARK_A", "HALLMARK_B", "REF_SET"]
    # sizes count the genes in the GEM when its genes are given (HALLMARK_B: 3 of 5)
    sized = read_gene_set_files([gmt], min_genes=4, max_genes=10, gem_genes=gem.var_names)
    assert [s.name for s in sized] == ["HALLMARK_A"]
    assert [s.name for s in read_gene_set_files([gmt], min_genes=4, max_genes=10)] == [
        "HALLMARK_A",
        "HALLMARK_B",
    ]
    with pytest.raises(UserError, match="no gene set is named 'HALLMARK_Z'"):
        read_gene_set_files([gmt], names=["HALLMARK_Z"])
    with pytest.raises(UserError, match=r"h2.gmt: gene set 'OTHER' is also in .*h.gmt"):
        read_gene_set_files([gmt, write_gmt({"OTHER": g[:2]}, tmp_path / "h2.gmt")])
    with pytest.raises(UserError, match="no gene set is left after the name and size filters"):
        read_gene_set_files([gmt], min_genes=100)


def test_bad_arguments_fail_before_anything_runs(gem, tmp_path):
    with pytest.raises(UserError, match="target 'class-09' is not among the 3 classes of 'label'"):
        sweep(gem, label_key="label", targets=["class-09"], out=tmp_path)
    with pytest.raises(UserError, match="workers must be at least 1"):
        sweep(gem, label_key="label", workers=0, out=tmp_path)
    with pytest.raises(UserError, match="would share the bundle name 'data-a-b-class-00'"):
        sweep(
            gem,
            label_key="label",
            gene_sets={"A B": ["gene-00001"], "a-b": ["gene-00002"]},
            out=tmp_path,
        )
    assert list(tmp_path.iterdir()) == []


def test_dry_run_plans_and_starts_nothing(gem, tmp_path):
    table = sweep(gem, label_key="label", gene_sets=gene_sets(gem), dry_run=True, out=tmp_path)
    assert len(table) == 9 and (table["status"] == "to train").all()
    assert list(tmp_path.iterdir()) == []


def readme_jobqueue_examples() -> list[dict]:
    """The YAML blocks of the README's Sweeps section (the SLURM examples)."""
    import yaml

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Sweeps") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    return [yaml.safe_load(b) for b in blocks]


@pytest.mark.parametrize("example", [0, 1], ids=["cpu", "gpu"])
def test_the_readmes_slurm_examples_build_a_cluster_without_submitting(example):
    """SLURM cannot run here: build the SLURMCluster object from the README's configuration
    and read its job script (no job is submitted until cluster.scale)."""
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    import dask

    config = readme_jobqueue_examples()[example]["jobqueue"]["slurm"]
    # dask-jobqueue reads its config again for each job (script), as from jobqueue.yaml
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in config.items()}):
        cluster = jobqueue_cluster("slurm", scheduler_options={"dashboard_address": ":0"})
        try:
            assert isinstance(cluster, dask_jobqueue.SLURMCluster) and not cluster.workers
            script = cluster.job_script()
        finally:
            cluster.close()
    cores, processes = config["cores"], config["processes"]
    assert f"#SBATCH -p {config['queue']}" in script
    assert f"#SBATCH --cpus-per-task={cores}" in script
    assert f"#SBATCH -t {config['walltime']}" in script
    assert config["job-script-prologue"][0] in script
    assert f"--nthreads {cores // processes}" in script and f"--nworkers {processes}" in script
    for directive in config.get("job-extra-directives", []):
        assert f"#SBATCH {directive}" in script
    if example == 1:
        assert "--resources GPU=1" in script


def test_the_command_line_offers_every_jobqueue():
    from tspg.cli import SWEEP_JOBQUEUES
    from tspg.sweep import JOBQUEUES

    assert SWEEP_JOBQUEUES == sorted(JOBQUEUES)


def test_a_jobqueue_without_configuration_is_a_clear_error():
    pytest.importorskip("dask_jobqueue")
    import dask

    with (
        dask.config.set({"jobqueue.slurm.cores": None}),
        pytest.raises(
            UserError,
            match=r"--jobqueue slurm: .* \(set jobqueue.slurm in ~/.config/dask/jobqueue.yaml\)",
        ),
    ):
        jobqueue_cluster("slurm")


def test_the_command_lines_dry_run_shows_the_plan_and_the_job_script(gem, tmp_path, capsys):
    pytest.importorskip("dask_jobqueue")
    import dask

    data, out = tmp_path / "syn.h5ad", tmp_path / "models"
    gem.write_h5ad(data)
    config = readme_jobqueue_examples()[1]["jobqueue"]["slurm"]
    argv = ["sweep", str(data), "--label-key", "label", "--out", str(out), "--dry-run"]
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in config.items()}):
        assert main([*argv, "--jobqueue", "slurm", "--jobs", "3", "--device", "cuda"]) == 0
    text = capsys.readouterr().out
    assert "dry run: 1 gene sets x 3 targets: 3 to train, 0 finished earlier, 0 cannot run" in text
    assert "the slurm job script (3 job(s) would be submitted):" in text
    assert "#SBATCH --gres=gpu:1" in text and "--resources GPU=1" in text
    assert not out.exists()


def test_an_interrupted_sweep_writes_what_finished(gem, client, tmp_path):
    def stop(row, counts):
        if row is not None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(gem, tmp_path, client, gene_sets=gene_sets(gem)[:1], progress=stop)
    table = read_results(tmp_path)
    assert sorted(table["status"]) == ["failed", "failed", "trained"]
    stopped = table[table["status"] == "failed"]
    assert stopped["error"].eq("the sweep stopped before this task finished").all()
    assert not list(tmp_path.glob(".sweep-*"))  # the staging folder is gone
    while client.processing() and any(client.processing().values()):  # let cancelled tasks end
        time.sleep(0.1)


def test_sweep_help_imports_neither_torch_nor_dask():
    code = (
        "import sys, contextlib, io\n"
        "from tspg.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['sweep', '--help'])\n"
        "heavy = [m for m in ('torch', 'anndata', 'pandas', 'distributed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_sparse_gem_sweeps_and_reruns(gem, client, tmp_path):
    """A sparse GEM's slices stay sparse, and the bundles' fingerprints match the plan's, so
    a rerun skips them."""
    import scipy.sparse as sp

    sparse = gem.copy()
    X = np.asarray(sparse.X)
    X[X < np.median(X)] = 0  # half the values zero
    sparse.X = sp.csr_matrix(X)
    kw = {"gene_sets": gene_sets(gem)[:1], "targets": ["class-00", "class-01"]}
    first = run(sparse, tmp_path, client, **kw)
    assert (first["status"] == "trained").all(), first[["bundle", "error"]]
    again, keys = tasks_run(client, lambda: run(sparse, tmp_path, client, **kw))
    assert keys == [] and (again["status"] == "skipped").all()
