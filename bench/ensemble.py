"""Seed ensembles of TSPG generators: stability of the consensus genes, ranking rules, realism, cost.

Reads the generators cached by bench/ens_cache.py (trained when missing): for each target
class, generators with seeds 0..S-1 against ONE shared target model and split. An
ensemble of N generators reports the mean perturbation P_ens = mean_i (clip(x + G_i(x),
0, 1) - x) over its members; its consensus genes come from one of the ranking RULES over
the held-out non-target samples. Stability = Jaccard of the consensus up-20 (down-20) of
two ensembles with disjoint seed sets.

    python bench/ens_cache.py --dataset demo --targets all --seeds 0-9     # fill the cache first
    python bench/ensemble.py stability --dataset demo --seeds 0-9           # rules x N table, per class
    python bench/ensemble.py stability --dataset planted --seeds 0-5        # + recovery of planted genes
    python bench/ensemble.py realism --dataset demo --seeds 0-9             # ensembles vs single generators
    python bench/ensemble.py stability --dataset demo --f-seeds 0 1 2 --seeds 0-2   # each ensemble its own target model
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import ens_cache as ec
import numpy as np
import torch

from tspg.perturb import consensus_top

K = 20


# ----------------------------------------------------------------------------- ranking rules
# Each rule: (list of P_i over the same rows, k) -> {"up": [gene index...k], "down": [...]}.


def _order(score: np.ndarray, tie: np.ndarray, k: int) -> list[int]:
    """Gene indices by score descending, ties by ``tie`` descending, then gene order."""
    idx = np.arange(len(score))
    return idx[np.lexsort((idx, -tie, -score))][:k].tolist()


def _both(fn, Ps, k):
    return {"up": fn(Ps, k, 1.0), "down": fn(Ps, k, -1.0)}


def rule_count(Ps, k):
    """Today's rule on the ensemble's mean P: samples whose own top-k holds the gene, ties by mean P."""
    P = np.mean(Ps, axis=0)
    out = consensus_top(P, list(range(P.shape[1])), k=k)
    return {d: [int(g) for g in out[d]] for d in out}


def rule_pooled(Ps, k):
    """Count over (sample, generator) pairs whose top-k holds the gene, ties by mean P."""

    def one(Ps, k, sign):
        count = np.zeros(Ps[0].shape[1])
        for P in Ps:
            top = np.argsort(-sign * P, axis=1, kind="stable")[:, :k]
            count += np.bincount(top.reshape(-1), minlength=P.shape[1])
        return _order(count, sign * np.mean(Ps, axis=(0, 1)), k)

    return _both(one, Ps, k)


def rule_mean(Ps, k):
    """Mean P over samples (and generators)."""

    def one(Ps, k, sign):
        m = sign * np.mean(Ps, axis=(0, 1))
        return _order(m, m, k)

    return _both(one, Ps, k)


def rule_median(Ps, k):
    """Median over samples of the ensemble's mean P, ties by mean P."""

    def one(Ps, k, sign):
        P = np.mean(Ps, axis=0)
        return _order(sign * np.median(P, axis=0), sign * P.mean(0), k)

    return _both(one, Ps, k)


def _support(Ps, k, sign, member_rule):
    """Generators whose own consensus top-k (``member_rule``) holds the gene, ties by mean P."""
    d = "up" if sign > 0 else "down"
    support = np.zeros(Ps[0].shape[1])
    for P in Ps:
        support[member_rule([P], k)[d]] += 1
    return _order(support, sign * np.mean(Ps, axis=(0, 1)), k)


def rule_support_count(Ps, k):
    """Support over generators of their own count-rule top-k, ties by the ensemble's mean P."""
    return _both(lambda Ps, k, s: _support(Ps, k, s, rule_count), Ps, k)


def rule_support_mean(Ps, k):
    """Support over generators of their own mean-P top-k, ties by the ensemble's mean P."""
    return _both(lambda Ps, k, s: _support(Ps, k, s, rule_mean), Ps, k)


RULES = {
    "count (today)": rule_count,
    "pooled count": rule_pooled,
    "mean P": rule_mean,
    "median P": rule_median,
    "support of count top-k": rule_support_count,
    "support of mean-P top-k": rule_support_mean,
}


# ----------------------------------------------------------------------------- helpers


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else float("nan")


def disjoint_pairs(seeds: list[int], n: int, max_pairs: int = 60, seed: int = 0):
    """Up to ``max_pairs`` pairs of disjoint n-seed sets drawn from ``seeds`` (all when few)."""
    if 2 * n > len(seeds):
        return []
    rng = np.random.default_rng(seed)
    pairs = set()
    all_pairs = []
    for a in itertools.combinations(seeds, n):
        rest = [s for s in seeds if s not in a]
        for b in itertools.combinations(rest, n):
            if a < b:
                all_pairs.append((a, b))
        if len(all_pairs) > 20_000:
            break
    if len(all_pairs) <= max_pairs:
        return all_pairs
    pick = rng.choice(len(all_pairs), max_pairs, replace=False)
    for i in sorted(pick):
        pairs.add(all_pairs[i])
    return sorted(pairs)


def member_support(Ps, direction: str, k: int = K) -> np.ndarray:
    """Per gene: in how many members' own consensus top-k (today's count rule) it is."""
    sup = np.zeros(Ps[0].shape[1], int)
    for P in Ps:
        sup[rule_count([P], k)[direction]] += 1
    return sup


def load(dataset, target, seeds, f_seed=0, overrides=None):
    return {
        s: ec.generator_P(dataset, target, s, f_seed=f_seed, overrides=overrides)[0] for s in seeds
    }


def fmt(v, spec=".2f"):
    return "-" if v is None or v != v else format(v, spec)


# ----------------------------------------------------------------------------- stability


def stability(args) -> None:
    seeds = ec.parse_seeds(args.seeds)
    overrides = ec.parse_set(args.set)
    f_seeds = [int(s) for s in args.f_seeds]
    ctx = ec.context(args.dataset, f_seeds[0])
    targets = ctx.classes if args.targets == ["all"] else args.targets
    planted = ctx.adata.uns.get("planted")
    rules = {r: RULES[r] for r in (args.rules or RULES)}
    Ns = [int(n) for n in args.n]
    # per (rule, N, target): list of (jaccard up, jaccard down, shared up, shared down)
    res: dict = {}
    calib: dict = {}  # (rule, N, direction) -> [(support of the gene in ensemble a, in b's list?)]
    rec: dict = {}  # recovery of planted genes per (rule, N, target): (up precision, down precision)
    genes = list(ctx.bundle.genes)
    for target in targets:
        rows = ec.source_rows(ctx, target)
        if len(f_seeds) > 1:
            # each ensemble with its own target model: ensembles = (f_seed, seeds[:N])
            members = {f: load(args.dataset, target, seeds, f, overrides) for f in f_seeds}
            P_of = {
                (f, s): members[f][s][ec.source_rows(ec.context(args.dataset, f), target)]
                for f in f_seeds
                for s in seeds
            }
        else:
            Pf = load(args.dataset, target, seeds, f_seeds[0], overrides)
            P_of = {s: Pf[s][rows] for s in seeds}
        for n in Ns:
            if len(f_seeds) > 1:
                groups = [tuple((f, s) for s in seeds[:n]) for f in f_seeds]
                pairs = list(itertools.combinations(groups, 2)) if n <= len(seeds) else []
            else:
                pairs = disjoint_pairs(seeds, n, args.max_pairs)
            for name, rule in rules.items():
                cache = {}

                def lists(group, rule=rule, cache=cache, P_of=P_of):
                    if group not in cache:
                        cache[group] = rule([P_of[s] for s in group], K)
                    return cache[group]

                vals = []
                for a, b in pairs:
                    la, lb = lists(a), lists(b)
                    for d in ("up", "down"):
                        sup = member_support([P_of[s] for s in a], d)
                        for g in la[d]:
                            calib.setdefault((name, n, d), []).append(
                                (int(sup[g]), g in set(lb[d]))
                            )
                    vals.append(
                        (
                            jaccard(la["up"], lb["up"]),
                            jaccard(la["down"], lb["down"]),
                            len(set(la["up"]) & set(lb["up"])),
                            len(set(la["down"]) & set(lb["down"])),
                        )
                    )
                res[name, n, target] = vals
                if planted:
                    truth = planted[target]
                    up_t = {genes.index(g) for g in truth["up"]}
                    down_t = {genes.index(g) for g in truth["down"]}
                    groups = sorted(cache) or [tuple(seeds[:n])]
                    rec[name, n, target] = [
                        (
                            len(set(lists(g)["up"]) & up_t) / K,
                            len(set(lists(g)["down"]) & down_t) / K,
                        )
                        for g in groups
                    ]
        print(f"  {target}: done", file=sys.stderr, flush=True)

    mode = (
        f"each ensemble its own target model (f seeds {f_seeds}), generator seeds {seeds}"
        if len(f_seeds) > 1
        else f"one shared target model (f seed {f_seeds[0]}); disjoint seed sets from {seeds}, up to {args.max_pairs} pairs"
    )
    print(
        f"\n{args.dataset}, {ec.tag_of(overrides)}, {mode}; k = {K}, held-out non-target samples\n"
    )
    # Table 1: rules x N, summarised over classes
    print(
        "Rules x N: mean over pairs per class, then median (min) over classes; classes = how many classes reach >= 18 shared genes on average (of all)"
    )
    print()
    head = "| rule | N | Jaccard up | shared up | classes up >= 18 | Jaccard down | shared down | classes down >= 18 |"
    if planted:
        head += " planted up found | planted down found |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in rules:
        for n in Ns:
            per = [res[name, n, t] for t in targets]
            if not all(per):
                continue
            ju = [statistics.mean(v[0] for v in p) for p in per]
            jd = [statistics.mean(v[1] for v in p) for p in per]
            su = [statistics.mean(v[2] for v in p) for p in per]
            sd = [statistics.mean(v[3] for v in p) for p in per]
            line = (
                f"| {name} | {n} | {statistics.median(ju):.2f} ({min(ju):.2f}) | {statistics.median(su):.1f} ({min(su):.1f}) "
                f"| {sum(s >= 18 for s in su)}/{len(su)} | {statistics.median(jd):.2f} ({min(jd):.2f}) "
                f"| {statistics.median(sd):.1f} ({min(sd):.1f}) | {sum(s >= 18 for s in sd)}/{len(sd)} |"
            )
            if planted:
                ru = [statistics.mean(v[0] for v in rec[name, n, t]) for t in targets]
                rd = [statistics.mean(v[1] for v in rec[name, n, t]) for t in targets]
                line += f" {statistics.mean(ru):.2f} ({min(ru):.2f}) | {statistics.mean(rd):.2f} ({min(rd):.2f}) |"
            print(line)
    # Table 1b: does support within one ensemble predict the other ensemble?
    print(
        "\nSupport calibration: genes of one ensemble's consensus top-20, by their support (members whose own "
        "top-20 holds them); share also in the other, disjoint ensemble's top-20 (all classes pooled)\n"
    )
    print(
        "| rule | N | direction | " + " | ".join(f"support {j}" for j in range(max(Ns) + 1)) + " |"
    )
    print("|" + "---|" * (3 + max(Ns) + 1))
    for (name, n, d), v in sorted(
        calib.items(), key=lambda kv: (list(rules).index(kv[0][0]), kv[0][1], kv[0][2] != "up")
    ):
        if n == 1:
            continue
        cells = []
        for j in range(max(Ns) + 1):
            hits = [h for sup, h in v if sup == j]
            cells.append(f"{statistics.mean(hits):.2f} ({len(hits)})" if hits and j <= n else "-")
        print(f"| {name} | {n} | {d} | " + " | ".join(cells) + " |")
    # Table 2: per class for the chosen rules
    for name in args.detail or ["count (today)", "mean P"]:
        if name not in rules:
            continue
        print(
            f"\nPer class, rule '{name}': shared genes of the up-20 / down-20 between two disjoint ensembles, mean (worst pair)\n"
        )
        head = "| target | " + " | ".join(f"N={n} up | N={n} down" for n in Ns) + " |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for t in targets:
            cells = []
            for n in Ns:
                v = res[name, n, t]
                if not v:
                    cells += ["-", "-"]
                    continue
                cells.append(f"{statistics.mean(x[2] for x in v):.1f} ({min(x[2] for x in v)})")
                cells.append(f"{statistics.mean(x[3] for x in v):.1f} ({min(x[3] for x in v)})")
            print(f"| {t} | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- realism


def realism_cmd(args) -> None:
    seeds = ec.parse_seeds(args.seeds)
    overrides = ec.parse_set(args.set)
    ctx = ec.context(args.dataset, int(args.f_seeds[0]))
    targets = ctx.classes if args.targets == ["all"] else args.targets
    Ns = [int(n) for n in args.n]
    print(
        f"\n{args.dataset}, {ec.tag_of(overrides)}, shared target model; ensembles of the first N seeds in consecutive groups of {seeds}\n"
    )
    head = "| target | generator(s) | f | LR | 15-NN | E-dist | spread |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    summary = {}
    for t in targets:
        rows = ec.source_rows(ctx, t)
        X = ctx.X[rows]
        Ps = load(args.dataset, t, seeds, ctx.f_seed, overrides)
        y = ec.yardsticks(ctx, t)
        for n in Ns:
            groups = [seeds[i : i + n] for i in range(0, len(seeds) - n + 1, n)]
            for kind in ("mean P", "pooled") if n > 1 else ("single",):
                vals = []
                for g in groups:
                    if kind == "pooled":
                        X_adv = np.concatenate([X + Ps[s][rows] for s in g])
                    else:
                        X_adv = X + np.mean([Ps[s][rows] for s in g], axis=0)
                    vals.append(ec.realism(ctx, t, X_adv))
                med = {k: statistics.median(v[k] for v in vals) for k in vals[0]}
                summary[t, n, kind] = med
                label = (
                    "1 (single)"
                    if n == 1
                    else f"{n}, x + mean P"
                    if kind == "mean P"
                    else f"{n}, pooled x_adv"
                )
                print(
                    f"| {t} | {label} ({len(groups)} groups) | {med['f']:.3f} | {med['lr']:.3f} | {med['knn']:.3f} | {med['ed']:.3f} | {med['spread']:.2f} |"
                )
        ms = y["mean_shift"]
        print(
            f"| {t} | mean shift | - | {ms['lr']:.3f} | {ms['knn']:.3f} | {ms['ed']:.3f} | {ms['spread']:.2f} |"
        )
    print("\nMedian over classes of the change against single generators (ensemble - single):\n")
    print("| N | kind | f | LR | 15-NN | E-dist | spread |")
    print("|---|---|---|---|---|---|---|")
    for n in Ns[1:]:
        for kind in ("mean P", "pooled"):
            d = {
                k: statistics.median(
                    summary[t, n, kind][k] - summary[t, 1, "single"][k] for t in targets
                )
                for k in ("f", "lr", "knn", "ed", "spread")
            }
            print(
                f"| {n} | {kind} | {d['f']:+.3f} | {d['lr']:+.3f} | {d['knn']:+.3f} | {d['ed']:+.3f} | {d['spread']:+.2f} |"
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["stability", "realism"])
    p.add_argument("--dataset", default="demo", choices=list(ec.DATASETS))
    p.add_argument("--targets", nargs="+", default=["all"])
    p.add_argument("--seeds", nargs="+", default=["0-9"])
    p.add_argument("--f-seeds", nargs="+", default=["0"])
    p.add_argument("--n", nargs="+", default=["1", "2", "3", "5"])
    p.add_argument("--rules", nargs="+", choices=list(RULES))
    p.add_argument("--detail", nargs="+", help="rules to show per class")
    p.add_argument("--max-pairs", type=int, default=60)
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    {"stability": stability, "realism": realism_cmd}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
