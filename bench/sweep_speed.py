"""Sweep speed on Dask: generators per hour with 1 and 2 workers, the engine's overhead per
task against calling ``tspg.train`` in a loop, and a projection of the paper's full grid.

A GTEx-like synthetic GEM (``tspg.datasets.synthetic_gem``: 53 classes, unequal class sizes)
and Hallmark-like gene sets (random genes, 30-200 per set), scaled down to finish in a few
minutes on 2 CPU cores: by default 1,500 samples x 2,000 genes, 3 gene sets x 3 targets
(9 generators and 3 target models per run), the tspg+ recipe with few epochs.

Each repeat runs, back to back: the loop (per gene set, ``tspg.train`` of the first target,
then ``tspg.train(..., target_model=<that bundle>)`` for the others, each bundle saved; in
this process, 1 torch thread), then the sweep on a warm local cluster of 1 worker and of 2
workers (1 torch thread each; ``--two-threads`` adds 1 worker x 2 threads). Ratios are taken within each repeat, then
the median over repeats. The clusters are started and warmed up (torch and tspg imported,
one optimiser step) before the timing, which is reported apart.

    python bench/sweep_speed.py                      # 3 repeats, a few minutes
    python bench/sweep_speed.py --repeats 1 --sets 2 --targets 3   # a quick look

The projection of the paper's grid (53 targets x 50 gene sets: 50 target models and 2,650
generators) on 1, 2 and 64 workers scales the measured seconds per epoch to GTEx's 11,688
samples (linearly in samples) and the tspg+ recipe's 60 generator and 30 target-model epochs,
adds the measured per-task overhead, and schedules the tasks as Dask does here (target
models first, each generator after its gene set's target model) on workers that each have
their own core, slowed by the parallel efficiency measured with 2 workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GTEX_SAMPLES, GRID_SETS, GRID_TARGETS = 11_688, 50, 53


def warm() -> float:
    """Import torch and tspg and take one optimiser step (a worker's one-time start-up)."""
    start = time.perf_counter()
    import torch

    import tspg.metrics  # noqa: F401
    import tspg.pipeline  # noqa: F401

    m = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(m.parameters())
    m(torch.zeros(2, 4)).sum().backward()
    opt.step()
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cluster_cpu(client) -> float:
    """CPU seconds of this process (client and, for a local cluster, the scheduler) and of
    every worker process."""
    return cpu_seconds() + sum(client.run(cpu_seconds).values())


def make_grid(args):
    from tspg.datasets import synthetic_gem
    from tspg.sweep import GeneSet

    adata = synthetic_gem(args.samples, args.genes, 53, seed=0)
    rng = np.random.default_rng(1)
    genes = np.asarray(adata.var_names)
    sizes = np.linspace(30, 200, args.sets).round().astype(int)  # Hallmark-like: 30-200 genes
    sets = [
        GeneSet(f"HALLMARK_LIKE_{i:02d}", tuple(rng.choice(genes, size=n, replace=False)))
        for i, n in enumerate(sizes)
    ]
    classes = sorted(adata.obs["label"].astype(str).unique())
    targets = classes[: args.targets]
    return adata, sets, targets


def run_loop(adata, sets, targets, config, out: Path) -> float:
    """The grid with tspg.train in a loop (1 torch thread, this process); wall seconds."""
    import torch

    import tspg
    from tspg.genesets import match_gene_set

    torch.set_num_threads(1)
    start = time.perf_counter()
    for gs in sets:
        genes = match_gene_set(gs.name, gs.genes, adata.var_names)
        first = None
        for t in targets:
            b = tspg.train(
                adata,
                label_key="label",
                target=t,
                config=config,
                genes=None if first else genes,
                target_model=first,
                dataset="bench",
                device="cpu",
                name=f"loop-{gs.name}-{t}".lower(),
            )
            tspg.save_bundle(b, out)
            first = first or b
    return time.perf_counter() - start


def run_sweep(
    adata, sets, targets, config, out: Path, client, threads: int
) -> tuple[float, object]:
    from tspg.sweep import sweep

    start = time.perf_counter()
    table = sweep(
        adata,
        label_key="label",
        gene_sets=sets,
        targets=targets,
        config=config,
        out=out,
        dataset="bench",
        device="cpu",
        client=client,
        threads=threads,
    )
    wall = time.perf_counter() - start
    bad = table[table["status"] != "trained"]
    if len(bad):
        raise SystemExit(f"sweep failed: {bad[['bundle', 'error']].to_string()}")
    return wall, table


def summaries_seconds(out: Path, adata) -> float:
    """Median seconds of the results table's extra work per generator (the consensus top
    genes), timed on the loop's bundles in this process."""
    import tspg
    from tspg.pipeline import prepare
    from tspg.sweep import sweep_summaries

    times = []
    for path in sorted(out.iterdir())[:4]:
        b = tspg.load_bundle(path)
        prep = prepare(adata, label_key="label", reuse=b, dataset="bench")
        start = time.perf_counter()
        sweep_summaries(b, prep)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def schedule(n_workers: int, tm: float, gen: float, n_sets: int, n_targets: int) -> float:
    """Wall time of the grid on ``n_workers`` single-task workers: target models first (as
    their priority makes Dask run them), each generator once its target model is done."""
    import heapq

    free = [0.0] * n_workers  # when each worker is next free
    ready = []  # when each gene set's target model is done
    for _ in range(n_sets):
        t = heapq.heappop(free)
        ready.append(t + tm)
        heapq.heappush(free, t + tm)
    end = 0.0
    for s in sorted(ready):
        for _ in range(n_targets):
            t = max(heapq.heappop(free), s)
            heapq.heappush(free, t + gen)
            end = max(end, t + gen)
    return end


def fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1500)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--sets", type=int, default=3, help="gene sets (sizes 30-200)")
    p.add_argument("--targets", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4, help="generator epochs")
    p.add_argument("--target-epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--two-threads",
        action="store_true",
        help="also time 1 worker x 2 torch threads (on a busy machine, spinning threads make it "
        "many times slower)",
    )
    args = p.parse_args()

    import distributed

    from tspg.bundle import read_manifest
    from tspg.config import TrainConfig
    from tspg.sweep import quiet_dask

    quiet_dask()
    adata, sets, targets = make_grid(args)
    config = TrainConfig(epochs=args.epochs, target_epochs=args.target_epochs)
    n_gen = len(sets) * len(targets)
    load_start = os.getloadavg()[0]

    t0 = time.perf_counter()
    clusters = {
        w: distributed.LocalCluster(
            n_workers=w, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        for w in (1, 2)
    }
    clients = {w: distributed.Client(c) for w, c in clusters.items()}
    for c in clients.values():
        c.run(warm)
    warm_up = time.perf_counter() - t0
    warm()  # this process too, for the loop
    # the idle cluster's own CPU use (heartbeats, monitors): part of the engine's cost,
    # which grows with the wall time (and so with a busy machine)
    before, t1 = cluster_cpu(clients[1]), time.perf_counter()
    time.sleep(10)
    idle_rate = (cluster_cpu(clients[1]) - before) / (time.perf_counter() - t1)

    settings = [("loop", None, 1), ("sweep", 1, 1), ("sweep", 2, 1)]
    if args.two_threads:
        settings.insert(2, ("sweep", 1, 2))
    walls = {s: [] for s in settings}
    cpus = {s: [] for s in settings}
    per_epoch = {"gen": [], "tm": []}
    root = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        for rep in range(args.repeats):
            for s in settings:
                kind, workers, threads = s
                out = root / f"{kind}-{workers}-{threads}-{rep}"
                cpu = cpu_seconds() if kind == "loop" else cluster_cpu(clients[workers])
                if kind == "loop":
                    wall = run_loop(adata, sets, targets, config, out)
                else:
                    wall, table = run_sweep(
                        adata, sets, targets, config, out, clients[workers], threads
                    )
                walls[s].append(wall)
                after = cpu_seconds() if kind == "loop" else cluster_cpu(clients[workers])
                cpus[s].append(after - cpu)
                if kind == "loop":
                    # seconds per epoch on a core of its own: the bundles' wall times per
                    # epoch times the share of a core this process had during the loop
                    share = cpus[s][-1] / wall
                    for path in sorted(out.iterdir()):
                        m = read_manifest(path)["metrics"]
                        per_epoch["gen"].append(share * m["train_seconds_generator"] / args.epochs)
                        if m["train_seconds_target_model"]:
                            per_epoch["tm"].append(
                                share * m["train_seconds_target_model"] / args.target_epochs
                            )
                    if rep == 0:
                        summ = summaries_seconds(out, adata)
                shutil.rmtree(out, ignore_errors=True)
                print(
                    f"repeat {rep + 1}: {kind} {workers or ''} {threads}: {wall:.1f} s",
                    file=sys.stderr,
                )
    finally:
        for c in clients.values():
            c.close()
        for c in clusters.values():
            c.close()
        shutil.rmtree(root, ignore_errors=True)
    load_end = os.getloadavg()[0]

    med = {s: statistics.median(v) for s, v in walls.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(walls[a], walls[b], strict=True))  # noqa: E731
    loop, one, one2, two = settings[0], ("sweep", 1, 1), ("sweep", 1, 2), ("sweep", 2, 1)
    print(
        f"machine: {os.cpu_count()} cores, shared with other sessions (load average {load_start:.1f} "
        f"at the start, {load_end:.1f} at the end); torch {__import__('torch').__version__}"
    )
    print(
        f"grid: {len(sets)} gene sets ({', '.join(str(len(s.genes)) for s in sets)} genes) x "
        f"{len(targets)} targets = {n_gen} generators and {len(sets)} target models; GEM "
        f"{args.samples} samples x {args.genes} genes, 53 classes; tspg+ with {args.epochs} "
        f"generator and {args.target_epochs} target-model epochs; {args.repeats} repeats, medians\n"
    )
    print(
        "| setting | wall s | generators / hour | speed vs the loop | CPU s | CPU s per generator |"
    )
    print("|---|---|---|---|---|---|")
    names = {
        loop: "tspg.train in a loop, 1 thread",
        one: "sweep, 1 worker x 1 thread",
        one2: "sweep, 1 worker x 2 threads",
        two: "sweep, 2 workers x 1 thread",
    }
    for s in settings:
        speed = "1" if s == loop else f"{ratio(loop, s):.2f}"
        cpu = statistics.median(cpus[s])
        print(
            f"| {names[s]} | {med[s]:.1f} | {3600 * n_gen / med[s]:.0f} | {speed} | {cpu:.1f} "
            f"| {cpu / n_gen:.2f} |"
        )
    r21 = ratio(one, two)
    over = statistics.median(
        (s - lp) / n_gen for s, lp in zip(walls[one], walls[loop], strict=True)
    )
    per_gen_loop = med[loop] / n_gen
    over_cpu = statistics.median(
        (s - lp) / n_gen for s, lp in zip(cpus[one], cpus[loop], strict=True)
    )
    per_gen_cpu = statistics.median(cpus[loop]) / n_gen
    cpu_eff = statistics.median(a / b for a, b in zip(cpus[one], cpus[two], strict=True))
    print(f"\n2 workers / 1 worker (1 torch thread each): {r21:.2f}x (goal >= 1.8x)")
    print(
        f"expected on 2 cores of their own, from the CPU seconds (2 x CPU of 1 worker / CPU "
        f"of 2 workers; no idle time assumed): {2 * cpu_eff:.2f}x"
    )
    if one2 in walls:
        best = statistics.median(
            min(a, b) / c for a, b, c in zip(walls[one], walls[one2], walls[two], strict=True)
        )
        print(f"2 workers / the faster of 1 worker x 1 or 2 threads: {best:.2f}x")
    print(
        f"engine overhead per generator (sweep on 1 worker minus the loop, per generator): "
        f"{over:.2f} s = {100 * over / per_gen_loop:.1f}% of the loop's {per_gen_loop:.2f} s "
        f"per generator (goal <= 10%); of it, the results table's top genes: {summ:.2f} s"
    )
    print(
        f"the same in CPU seconds (all processes of the sweep, less sensitive to a busy "
        f"machine): {over_cpu:.2f} s = {100 * over_cpu / per_gen_cpu:.1f}% of the loop's "
        f"{per_gen_cpu:.2f} CPU s per generator"
    )
    print(
        f"of which the idle cluster's background CPU ({idle_rate:.3f} CPU s per wall s, "
        f"times the sweep's wall time): {idle_rate * med[one] / n_gen:.2f} s per generator"
    )
    print(f"cluster start and worker warm-up (not in the times above): {warm_up:.1f} s")

    # projection of the paper's grid
    scale = GTEX_SAMPLES / args.samples
    g_epoch, tm_epoch = statistics.median(per_epoch["gen"]), statistics.median(per_epoch["tm"])
    cfg = TrainConfig()
    gen = g_epoch * scale * cfg.epochs + max(over_cpu, 0.0)
    tm = tm_epoch * scale * cfg.target_epochs + max(over_cpu, 0.0)
    eff = min(1.0, cpu_eff)
    print(
        f"\nprojection, the paper's grid ({GRID_TARGETS} targets x {GRID_SETS} gene sets: "
        f"{GRID_SETS} target models, {GRID_SETS * GRID_TARGETS} generators), GTEx's "
        f"{GTEX_SAMPLES} samples, tspg+ ({cfg.epochs} + {cfg.target_epochs} epochs): "
        f"{gen:.0f} s per generator and {tm:.0f} s per target model on a core of their own "
        f"(per epoch as measured here, scaled by samples, plus the engine's CPU overhead per "
        f"task), each worker on its own core at the CPU efficiency of 2 workers ({eff:.2f})"
    )
    print(
        f"the engine's CPU overhead per task ({max(over_cpu, 0.0):.2f} s) is "
        f"{100 * max(over_cpu, 0.0) / gen:.2f}% of such a generator task (goal <= 10%)"
    )
    print("| workers | wall time |")
    print("|---|---|")
    for w in (1, 2, 64):
        slow = 1.0 if w == 1 else 1 / eff
        wall = schedule(w, tm * slow, gen * slow, GRID_SETS, GRID_TARGETS)
        print(f"| {w} | {fmt_time(wall)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
