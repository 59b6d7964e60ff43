"""Source-aware baselines: TSPG's genes per source class against per-source DE and mean shift.

For a target t and each source class s:

- TSPG_s: the top-k genes by mean P over the samples of class s (P: the ensemble's mean
  over the generator seeds given, one shared target model);
- DE_s: differential expression of t against s alone (Wilcoxon,
  ``scanpy.tl.rank_genes_groups(groups=[t], reference=s)``) on the training split;
- MS_s: the per-source mean shift mu_t - mu_s (training split), ranked by the mean change it
  makes on the same samples as TSPG_s (clip(x + mu_t - mu_s, 0, 1) - x), as TSPG's genes
  are ranked by the change P.

Prints per (target, source) the overlap at k of TSPG_s with DE_s and MS_s (and of the two
baselines with each other, and of TSPG's global top genes with DE_s), the genes only TSPG
ranks high (top k in TSPG_s, beyond the top ``far`` in both baselines) and the reverse,
with P, DE score and mean shift; and what TSPG adds per sample: how P varies within a
source class, and how much of that variation follows the sample's own distance to the
target mean.

    python bench/sources.py --dataset demo --targets "CD14+ Monocyte" "CD8+ Cytotoxic T" "CD19+ B"
    python bench/sources.py --dataset planted --targets all        # + recovery of the planted genes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

import anndata as ad
import ens_cache as ec
import numpy as np
import pandas as pd
import torch

K = 20


def de_against(ctx, target: str, reference: str) -> pd.DataFrame:
    """Wilcoxon DE of ``target`` against one ``reference`` class (or ``"rest"``), training split.

    Returns gene (index into the bundle's genes), score, logfoldchange, pval_adj; sorted by score.
    """
    import scanpy as sc

    tr = ctx.train
    lab = ctx.labels[tr]
    keep = (lab == target) | ((lab == reference) if reference != "rest" else True)
    X = ctx.X[tr][keep]
    groups = np.where(lab[keep] == target, "target", "reference")
    a = ad.AnnData(
        X=X.astype(np.float32),
        obs=pd.DataFrame({"g": pd.Categorical(groups)}, index=[str(i) for i in range(len(X))]),
        var=pd.DataFrame(index=[str(i) for i in range(X.shape[1])]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            a,
            "g",
            groups=["target"],
            reference="reference",
            method="wilcoxon",
            n_genes=a.n_vars,
            use_raw=False,
        )
        df = sc.get.rank_genes_groups_df(a, group="target")
    df["gene"] = df["names"].astype(int)
    df = df.rename(
        columns={"scores": "score", "logfoldchanges": "logfoldchange", "pvals_adj": "pval_adj"}
    )
    return (
        df[["gene", "score", "logfoldchange", "pval_adj"]]
        .sort_values("score", ascending=False, kind="stable")
        .reset_index(drop=True)
    )


def ranked(df: pd.DataFrame) -> dict[str, list[int]]:
    g = df["gene"].tolist()
    return {"up": g, "down": g[::-1]}


def ranks(order: list[int], n: int) -> np.ndarray:
    """Rank (1 = first) of every gene in ``order``; genes not in it get n + 1."""
    r = np.full(n, n + 1)
    r[np.asarray(order, dtype=int)] = np.arange(1, len(order) + 1)
    return r


def full_order(P: np.ndarray, direction: str) -> list[int]:
    """Every gene ranked by its mean P over the samples (most positive first for up, most
    negative first for down): the ensemble rule recommended in bench/ENSEMBLE_NOTES.md."""
    m = P.mean(0) * (1 if direction == "up" else -1)
    return [int(g) for g in np.argsort(-m, kind="stable")]


def analyse(ctx, target: str, P: np.ndarray, rows_part: str, far: int) -> dict:
    """Per source class: overlaps, TSPG-only and baseline-only genes, within-class variation."""
    genes = list(ctx.bundle.genes)
    n = len(genes)
    tr = ctx.train
    mu_t = ctx.X[tr & (ctx.labels == target)].mean(0)
    part = ctx.test if rows_part == "test" else np.ones(len(ctx.labels), bool)
    src_all = part & (ctx.labels != target)
    tspg_global = {d: full_order(P[src_all], d)[:K] for d in ("up", "down")}
    de_rest = ranked(de_against(ctx, target, "rest"))
    out = {"sources": [], "global": tspg_global}
    for s in sorted(set(ctx.labels) - {target}):
        rows = part & (ctx.labels == s)
        if rows.sum() < 1 or (tr & (ctx.labels == s)).sum() < 2:
            continue
        mu_s = ctx.X[tr & (ctx.labels == s)].mean(0)
        Xs, Ps = ctx.X[rows], P[rows]
        P_ms = np.clip(Xs + (mu_t - mu_s), 0, 1) - Xs
        de = de_against(ctx, target, s)
        lists = {
            "tspg": {d: full_order(Ps, d) for d in ("up", "down")},
            "ms": {d: full_order(P_ms, d) for d in ("up", "down")},
            "de": ranked(de),
        }
        score = np.zeros(n)
        score[de["gene"].to_numpy()] = de["score"].to_numpy()
        rec = {"source": s, "n": int(rows.sum())}
        for d in ("up", "down"):
            t20 = set(lists["tspg"][d][:K])
            rec[f"tspg_de_{d}"] = len(t20 & set(lists["de"][d][:K]))
            rec[f"tspg_ms_{d}"] = len(t20 & set(lists["ms"][d][:K]))
            rec[f"de_ms_{d}"] = len(set(lists["de"][d][:K]) & set(lists["ms"][d][:K]))
            rec[f"global_de_{d}"] = len(set(tspg_global[d][:K]) & set(lists["de"][d][:K]))
            rec[f"tspg_global_{d}"] = len(t20 & set(tspg_global[d][:K]))
            rec[f"derest_de_{d}"] = len(set(de_rest[d][:K]) & set(lists["de"][d][:K]))
            r_t = ranks(lists["tspg"][d], n)
            r_de = ranks(lists["de"][d], n)
            r_ms = ranks(lists["ms"][d], n)
            only_t = [g for g in lists["tspg"][d][:K] if r_de[g] > far and r_ms[g] > far]
            only_b = [g for g in lists["de"][d][:K] if r_ms[g] <= K and r_t[g] > far]
            rec[f"only_tspg_{d}"] = [
                (
                    genes[g],
                    float(Ps[:, g].mean()),
                    int(r_t[g]),
                    float(score[g]),
                    int(r_de[g]),
                    float((mu_t - mu_s)[g]),
                    int(r_ms[g]),
                )
                for g in only_t
            ]
            rec[f"only_base_{d}"] = [
                (
                    genes[g],
                    float(Ps[:, g].mean()),
                    int(r_t[g]),
                    float(score[g]),
                    int(r_de[g]),
                    float((mu_t - mu_s)[g]),
                    int(r_ms[g]),
                )
                for g in only_b
            ]
        # what TSPG adds: variation of P within the source class
        if rows.sum() >= 3:
            dev_P = Ps - Ps.mean(0)
            dev_x = mu_s - Xs  # how far the sample sits from its class mean (towards lower)
            to_mean = mu_t - Xs
            r_within = [np.corrcoef(dev_P[i], (Xs.mean(0) - Xs)[i])[0, 1] for i in range(len(Xs))]
            r_tomean = [np.corrcoef(Ps[i], to_mean[i])[0, 1] for i in range(len(Xs))]
            r_shift = [np.corrcoef(Ps[i], mu_t - mu_s)[0, 1] for i in range(len(Xs))]
            tops = [set(np.argsort(-Ps[i])[:K]) for i in range(len(Xs))]
            cons_up = set(lists["tspg"]["up"][:K])
            tops_ms = [set(np.argsort(-P_ms[i])[:K]) for i in range(len(Xs))]
            cons_ms = set(lists["ms"]["up"][:K])
            rec.update(
                within_var_share=float((dev_P**2).sum() / (Ps**2).sum()),
                within_var_share_ms=float(((P_ms - P_ms.mean(0)) ** 2).sum() / (P_ms**2).sum()),
                r_within=float(np.nanmean(r_within)),
                r_tomean=float(np.nanmean(r_tomean)),
                r_shift=float(np.nanmean(r_shift)),
                sample_vs_source_up=float(np.mean([len(t & cons_up) / K for t in tops])),
                sample_vs_source_up_ms=float(np.mean([len(t & cons_ms) / K for t in tops_ms])),
            )
            del dev_x
        out["sources"].append(rec)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="demo", choices=list(ec.DATASETS))
    p.add_argument(
        "--targets", nargs="+", default=["CD14+ Monocyte", "CD8+ Cytotoxic T", "CD19+ B"]
    )
    p.add_argument("--seeds", nargs="+", default=["0-2"], help="generator seeds of the ensemble")
    p.add_argument(
        "--part",
        default="all",
        choices=["all", "test"],
        help="samples whose P is read: every sample of the source class, or its held-out ones",
    )
    p.add_argument(
        "--far", type=int, default=50, help="'a baseline does not rank it high': beyond this rank"
    )
    p.add_argument(
        "--genes", action="store_true", help="print the TSPG-only and baseline-only genes"
    )
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ctx = ec.context(args.dataset, 0)
    targets = ctx.classes if args.targets == ["all"] else args.targets
    seeds = ec.parse_seeds(args.seeds)
    overrides = ec.parse_set(args.set)
    planted = ctx.adata.uns.get("planted")
    genes = list(ctx.bundle.genes)
    print(
        f"\n{args.dataset}, {ec.tag_of(overrides)}, ensemble of generator seeds {seeds} (mean P), k = {K}, samples: {args.part}; DE and mean shift on the training split\n"
    )
    head = (
        "| target | source | n | TSPG_s∩DE_s up/down | TSPG_s∩MS_s up/down | DE_s∩MS_s up/down | TSPG global∩DE_s up/down "
        "| DE rest∩DE_s up | TSPG_s∩TSPG global up | TSPG-only up/down | base-only up/down | within-class var share P / MS | r(P dev, x dev) | sample top-20 in source top-20: P / MS |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    all_recs = []
    for t in targets:
        P = np.mean(
            [ec.generator_P(args.dataset, t, s, overrides=overrides)[0] for s in seeds], axis=0
        )
        res = analyse(ctx, t, P, args.part, args.far)
        for r in res["sources"]:
            all_recs.append((t, r))
            extra = "-"
            if "within_var_share" in r:
                extra = (
                    f"{r['within_var_share']:.2f} / {r['within_var_share_ms']:.2f} | {r['r_within']:.2f} "
                    f"| {r['sample_vs_source_up']:.2f} / {r['sample_vs_source_up_ms']:.2f}"
                )
            else:
                extra = "- | - | -"
            print(
                f"| {t} | {r['source']} | {r['n']} | {r['tspg_de_up']}/{r['tspg_de_down']} | {r['tspg_ms_up']}/{r['tspg_ms_down']} "
                f"| {r['de_ms_up']}/{r['de_ms_down']} | {r['global_de_up']}/{r['global_de_down']} | {r['derest_de_up']} | {r['tspg_global_up']} "
                f"| {len(r['only_tspg_up'])}/{len(r['only_tspg_down'])} | {len(r['only_base_up'])}/{len(r['only_base_down'])} | {extra} |"
            )

    # summary over every (target, source)
    def med(key):
        vals = [r[key] for _, r in all_recs if key in r]
        return statistics.median(vals) if vals else float("nan")

    print("\nMedian over every (target, source):\n")
    print("| measure | up | down |")
    print("|---|---|---|")
    for label, key in [
        ("TSPG_s ∩ DE_s (of 20)", "tspg_de"),
        ("TSPG_s ∩ MS_s", "tspg_ms"),
        ("DE_s ∩ MS_s", "de_ms"),
        ("TSPG global ∩ DE_s", "global_de"),
        ("DE vs rest ∩ DE_s", "derest_de"),
        ("TSPG_s ∩ TSPG global", "tspg_global"),
    ]:
        print(f"| {label} | {med(key + '_up'):.1f} | {med(key + '_down'):.1f} |")
    print(
        f"| TSPG-only genes (top {K} in TSPG_s, beyond {args.far} in DE_s and MS_s) | {statistics.median(len(r['only_tspg_up']) for _, r in all_recs):.1f} | {statistics.median(len(r['only_tspg_down']) for _, r in all_recs):.1f} |"
    )
    print(
        f"| baseline-only genes (top {K} in DE_s and MS_s, beyond {args.far} in TSPG_s) | {statistics.median(len(r['only_base_up']) for _, r in all_recs):.1f} | {statistics.median(len(r['only_base_down']) for _, r in all_recs):.1f} |"
    )
    for label, key in [
        ("within-class share of P's variance (P)", "within_var_share"),
        (
            "within-class share of the change's variance (mean shift, clipping only)",
            "within_var_share_ms",
        ),
        ("r(P_i - mean P_s, mean x_s - x_i), per sample", "r_within"),
        ("r(P_i, mu_t - x_i), per sample", "r_tomean"),
        ("r(P_i, mu_t - mu_s), per sample", "r_shift"),
        ("a sample's own top-20 up in its source's top-20 up (TSPG)", "sample_vs_source_up"),
        ("the same for mean shift's change", "sample_vs_source_up_ms"),
    ]:
        print(f"| {label} | {med(key):.2f} | |")
    if planted:
        print(
            "\nRecovery of the planted genes per source (truth up = target's up program + source's down program; down = the reverse): precision of the top 20\n"
        )
        print("| method | up | down |")
        print("|---|---|---|")
        # recompute precision from stored lists is not kept; recompute quickly
        prec = {m: {"up": [], "down": []} for m in ("TSPG_s", "DE_s", "MS_s", "TSPG global")}
        for t in targets:
            P = np.mean(
                [ec.generator_P(args.dataset, t, s, overrides=overrides)[0] for s in seeds], axis=0
            )
            tr = ctx.train
            mu_t = ctx.X[tr & (ctx.labels == t)].mean(0)
            part = ctx.test if args.part == "test" else np.ones(len(ctx.labels), bool)
            glob = {d: full_order(P[part & (ctx.labels != t)], d)[:K] for d in ("up", "down")}
            for s in sorted(set(ctx.labels) - {t}):
                rows = part & (ctx.labels == s)
                mu_s = ctx.X[tr & (ctx.labels == s)].mean(0)
                truth = {
                    "up": {genes.index(g) for g in planted[t]["up"] + planted[s]["down"]},
                    "down": {genes.index(g) for g in planted[t]["down"] + planted[s]["up"]},
                }
                Xs = ctx.X[rows]
                P_ms = np.clip(Xs + (mu_t - mu_s), 0, 1) - Xs
                de = ranked(de_against(ctx, t, s))
                for d in ("up", "down"):
                    prec["TSPG_s"][d].append(len(set(full_order(P[rows], d)[:K]) & truth[d]) / K)
                    prec["MS_s"][d].append(len(set(full_order(P_ms, d)[:K]) & truth[d]) / K)
                    prec["DE_s"][d].append(len(set(de[d][:K]) & truth[d]) / K)
                    prec["TSPG global"][d].append(len(set(glob[d][:K]) & truth[d]) / K)
        for m, v in prec.items():
            print(
                f"| {m} | {statistics.mean(v['up']):.2f} (min {min(v['up']):.2f}) | {statistics.mean(v['down']):.2f} (min {min(v['down']):.2f}) |"
            )
    if args.genes:
        for t, r in all_recs:
            for kind in ("only_tspg", "only_base"):
                for d in ("up", "down"):
                    if r[f"{kind}_{d}"]:
                        print(
                            f"\n{t} <- {r['source']} ({kind.replace('only_', '')} only, {d}): gene, mean P, TSPG rank, DE score, DE rank, mu_t - mu_s, MS rank"
                        )
                        for row in r[f"{kind}_{d}"]:
                            print(
                                "  "
                                + ", ".join(
                                    f"{v:.3f}" if isinstance(v, float) else str(v) for v in row
                                )
                            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
