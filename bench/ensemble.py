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
    python bench/ensemble.py candidates --seeds 0-2 --variants kappa=0 ed_repulsion=0.9   # recipe variants, every class
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import ens_cache as ec
import numpy as np
import torch

K = 20


# ----------------------------------------------------------------------------- ranking rules
# Each rule: (list of P_i over the same rows, k) -> {"up": [gene index...k], "down": [...]}.


def _order(score: np.ndarray, tie: np.ndarray, k: int) -> list[int]:
    """Gene indices by score descending, ties by ``tie`` descending, then gene order."""
    idx = np.arange(len(score))
    return idx[np.lexsort((idx, -tie, -score))][:k].tolist()


def _both(fn, Ps, k):
    return {"up": fn(Ps, k, 1.0), "down": fn(Ps, k, -1.0)}


def _row_topk(P: np.ndarray, k: int, sign: float) -> np.ndarray:
    """Indices of each row's k largest sign * P (unordered within the k; float ties are rare)."""
    return np.argpartition(-sign * P, k - 1, axis=1)[:, :k]


def rule_count(Ps, k):
    """Today's rule on the ensemble's mean P: samples whose own top-k holds the gene, ties by mean P.

    (``tspg.perturb.consensus``'s order, computed with argpartition for speed.)
    """
    P = np.mean(Ps, axis=0)
    m = P.mean(0)
    out = {}
    for d, sign in (("up", 1.0), ("down", -1.0)):
        count = np.bincount(_row_topk(P, k, sign).reshape(-1), minlength=P.shape[1])
        out[d] = _order(count, sign * m, k)
    return out


def rule_pooled(Ps, k):
    """Count over (sample, generator) pairs whose top-k holds the gene, ties by mean P."""

    def one(Ps, k, sign):
        count = np.zeros(Ps[0].shape[1])
        for P in Ps:
            count += np.bincount(_row_topk(P, k, sign).reshape(-1), minlength=P.shape[1])
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


def rule_t_samples(Ps, k):
    """Mean P over samples divided by its spread over samples (sd + 0.01): consistently moved genes."""

    def one(Ps, k, sign):
        P = np.mean(Ps, axis=0)
        m = sign * P.mean(0)
        return _order(m / (P.std(0) + 0.01), m, k)

    return _both(one, Ps, k)


def rule_lower_bound(Ps, k):
    """Mean P minus the members' standard error of it (the plain mean P for one member)."""

    def one(Ps, k, sign):
        means = sign * np.mean(Ps, axis=1)  # (members, genes)
        m = means.mean(0)
        se = means.std(0, ddof=1) / np.sqrt(len(Ps)) if len(Ps) > 1 else 0.0
        return _order(m - se, m, k)

    return _both(one, Ps, k)


RULES = {
    "count (today)": rule_count,
    "pooled count": rule_pooled,
    "mean P": rule_mean,
    "median P": rule_median,
    "support of count top-k": rule_support_count,
    "support of mean-P top-k": rule_support_mean,
    "mean P / sd over samples": rule_t_samples,
    "mean P - members' s.e.": rule_lower_bound,
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
                # every n-subset of the seeds on each target model; pairs across target models
                per_f = {
                    f: [tuple((f, s) for s in c) for c in itertools.combinations(seeds, n)]
                    for f in f_seeds
                }
                # generator seeds disjoint too: the same seed gives the same initial weights and
                # batches whatever the target model, which would make the two runs alike
                pairs = [
                    (a, b)
                    for f1, f2 in itertools.combinations(f_seeds, 2)
                    for a in per_f[f1]
                    for b in per_f[f2]
                    if not {s for _, s in a} & {s for _, s in b}
                ]
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
                        sup = np.zeros(len(genes), int)
                        for member in a:
                            sup[lists((member,))[d]] += 1
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
        "top-20 by the same rule holds them); share also in the other, disjoint ensemble's top-20 (all classes "
        "and pairs pooled; in brackets how many genes)\n"
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


def candidates_cmd(args) -> None:
    """Realism of recipe variants on every class (shared target model, medians over seeds)."""
    seeds = ec.parse_seeds(args.seeds)
    ctx = ec.context(args.dataset, int(args.f_seeds[0]))
    targets = ctx.classes if args.targets == ["all"] else args.targets
    variants = {"tspg+": {}}
    for v in args.variants:
        variants[v] = ec.parse_set(v.split(","))
    ens = int(args.n[0]) if args.n != ["1", "2", "3", "5"] else 1
    fs = (
        "each seed its own target model"
        if args.f_per_seed
        else f"shared target model (f seed {ctx.f_seed})"
    )
    print(
        f"\n{args.dataset}, {fs}, generator seeds {seeds}, "
        f"{'single generators, medians over seeds' if ens == 1 else f'ensembles of {ens} (x + mean P)'}\n"
    )
    head = "| target | recipe | f | LR | 15-NN | E-dist | E-dist (U) | spread | E ok | 15-NN ok |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    tally = {v: [0, 0, [], []] for v in variants}
    for t in targets:
        rows = ec.source_rows(ctx, t)
        X = ctx.X[rows]
        y = ec.yardsticks(ctx, t)
        ms = y["mean_shift"]
        for name, ov in variants.items():
            groups = [seeds[i : i + ens] for i in range(0, len(seeds) - ens + 1, ens)]
            try:
                if args.f_per_seed:
                    # bench/quality.py's protocol: seed s trains the target model and generator
                    vals = []
                    for g in groups:
                        c = ec.context(args.dataset, g[0])
                        Pg = [
                            ec.generator_P(
                                args.dataset, t, s, f_seed=g[0], overrides=ov, train_missing=False
                            )[0]
                            for s in g
                        ]
                        vals.append(ec.realism(c, t, X + np.mean([P[rows] for P in Pg], axis=0)))
                else:
                    Ps = {
                        s: ec.generator_P(
                            args.dataset, t, s, f_seed=ctx.f_seed, overrides=ov, train_missing=False
                        )[0]
                        for s in seeds
                    }
                    vals = [
                        ec.realism(ctx, t, X + np.mean([Ps[s][rows] for s in g], axis=0))
                        for g in groups
                    ]
            except FileNotFoundError:
                continue  # not trained (yet): bench/ens_cache.py --set ...
            med = {k: statistics.median(v[k] for v in vals) for k in vals[0]}
            e_ok, k_ok = med["ed"] <= ms["ed"], med["knn"] >= ms["knn"]
            tally[name][0] += e_ok
            tally[name][1] += k_ok
            tally[name][2].append(med["ed"] - ms["ed"])
            tally[name][3].append(med["knn"] - ms["knn"])
            print(
                f"| {t} | {name} | {med['f']:.3f} | {med['lr']:.3f} | {med['knn']:.3f} | {med['ed']:.3f} | {med['ed_u']:.3f} "
                f"| {med['spread']:.2f} | {'yes' if e_ok else 'no'} | {'yes' if k_ok else 'no'} |"
            )
        print(
            f"| {t} | mean shift | - | {ms['lr']:.3f} | {ms['knn']:.3f} | {ms['ed']:.3f} | {ms['ed_u']:.3f} | {ms['spread']:.2f} | | |"
        )
        r = y["real"]
        print(
            f"| {t} | real target cells (n held-out {y['n_real_heldout']}, train {y['n_real_train']}) | - | {r['lr']:.3f} "
            f"| {r['knn']:.3f} | {r['ed']:.3f} | {r['ed_u']:.3f} | {r['spread']:.2f} | | |"
        )
    print(
        "\nSummary over the classes: goals met (of all), median and worst difference to mean shift\n"
    )
    print(
        "| recipe | E-dist <= mean shift | 15-NN >= mean shift | E-dist - MS, median (worst) | 15-NN - MS, median (worst) |"
    )
    print("|---|---|---|---|---|")
    for name, (e, k, de, dk) in tally.items():
        if de:
            print(
                f"| {name} | {e}/{len(de)} | {k}/{len(dk)} | {statistics.median(de):+.3f} ({max(de):+.3f}) "
                f"| {statistics.median(dk):+.3f} ({min(dk):+.3f}) |"
            )


def verdict_cmd(args) -> None:
    """What one ensemble can say about its own stability, against the truth of disjoint ensembles.

    For each N-seed ensemble (shared target model, rule mean P): its members' agreement
    (mean pairwise shared genes of the members' own top-20), how many of its top-20 have
    full support (all N members' own top-20 hold them), and how many of its top-20 are
    'clear' (the gene's mean P minus 2 members' s.e. above the 21st gene's mean P plus 2
    s.e.); against the shared genes with the disjoint ensembles it meets.
    """
    seeds = ec.parse_seeds(args.seeds)
    ctx = ec.context(args.dataset, int(args.f_seeds[0]))
    targets = ctx.classes if args.targets == ["all"] else args.targets
    rule = RULES["mean P"]
    rows_out = []
    for n in [int(x) for x in args.n if int(x) > 1]:
        for t in targets:
            rows = ec.source_rows(ctx, t)
            Ps = {s: P[rows] for s, P in load(args.dataset, t, seeds, ctx.f_seed).items()}
            pairs = disjoint_pairs(seeds, n, args.max_pairs)
            lists = {}

            def get(g, lists=lists, Ps=Ps):
                if g not in lists:
                    lists[g] = rule([Ps[s] for s in g], K)
                return lists[g]

            for d in ("up", "down"):
                sign = 1.0 if d == "up" else -1.0
                stats = {}
                for g in {x for p in pairs for x in p}:
                    top = get(g)[d]
                    own = [set(get((s,))[d]) for s in g]
                    member = statistics.mean(len(a & b) for a, b in itertools.combinations(own, 2))
                    full = sum(all(gene in o for o in own) for gene in top)
                    means = sign * np.stack([Ps[s].mean(0) for s in g])
                    m, se = means.mean(0), means.std(0, ddof=1) / np.sqrt(n)
                    order = np.argsort(-m)
                    nxt = order[K]
                    clear = int(sum(m[gene] - 2 * se[gene] > m[nxt] + 2 * se[nxt] for gene in top))
                    stats[g] = (member, full, clear)
                for a, b in pairs:
                    shared = len(set(get(a)[d]) & set(get(b)[d]))
                    for g in (a, b):
                        rows_out.append((n, t, d, *stats[g], shared))
    print(f"\n{args.dataset}, rule mean P, one shared target model; seeds {seeds}\n")
    print(
        "Per class (N, direction): what one ensemble sees, mean over ensembles; shared = with a disjoint ensemble\n"
    )
    print(
        "| N | target | direction | members' shared (of 20) | full support (of 20) | clear (of 20) | shared with another ensemble |"
    )
    print("|---|---|---|---|---|---|---|")
    keyf = lambda r: (r[0], r[1], r[2])  # noqa: E731
    groups = {}
    for r in rows_out:
        groups.setdefault(keyf(r), []).append(r)
    summary = []
    for (n, t, d), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][2] != "up", kv[0][1])
    ):
        v = [statistics.mean(r[i] for r in rs) for i in (3, 4, 5, 6)]
        summary.append((n, d, *v))
        print(f"| {n} | {t} | {d} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {v[3]:.1f} |")
    print("\nAcross classes and directions: correlation of each statistic with the shared genes\n")
    print("| N | members' shared | full support | clear |")
    print("|---|---|---|---|")
    for n in sorted({s[0] for s in summary}):
        sub = np.array([s[2:] for s in summary if s[0] == n])
        cors = [np.corrcoef(sub[:, i], sub[:, 3])[0, 1] for i in range(3)]
        print(f"| {n} | {cors[0]:.2f} | {cors[1]:.2f} | {cors[2]:.2f} |")
    print(
        "\nLeast-squares line: shared with another ensemble = a + b x statistic (all classes, both directions)\n"
    )
    print("| N | statistic | a | b | statistic needed for 18 shared |")
    print("|---|---|---|---|---|")
    for n in sorted({s[0] for s in summary}):
        sub = np.array([s[2:] for s in summary if s[0] == n])
        for i, name in enumerate(("members' shared", "full support", "clear")):
            b, a = np.polyfit(sub[:, i], sub[:, 3], 1)
            print(f"| {n} | {name} | {a:.2f} | {b:.2f} | {(18 - a) / b:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["stability", "realism", "candidates", "verdict"])
    p.add_argument(
        "--variants",
        nargs="+",
        default=[],
        help="for candidates: recipe variants, each FIELD=VALUE[,FIELD=VALUE]",
    )
    p.add_argument("--dataset", default="demo", choices=list(ec.DATASETS))
    p.add_argument("--targets", nargs="+", default=["all"])
    p.add_argument("--seeds", nargs="+", default=["0-9"])
    p.add_argument("--f-seeds", nargs="+", default=["0"])
    p.add_argument("--n", nargs="+", default=["1", "2", "3", "5"])
    p.add_argument("--rules", nargs="+", choices=list(RULES))
    p.add_argument("--detail", nargs="+", help="rules to show per class")
    p.add_argument("--max-pairs", type=int, default=60)
    p.add_argument(
        "--f-per-seed",
        action="store_true",
        help="candidates: seed s uses the target model of seed s (bench/quality.py's protocol)",
    )
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    {
        "stability": stability,
        "realism": realism_cmd,
        "candidates": candidates_cmd,
        "verdict": verdict_cmd,
    }[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
