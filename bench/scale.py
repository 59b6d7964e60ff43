"""Real-sized data: peak memory and times of the big-data paths (prints tables; not a test).

Two parts, each a table:

``atlas``
    A synthetic single-cell atlas (``tspg.datasets.write_atlas_gem``: 300,000 cells x
    20,000 genes, about 5% non-zero, log1p, CSR) written once as .h5ad under ``--workdir``
    (default /tmp/tspg_scale, never the repo). ``tspg-train --n-top-genes 2000`` on it,
    read on disk (``--backed``): peak memory (RSS of the child process), time from launch to
    the first training step, seconds per 1,000 steps of the target model and of the
    generator, wall time. Side by side, on a subset that fits in memory dense
    (``--dense-cells``, default 30,000 cells, all genes): the dense path of the code before
    this work (``--before``: a source tree; it reads the whole matrix dense, then keeps the
    same 2,000 genes given as ``--genes``) and the sparse path.

``memory``
    20,000 x 5,000 dense (``tspg.datasets.synthetic_gem``), as a CSV: ``tspg import`` and
    ``tspg perturb`` (every sample) peak memory, wall time and output size, before
    (``--before``) and after.

Each command runs in its own child process (``nice``), measured with
``resource.getrusage(RUSAGE_CHILDREN)`` from a small wrapper process; the first training
step is marked by wrapping ``tspg.pipeline.fit_target``. The tree measured is put first on
PYTHONPATH (``--after``, default this checkout; give a tree that also holds the step
budget of the training loops to use ``--steps``).

Examples::

    python bench/scale.py atlas --before /tmp/tspg_scale/before --after /tmp/tspg_scale/merged --steps 300
    python bench/scale.py memory --before /tmp/tspg_scale/before --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The child: run a command, stream its stderr, note when marker lines appear, report the
# peak RSS of its own children (the command) as JSON on its last stdout line.
WRAPPER = r"""
import json, resource, subprocess, sys, time
markers, cmd = json.loads(sys.argv[1]), sys.argv[2:]
t0 = time.perf_counter()
marks = {}
p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
import threading
lines = []
def pump(stream, sink):
    for line in stream:
        sink.append(line)
t = threading.Thread(target=pump, args=(p.stdout, lines)); t.start()
for line in p.stderr:
    for m in markers:
        if m in line and m not in marks:
            marks[m] = time.perf_counter() - t0
    sys.stderr.write(line)
p.wait(); t.join()
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall": time.perf_counter() - t0, "peak": use.ru_maxrss * 1024,
                  "cpu": use.ru_utime + use.ru_stime, "marks": marks, "stdout": "".join(lines)[-2000:]}))
"""

# Train through the CLI with a marker printed when the target model's training begins
TRAIN_DRIVER = r"""
import os, sys
import tspg.pipeline as P
if os.environ.get("TSPG_BENCH_CSR"):  # the training loops keep a sparse matrix sparse on the CPU
    import tspg.training as T
    T.device_budget = lambda device: 0
_fit = P.fit_target
def marked(*a, **k):
    print("TSPG_BENCH first training step", file=sys.stderr, flush=True)
    return _fit(*a, **k)
P.fit_target = marked
from tspg.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""

FIRST_STEP = "TSPG_BENCH first training step"


def run(
    tree: Path, args: list[str], *, markers=(), log: Path | None = None, env: dict | None = None
) -> dict:
    """Run ``python args...`` with ``tree`` first on PYTHONPATH, measured; returns the figures."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1", **(env or {}))
    cmd = ["nice", "-n", "10", sys.executable, "-c", WRAPPER, json.dumps(list(markers))]
    cmd += [sys.executable, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if log is not None:
        log.write_text(proc.stderr)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"the wrapper failed:\n{proc.stderr[-3000:]}") from None
    if result["rc"] != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        print(f"  ! exit {result['rc']}: {' | '.join(tail)}", file=sys.stderr)
    return result


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    out = [line, "  ".join("-" * widths[c] for c in columns)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- atlas


def make_atlas(path: Path, cells: int, genes: int) -> None:
    if path.exists():
        return
    print(f"writing {path} ({cells} x {genes}, ~5% non-zero) ...", file=sys.stderr)
    t = time.perf_counter()
    subprocess.run(
        ["nice", "-n", "10", sys.executable, "-c",
         f"from tspg.datasets import write_atlas_gem; write_atlas_gem({str(path)!r}, {cells}, {genes})"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True,
    )  # fmt: skip
    print(f"  written in {time.perf_counter() - t:.0f} s", file=sys.stderr)


def make_subset(src: Path, path: Path, cells: int) -> None:
    """The first ``cells`` cells of ``src`` (read on disk), written as a sparse .h5ad."""
    if path.exists():
        return
    code = (
        "import anndata as ad, numpy as np\n"
        "from tspg.data import read_gem, rows_matrix\n"
        f"a = read_gem({str(src)!r}, backed=True)\n"
        f"rows = np.arange({cells})\n"
        "sub = ad.AnnData(X=rows_matrix(a, rows), obs=a.obs.iloc[rows].copy(), var=a.var.copy())\n"
        f"sub.write_h5ad({str(path)!r})\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True
    )


def hvg_list(data: Path, n: int, out: Path) -> None:
    """The genes --n-top-genes chooses (the training split of the default split seed)."""
    if out.exists():
        return
    code = (
        "from tspg.data import read_gem, stratified_split\n"
        "from tspg.genesets import highly_variable_genes\n"
        f"a = read_gem({str(data)!r}, label_key='cell_type')\n"
        "tr, _ = stratified_split(a.obs['cell_type'].astype(str).to_numpy(), seed=0)\n"
        f"sel = highly_variable_genes(a, {n}, rows=tr)\n"
        f"open({str(out)!r}, 'w').write('\\n'.join(sel.genes) + '\\n')\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True
    )


def train_case(
    tree: Path, data: Path, label: str, extra: list[str], workdir: Path, env: dict | None = None
) -> dict:
    name = "bench-" + "".join(c if c.isalnum() else "-" for c in label).strip("-")
    out = workdir / "models"
    args = [
        "-c", TRAIN_DRIVER, str(data), "--label-key", "cell_type", "--target", "type-00",
        "--threads", "1", "--out", str(out), "--name", name, "--overwrite", "-q", *extra,
    ]  # fmt: skip
    r = run(tree, args, markers=[FIRST_STEP], log=workdir / f"{name}.log", env=env)
    row = {
        "case": label,
        "peak GB": gb(r["peak"]),
        "wall s": f"{r['wall']:.0f}",
        "CPU s": f"{r['cpu']:.0f}",
    }
    first = r["marks"].get(FIRST_STEP)
    row["first step s"] = f"{first:.1f}" if first is not None else "n/a"
    manifest = out / name / "manifest.json"
    if r["rc"] == 0 and manifest.exists():
        m = json.loads(manifest.read_text())
        row.update(steps_per_1000(m, data))
    else:
        row["note"] = f"exit {r['rc']}"
    return row


def steps_per_1000(m: dict, data: Path) -> dict:
    """Seconds per 1,000 steps of the target model and the generator, from a manifest.

    Steps: the budget when one was given (or recorded), else epochs x batches per epoch
    (the target model on every training sample, the generator on the non-target ones).
    """
    import math

    import h5py
    from anndata.io import read_elem

    cfg, met = m["config"], m["metrics"]
    train = m["split"]["train"]
    with h5py.File(data, "r") as f:
        obs = read_elem(f["obs"])
    n_target = int((obs.loc[train, m["label_key"]].astype(str) == m["target"]).sum())
    steps_f = cfg.get("target_steps") or cfg["target_epochs"] * math.ceil(
        len(train) / cfg.get("target_batch_size", 128)
    )
    steps_g = (
        met.get("train_steps_generator")
        or cfg.get("steps")
        or cfg["epochs"] * math.ceil((len(train) - n_target) / cfg.get("batch_size", 128))
    )
    out = {"genes": len(m["genes"]), "steps f/G": f"{steps_f}/{steps_g}"}
    if met.get("train_seconds_target_model"):
        out["f s/1k steps"] = f"{1000 * met['train_seconds_target_model'] / steps_f:.1f}"
    out["G s/1k steps"] = f"{1000 * met['train_seconds_generator'] / steps_g:.1f}"
    return out


def atlas(args) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    big = work / f"atlas_{args.cells // 1000}k_{args.genes}.h5ad"
    make_atlas(big, args.cells, args.genes)
    rows = []
    budget = (
        ["--target-steps", str(args.steps), "--steps", str(args.steps)]
        if args.steps
        else ["--epochs", "1", "--target-epochs", "1"]
    )
    after = Path(args.after)
    for csr in (False, True) if args.csr_too else (False,):
        rows.append(
            train_case(
                after,
                big,
                f"sparse on disk, {args.cells} x {args.genes}"
                + (", CSR in training" if csr else ""),
                ["--n-top-genes", str(args.n_top_genes), "--backed", *budget],
                work,
                env={"TSPG_BENCH_CSR": "1"} if csr else None,
            )
        )
    if args.dense_cells:
        sub = work / f"atlas_{args.dense_cells // 1000}k_{args.genes}.h5ad"
        make_subset(big, sub, args.dense_cells)
        genes = work / f"hvg_{args.dense_cells // 1000}k_{args.n_top_genes}.txt"
        hvg_list(sub, args.n_top_genes, genes)
        short = ["--epochs", "1", "--target-epochs", "1"]
        if args.before:
            rows.append(
                train_case(
                    Path(args.before),
                    sub,
                    f"before: dense, {args.dense_cells} x {args.genes}",
                    ["--genes", str(genes), *short],
                    work,
                )
            )
        rows.append(
            train_case(
                after,
                sub,
                f"after: sparse, {args.dense_cells} x {args.genes}",
                ["--n-top-genes", str(args.n_top_genes), *short],
                work,
            )
        )
    print(
        f"\ntspg-train, {args.n_top_genes} genes, 1 thread, nice; machine: {os.cpu_count()} cores, shared"
    )
    cols = [
        "case",
        "genes",
        "peak GB",
        "first step s",
        "steps f/G",
        "f s/1k steps",
        "G s/1k steps",
        "wall s",
        "CPU s",
    ]
    print(table(rows, cols + (["note"] if any("note" in r for r in rows) else [])))


# ----------------------------------------------------------------------------- memory


def memory(args) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    csv = work / f"dense_{args.samples}x{args.genes}.csv"
    labels = work / f"dense_{args.samples}x{args.genes}.labels.txt"
    if not csv.exists():
        print(f"writing {csv} ...", file=sys.stderr)
        code = (
            "from tspg.datasets import synthetic_gem\n"
            f"a = synthetic_gem({args.samples}, {args.genes}, 10, seed=0)\n"
            f"a.to_df().to_csv({str(csv)!r}, float_format='%.5g')\n"
            f"a.obs['label'].astype(str).to_csv({str(labels)!r}, sep='\\t', header=False)\n"
        )
        subprocess.run(
            [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True
        )
    trees = [("after", Path(args.after))] + ([("before", Path(args.before))] if args.before else [])
    h5ad = work / "dense_imported.h5ad"
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for name, tree in trees:
            out = work / f"dense_{name}.h5ad"
            r = run(
                tree,
                ["-m", "tspg.cli", "import", str(csv), "--labels", str(labels), "-o", str(out)],
            )
            r["size"] = out.stat().st_size if out.exists() else 0
            results.setdefault(("import", name), []).append(r)
    (work / "dense_after.h5ad").replace(h5ad)
    models = work / "models"
    bundle = models / "bench-dense"
    if not bundle.exists():
        run(
            Path(args.after),
            ["-m", "tspg.cli", "train", str(h5ad), "--label-key", "label", "--target", "class-00",
             "--epochs", "1", "--target-epochs", "1", "--threads", "1", "--out", str(models),
             "--name", "bench-dense", "--overwrite", "-q"],
        )  # fmt: skip
    for _ in range(args.repeats):
        for name, tree in trees:
            out = work / f"perturbed_{name}.h5ad"
            out.unlink(missing_ok=True)
            r = run(tree, ["-m", "tspg.cli", "perturb", str(bundle), str(h5ad), "-o", str(out)])
            r["size"] = out.stat().st_size if out.exists() else 0
            results.setdefault(("perturb", name), []).append(r)
    rows = []
    for (cmd, name), rs in results.items():
        rows.append(
            {
                "command": f"tspg {cmd}",
                "code": name,
                "peak GB (median)": gb(statistics.median(r["peak"] for r in rs)),
                "wall s (median)": f"{statistics.median(r['wall'] for r in rs):.1f}",
                "CPU s (median)": f"{statistics.median(r['cpu'] for r in rs):.1f}",
                "runs": len(rs),
                "output GB": gb(rs[-1]["size"]),
                "exit": ",".join(str(r["rc"]) for r in rs),
            }
        )
    print(
        f"\n{args.samples} x {args.genes} dense ({args.samples * args.genes * 4 / 1e9:.1f} GB as float32); "
        f"import from CSV, perturb every sample; machine shared"
    )
    print(table(rows, list(rows[0])))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("atlas")
    a.add_argument("--cells", type=int, default=300_000)
    a.add_argument("--genes", type=int, default=20_000)
    a.add_argument("--n-top-genes", type=int, default=2000)
    a.add_argument("--steps", type=int, default=0, help="step budget (needs the engine's loops)")
    a.add_argument("--dense-cells", type=int, default=30_000, help="0: no dense comparison")
    a.add_argument(
        "--csr-too",
        action="store_true",
        help="also with the training loops keeping the matrix sparse on the CPU (the engine's "
        "'csr' mode, forced by a zero device budget)",
    )
    m = sub.add_parser("memory")
    m.add_argument("--samples", type=int, default=20_000)
    m.add_argument("--genes", type=int, default=5_000)
    m.add_argument("--repeats", type=int, default=1)
    for q in (a, m):
        q.add_argument("--workdir", default="/tmp/tspg_scale")
        q.add_argument("--before", help="source tree of the code to compare with")
        q.add_argument(
            "--after", default=str(ROOT), help="source tree measured (default: this one)"
        )
    args = p.parse_args(argv)
    atlas(args) if args.part == "atlas" else memory(args)


if __name__ == "__main__":
    main()
