"""Command line: ``tspg-train`` and ``tspg <command>``. Argument parsing only.

Every command calls the same functions as the Python API and the dashboard. A bad input
ends with one line on stderr naming the file, sample or gene, and exit code 1; a bad
command line exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

logger = logging.getLogger("tspg")

# Help for each TrainConfig field that is a command-line option (--field-name).
CONFIG_HELP = {
    "seed": "seed of every random step (split, initialisation, batches, draws)",
    "test_size": "share of each class held out from every model",
    "target_epochs": "epochs of the target model",
    "target_lr": "Adam learning rate of the target model",
    "epochs": "epochs of the generator and discriminator",
    "batch_size": "batch size",
    "g_lr": "Adam learning rate of the generator",
    "d_lr": "Adam learning rate of the discriminator",
    "w_gan": "weight of the least-squares GAN loss",
    "w_adv": "weight of the Carlini-Wagner loss",
    "w_norm": "weight of the L2 norm of P",
    "w_td": "weight of the L1 distance to a draw of the target distribution",
    "w_ed": "weight of the energy distance between x_adv and real target samples",
    "kappa": "Carlini-Wagner confidence margin",
    "adv_space": "take the Carlini-Wagner margin on logits or softmax probabilities",
    "adv_reduce": "average or sum the Carlini-Wagner loss over the batch",
    "norm_form": "sample: mean ||P_i||_2; batch: ||P_batch||_2 + 1",
    "covariance": "covariance of the target distribution for L_td (auto: full unless too large, then lowrank)",
    "cov_rank": "rank of the lowrank covariance",
    "disc_real": "what the discriminator sees as real: target-class samples, or all samples",
    "train_on": "samples the generator learns to perturb",
}
CHOICES = {
    "adv_space": ["logits", "probs"], "adv_reduce": ["mean", "sum"], "norm_form": ["sample", "batch"],
    "covariance": ["auto", "full", "diagonal", "lowrank"], "disc_real": ["target", "all"],
    "train_on": ["non-target", "all"],
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_data_args(p: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    g = p.add_argument_group("input GEM")
    g.add_argument("data", nargs=None if data_required else "?", help="GEM file: .h5ad, .csv, .tsv, .txt or .npy")
    g.add_argument("--label-key", help="obs column (h5ad) holding each sample's class; name given to --labels")
    g.add_argument("--labels", help="labels file: sample <tab> label per line (reference format) or CSV with header")
    g.add_argument("--layer", help="h5ad: read this layer instead of .X")
    g.add_argument("--use-raw", action="store_true", help="h5ad: read .raw instead of .X")
    g.add_argument("--transpose", action="store_true", help="the file is genes x samples")
    g.add_argument("--row-names", help=".npy: sample names file (default <stem>.rownames.txt)")
    g.add_argument("--col-names", help=".npy: gene names file (default <stem>.colnames.txt)")
    g.add_argument("--nan", choices=["fill", "error"], default="fill", help="missing values: fill with the matrix minimum, or refuse")


def _read_data(args):
    from .data import read_gem

    return read_gem(
        args.data, label_key=args.label_key, labels=args.labels, layer=args.layer, use_raw=args.use_raw,
        transpose=args.transpose, nan=args.nan, row_names=args.row_names, col_names=args.col_names,
    )


def build_train_parser(prog: str = "tspg-train") -> argparse.ArgumentParser:
    from .train import TrainConfig

    p = argparse.ArgumentParser(
        prog=prog, formatter_class=_Formatter,
        description="Train a TSPG target model and generator on a labelled GEM and write a bundle.",
        epilog="examples:\n  tspg-train --demo\n  tspg-train gem.h5ad --label-key tissue --target Heart --gene-set hallmark.gmt:HALLMARK_HYPOXIA",
    )
    _add_data_args(p, data_required=False)
    p.add_argument("--demo", action="store_true", help="train on scanpy's pbmc68k_reduced (label bulk_labels)")
    g = p.add_argument_group("what to train")
    g.add_argument("--target", help="target class (demo default: CD14+ Monocyte)")
    g.add_argument("--all-targets", action="store_true", help="one generator per class, sharing one target model")
    g.add_argument("--gene-set", help="FILE.gmt:NAME (or a list file in the reference format); default all genes")
    g.add_argument("--genes", help="file with one gene per line")
    g.add_argument("--target-model", help="reuse the target model, split and scaler of this bundle")
    g.add_argument("--recipe", choices=["tspg+", "paper"], default="tspg+", help="loss recipe; options below override it")
    h = p.add_argument_group("hyper-parameters (default: the recipe's value)")
    base, paper = TrainConfig.for_recipe("tspg+"), TrainConfig.for_recipe("paper")
    for f in fields(TrainConfig):
        if f.name not in CONFIG_HELP:
            continue
        a, b = getattr(base, f.name), getattr(paper, f.name)
        default = f"tspg+: {a}" + (f", paper: {b}" if a != b else "")
        h.add_argument(
            "--" + f.name.replace("_", "-"), type=type(a), default=None, choices=CHOICES.get(f.name),
            help=f"{CONFIG_HELP[f.name]} ({default})",
        )
    o = p.add_argument_group("output")
    o.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    o.add_argument("--out", default=None, help="bundle folder (default: $TSPG_MODELS_DIR or ./models)")
    o.add_argument("--name", help="bundle name (default: <dataset>-<target>)")
    o.add_argument("--overwrite", action="store_true", help="replace a bundle of the same name")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def train_main(argv: list[str] | None = None) -> int:
    """``tspg-train``."""
    return _run_train(build_train_parser(), argv)


def _run_train(parser: argparse.ArgumentParser, argv) -> int:
    args = parser.parse_args(argv)
    if args.demo and args.data:
        parser.error("give a data file or --demo, not both")
    if not args.demo and not args.data:
        parser.error("give a data file (or --demo)")
    if args.target and args.all_targets:
        parser.error("give --target or --all-targets, not both")
    if args.gene_set and args.genes:
        parser.error("give --gene-set or --genes, not both")
    _setup_logging(args.quiet)
    start = time.perf_counter()
    try:
        return _train(args, parser, start)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _train(args, parser, start: float) -> int:
    from .bundle import load_bundle, resolve_bundle, save_bundle
    from .datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo
    from .genesets import select_genes
    from .pipeline import train_all_targets
    from .train import TrainConfig

    if args.demo:
        adata, dataset = demo(), "pbmc68k_reduced"
        label_key = args.label_key or DEMO_LABEL_KEY
        target = args.target or (None if args.all_targets else DEMO_TARGET)
    else:
        if not args.label_key and not args.labels:
            parser.error("--label-key (or --labels) is required with a data file")
        adata, dataset = _read_data(args), Path(args.data).stem
        label_key = args.label_key or "label"
        target = args.target
        if not target and not args.all_targets:
            parser.error("--target CLASS (or --all-targets) is required")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name in CONFIG_HELP}
    config = TrainConfig.for_recipe(args.recipe, **overrides)
    genes = select_genes(adata.var_names, gene_set=args.gene_set, genes_file=args.genes)
    reuse = load_bundle(resolve_bundle(args.target_model, args.out, allow_path=True)) if args.target_model else None
    logger.info("data: %s, %d samples x %d genes; %s", dataset, adata.n_obs, adata.n_vars, genes.summary())
    logger.info("config: %s", config.to_dict())
    bars: dict = {}

    def progress(stage, step, n, losses):
        if args.quiet:
            return
        from tqdm.auto import tqdm

        if stage not in bars:
            bars[stage] = tqdm(total=n, desc=stage, unit="epoch", leave=True, file=sys.stderr)
        bar = bars[stage]
        bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items() if k != "total" and v}, refresh=False)
        bar.update(1)
        if step == n:
            bar.close()

    targets = [target] if target else None
    names = [args.name] if args.name and target else None
    if args.name and not target:
        parser.error("--name needs a single --target")
    bundles = train_all_targets(
        adata, label_key=label_key, targets=targets, config=config, genes=genes, layer=None,
        dataset=dataset, target_model=reuse, device=args.device, names=names, progress=progress,
    )
    for b in bundles:
        path = save_bundle(b, args.out, overwrite=args.overwrite)
        m = b.metrics
        print(f"bundle {path}")
        print(f"  target {b.target!r}, {len(b.genes)} genes, recipe {config.recipe}, device {m['device']}, L_td covariance: {b.manifest['covariance_used']}")
        print(f"  target model held-out accuracy: {m['target_model_accuracy']:.3f}")
        print(f"  perturbation accuracy (held-out): all {m['perturbation_accuracy']:.3f}, non-target {m['perturbation_accuracy_non_target']:.3f} (n={m['n_test_non_target']})")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")


# ----------------------------------------------------------------------------- tspg <command>


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tspg", formatter_class=_Formatter, description="TSPG Explorer command line.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser("train", help="train a generator (same as tspg-train)", add_help=False)

    imp = sub.add_parser("import", formatter_class=_Formatter, help="read a GEM into .h5ad", description="Read a GEM (text, .npy or .h5ad) and its labels into one .h5ad file.")
    _add_data_args(imp)
    imp.add_argument("-o", "--output", required=True, help="output .h5ad")

    ls = sub.add_parser("list", formatter_class=_Formatter, help="list the bundles in the models folder")
    ls.add_argument("--out", default=None, help="models folder (default: $TSPG_MODELS_DIR or ./models)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``tspg``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return _run_train(build_train_parser("tspg train"), argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(False)
    try:
        return COMMANDS[args.command](args, parser)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _import(args, parser) -> int:
    from .data import write_gem

    if args.labels is None and args.label_key is None and not str(args.data).endswith(".h5ad"):
        logger.warning("no --labels given: the .h5ad will have no classes")
    adata = _read_data(args)
    out = write_gem(adata, args.output)
    n_filled = adata.uns["tspg_import"]["n_missing_filled"]
    print(f"wrote {out}: {adata.n_obs} samples x {adata.n_vars} genes" + (f", {n_filled} missing values filled" if n_filled else ""))
    return 0


def _list(args, parser) -> int:
    from .bundle import list_bundles

    entries = list_bundles(args.out)
    if not entries:
        print("no bundles")
    for e in entries:
        if e.error:
            print(f"{e.name}\tUNREADABLE: {e.error}")
        else:
            m = e.manifest
            acc = m.get("metrics", {}).get("perturbation_accuracy_non_target")
            print(f"{e.name}\t{m['dataset']['name']}\t{m['target']}\t{len(m['genes'])} genes\tperturbation accuracy {acc:.3f}")
    return 0


COMMANDS = {"import": _import, "list": _list}

if __name__ == "__main__":
    sys.exit(main())
