"""Command line: ``tspg-train`` and ``tspg <command>``.

Each command parses its arguments, makes one call to the Python API (the functions the
dashboard calls too) and prints the result. A problem the user caused (a bad file, option,
gene or sample: :class:`tspg.errors.UserError`) ends with one line on stderr and exit code 2,
as a bad command line does; ``--debug`` adds the traceback. Any other exception is a bug
in tspg and shows its traceback.

Importing this module, and ``--help``, import neither torch nor anndata: the API is
imported inside each command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from .config import (
    CHOICES,
    MAX_EPOCHS,
    MAX_SEED,
    TrainConfig,
    config_fields,
    config_options,
    config_problem,
    field_default,
    field_kind,
    format_option,
    number_problem,
    option_name,
    parse_option,
)
from .errors import UserError, check_writable, one_line, user_file

__all__ = ["build_parser", "build_train_parser", "main", "train_main"]

logger = logging.getLogger("tspg")

MODELS_HELP = "models folder (default: $TSPG_MODELS_DIR or ./models)"
BUNDLE_HELP = "bundle name in the models folder, or the path of a bundle folder"
APP_PAGES = "app_pages"  # the dashboard's page folder, beside streamlit_app.py


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help, except None and False (nothing to show)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _bounded(kind: type, *, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number of ``kind`` (int or float) in a range, checked as the
    TrainConfig fields are (:func:`tspg.config.number_problem`). argparse puts the option's
    name first: ``argument --seed: must be 0 or more, not -1``."""

    def convert(text: str):
        value = kind(text)  # a ValueError: argparse's "invalid int value: 'x'"
        problem = number_problem(
            value,
            integer=kind is int,
            low=low,
            high=high,
            low_open=low_open,
            high_open=high_open,
        )
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, not {text.strip()}")
        return value

    convert.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return convert


# The bounds of the options that are not TrainConfig fields (those carry their own)
MAX_K = 100_000  # top genes per direction (more than a bundle's genes: all of them)
MAX_PER_CLASS = 1_000_000
MAX_GENES = 10_000_000
MAX_THREADS = 1024
MAX_TIMEOUT_S = 600.0
MAX_WORKERS = 10_000  # workers, batch jobs, tasks per GPU of a sweep
MAX_RETRIES = 100
_seed = _bounded(int, low=0, high=MAX_SEED)
_workers = _bounded(int, low=1, high=MAX_WORKERS)


# ----------------------------------------------------------------------------- parent parsers


def _common_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not just its message"
    )
    return p


def _data_parent(*, required: bool) -> argparse.ArgumentParser:
    """DATA and the options that say how to read it (``tspg.data.read_gem``)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("input GEM")
    g.add_argument(
        "data",
        nargs=None if required else "?",
        help="GEM file: .h5ad, .csv, .tsv, .txt or .npy"
        + ("" if required else " (may be omitted for the demo's bundles)"),
    )
    g.add_argument(
        "--label-key", help="obs column (h5ad) holding each sample's class; name given to --labels"
    )
    g.add_argument(
        "--labels",
        help="labels file: sample <tab> label per line (reference format) or CSV with header",
    )
    g.add_argument("--layer", help="h5ad: read this layer instead of .X")
    g.add_argument("--use-raw", action="store_true", help="h5ad: read .raw instead of .X")
    g.add_argument("--transpose", action="store_true", help="the file is genes x samples")
    g.add_argument("--row-names", help=".npy: sample names file (default <stem>.rownames.txt)")
    g.add_argument("--col-names", help=".npy: gene names file (default <stem>.colnames.txt)")
    g.add_argument(
        "--nan",
        choices=["fill", "error"],
        default="fill",
        help="missing values: fill with the matrix minimum, or refuse",
    )
    g.add_argument(
        "--short-rows",
        choices=["error", "fill"],
        default="error",
        help="text: a row with fewer fields than the header: refuse it, or read its missing "
        "fields as missing values (then --nan applies)",
    )
    return p


def _bundle_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("bundle", help=BUNDLE_HELP)
    p.add_argument("--models", default=None, help=MODELS_HELP)
    return p


def _models_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--models", default=None, help=MODELS_HELP)
    return p


def _k_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--k", type=_bounded(int, low=1, high=MAX_K), default=20, help="top genes per direction"
    )
    return p


def _samples_parent(what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--samples", nargs="+", metavar="ID", help=what)
    return p


# ----------------------------------------------------------------------------- tspg-train


def _option_type(name: str):
    """argparse type of TrainConfig field ``name`` (argparse's own for plain numbers)."""
    kind, optional = field_kind(name)
    if kind in ("int", "float") and not optional:
        return {"int": int, "float": float}[kind]
    if kind == "str" and not optional:
        return None

    def convert(text: str):
        try:
            return parse_option(name, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = kind  # argparse names it in "invalid <kind> value"
    return convert


def _add_config_options(p: argparse.ArgumentParser, g) -> None:
    """One option per TrainConfig field, from the field's metadata (help, allowed words);
    ``--recipe`` into the group ``g``, the others into a group of their own."""
    g.add_argument(
        "--recipe",
        choices=CHOICES["recipe"],
        default="tspg+",
        help="loss recipe; the hyper-parameters below override it",
    )
    h = p.add_argument_group("hyper-parameters (default: the recipe's value)")
    for name in config_options():
        meta = config_fields()[name].metadata
        a, b = field_default(name, "tspg+"), field_default(name, "paper")
        default = f"tspg+: {format_option(a)}" + (f", paper: {format_option(b)}" if a != b else "")
        kind, _ = field_kind(name)
        extra = {"metavar": "W,W,..."} if kind == "widths" else {}
        if kind == "bool":
            extra = {"action": argparse.BooleanOptionalAction}
        else:
            extra.update(type=_option_type(name), choices=CHOICES.get(name))
        h.add_argument(option_name(name), default=None, help=f"{meta['help']} ({default})", **extra)


def build_train_parser(prog: str = "tspg-train") -> argparse.ArgumentParser:
    """The parser of ``tspg-train`` (and ``tspg train``): data, what to train, every
    TrainConfig field as an option, output."""
    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=_Formatter,
        parents=[_data_parent(required=False), _common_parent()],
        description="Train a TSPG target model and generator on a labelled GEM and write a bundle.",
        epilog="examples:\n  tspg-train --demo\n  tspg-train gem.h5ad --label-key tissue --target Heart "
        "--gene-set hallmark.gmt:HALLMARK_HYPOXIA\n  tspg-train gem.h5ad --label-key tissue --target Heart "
        "--target-hidden 512,256,128",
    )
    p.add_argument(
        "--demo", action="store_true", help="train on scanpy's pbmc68k_reduced (label bulk_labels)"
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--target", help="target class (demo default: CD14+ Monocyte)")
    g.add_argument(
        "--all-targets",
        action="store_true",
        help="one generator per class, sharing one target model",
    )
    g.add_argument(
        "--gene-set",
        help="FILE.gmt:NAME (or a list file in the reference format); default all genes",
    )
    g.add_argument("--genes", help="file with one gene per line")
    # big data: genes are chosen on the sparse / on-disk matrix before anything is dense
    g.add_argument(
        "--n-top-genes",
        type=_bounded(int, low=1, high=MAX_GENES),
        metavar="N",
        help="train on the N highly variable genes of the training split (scanpy's "
        "highly_variable_genes, flavour cell_ranger: for log-normalised data)",
    )
    g.add_argument(
        "--backed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=".h5ad: leave the matrix on disk and read the chosen genes a chunk at a time "
        "(default: when it would take more than a quarter of the memory available)",
    )
    g.add_argument("--target-model", help="reuse the target model, split and scaler of this bundle")
    _add_config_options(p, g)
    o = p.add_argument_group("output")
    o.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train"
    )
    o.add_argument(
        "--threads",
        type=_bounded(int, low=1, high=MAX_THREADS),
        default=None,
        help="CPU threads for torch (default: the cores idle now, at least 1; or $TSPG_THREADS)",
    )
    o.add_argument(
        "--compile",
        action="store_true",
        help="run the networks through torch.compile (adds its compile time; plain torch where it fails)",
    )
    o.add_argument(
        "--out", default=None, help=MODELS_HELP.replace("models folder", "bundle folder")
    )
    o.add_argument("--name", help="bundle name (default: <dataset>-<target>)")
    o.add_argument("--overwrite", action="store_true", help="replace a bundle of the same name")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``tspg-train`` arguments: the recipe's, with the options given."""
    return TrainConfig.for_recipe(
        args.recipe, **{name: getattr(args, name) for name in config_options()}
    )


def train_main(argv: list[str] | None = None) -> int:
    """``tspg-train``."""
    return _run_train(build_train_parser(), argv)


def _run_train(parser: argparse.ArgumentParser, argv) -> int:
    args = parser.parse_args(argv)
    _check_train_usage(args, parser)
    _check_config_options(args, parser)
    args.config = _config_of(args, parser)
    _setup_logging(args.quiet)
    from .training import use_threads

    try:
        use_threads(args.threads)  # --threads, else $TSPG_THREADS, else the idle cores
    except ValueError as err:
        parser.error(str(err))
    return _guarded(_train, args, parser)


def _check_train_usage(args, parser) -> None:
    """Contradictory or missing arguments: a usage error (exit 2) before anything is read."""
    problems = [
        (args.demo and args.data, "give a data file or --demo, not both"),
        (not args.demo and not args.data, "give a data file (or --demo)"),
        (args.target and args.all_targets, "give --target or --all-targets, not both"),
        (args.gene_set and args.genes, "give --gene-set or --genes, not both"),
        (
            args.n_top_genes and (args.gene_set or args.genes),
            "give --gene-set, --genes or --n-top-genes, not two of them",
        ),
        (
            args.target_model and (args.gene_set or args.genes),
            "--gene-set and --genes cannot be used with --target-model: the reused target model fixes the genes",
        ),
        (
            args.target_model and args.n_top_genes,
            "--n-top-genes cannot be used with --target-model: the reused target model fixes the genes",
        ),
        (args.name and args.all_targets, "--name needs a single --target"),
        (
            args.data and not args.label_key and not args.labels,
            "--label-key (or --labels) is required with a data file",
        ),
        (
            args.data and not args.target and not args.all_targets,
            "--target CLASS (or --all-targets) is required",
        ),
    ]
    for wrong, message in problems:
        if wrong:
            parser.error(message)
    if args.name:
        from .bundle import check_name

        try:
            check_name(args.name)
        except UserError as err:
            parser.error(f"--name: {err}")


def _check_config_options(args, parser) -> None:
    """Each hyper-parameter given is in its range (``tspg.config.config_problem``)."""
    for name in config_options():
        value = getattr(args, name)
        problem = None if value is None else config_problem(name, value)
        if problem:
            parser.error(f"{option_name(name)} {format_option(value)}: {problem}")


def _config_of(args, parser) -> TrainConfig:
    """The run's TrainConfig; a rule between options (every loss weight 0) is a usage
    error naming the options, before anything is read."""
    try:
        return config_from_args(args)
    except UserError as err:
        parser.error(_with_option_names(str(err)))


def _with_option_names(message: str) -> str:
    """A TrainConfig message with its field names written as options (``w_gan`` -> ``--w-gan``)."""
    import re

    names = sorted(config_options(), key=len, reverse=True)
    pattern = r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])"
    return re.sub(pattern, lambda m: option_name(m.group(1)), message)


def _reused_target_model(args, parser):
    """The bundle of ``--target-model`` (None without); its settings may not be contradicted."""
    if not args.target_model:
        return None
    from .bundle import load_bundle, resolve_bundle
    from .pipeline import TARGET_MODEL_FIELDS

    reuse = load_bundle(resolve_bundle(args.target_model, args.out, allow_path=True))
    for name in TARGET_MODEL_FIELDS:
        given, used = getattr(args, name, None), getattr(reuse.config, name)
        if given is not None and given != used:
            option = option_name(name)
            parser.error(
                f"{option} {format_option(given)} conflicts with --target-model {args.target_model}, whose "
                f"target model and split were made with {option} {format_option(used)}; drop {option}"
            )
    return reuse


def _train_data(args):
    """(AnnData, dataset name, label key, target or None) of --demo or DATA."""
    if args.demo:
        from .datasets import DEMO_LABEL_KEY, DEMO_NAME, DEMO_TARGET, demo

        target = args.target or (None if args.all_targets else DEMO_TARGET)
        return demo(), DEMO_NAME, args.label_key or DEMO_LABEL_KEY, target
    return _read_data(args), Path(args.data).stem, args.label_key or "label", args.target


def _progress(quiet: bool):
    """The training callback: one tqdm bar per stage on stderr (None with --quiet)."""
    if quiet:
        return None
    from tqdm.auto import tqdm

    bars: dict = {}

    def progress(stage, step, n, losses):
        if stage not in bars:
            bars[stage] = tqdm(total=n, desc=stage, unit="epoch", leave=True, file=sys.stderr)
        bar = bars[stage]
        bar.set_postfix(
            {k: f"{v:.3g}" for k, v in losses.items() if k != "total" and v}, refresh=False
        )
        bar.update(1)
        if step == n:
            bar.close()

    return progress


def _train(args, parser) -> int:
    from .bundle import models_dir
    from .genesets import select_genes
    from .pipeline import check_run, train_all_targets

    start = time.perf_counter()
    reuse = _reused_target_model(args, parser)
    adata, dataset, label_key, target = _train_data(args)
    config = args.config
    genes = (
        None
        if reuse or args.n_top_genes
        else select_genes(adata.var_names, gene_set=args.gene_set, genes_file=args.genes)
    )
    # everything that could stop the run after its first epoch, checked now (and again,
    # the same way, by train_all_targets): labels, split, targets, names, --out
    plan = check_run(
        adata,
        label_key=label_key,
        targets=[target] if target else None,
        config=config,
        dataset=dataset,
        target_model=reuse,
        names=[args.name] if args.name else None,
        out=models_dir(args.out),
        overwrite=args.overwrite,
    )
    what = (
        f"the genes, split and target model of {reuse.name!r}"
        if reuse
        else f"the {args.n_top_genes} highly variable genes of the training split"
        if args.n_top_genes
        else genes.summary()
    )
    logger.info("data: %s, %d samples x %d genes; %s", dataset, adata.n_obs, adata.n_vars, what)
    logger.info("config: %s", config.to_dict())
    bundles = train_all_targets(  # each bundle saved (and printed) as soon as it is trained
        adata,
        label_key=label_key,
        targets=plan.targets,
        config=config,
        genes=genes,
        n_top_genes=args.n_top_genes,
        dataset=dataset,
        target_model=reuse,
        device=args.device,
        names=plan.names,
        out=plan.out,
        overwrite=args.overwrite,
        progress=_progress(args.quiet),
        on_bundle=lambda b: _print_trained(b, b.path),
        compile=args.compile,
    )
    if plan.skipped:
        print(
            f"trained {len(bundles)} of {len(plan.classes)} classes; no generator for "
            f"{', '.join(map(repr, plan.skipped))} (too few samples: see the warning above)"
        )
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


def _print_trained(b, path: Path) -> None:
    m, used = b.metrics, b.config
    non_target = m["perturbation_accuracy_non_target"]
    cov = f", L_td covariance: {b.manifest['covariance_used']}" if used.w_td else ""
    print(f"bundle {path}")
    print(
        f"  target {b.target!r}, {len(b.genes)} genes, recipe {used.recipe}, device {m['device']}{cov}"
    )
    print(f"  target model held-out accuracy: {m['target_model_accuracy']:.3f}")
    print(
        f"  perturbation accuracy (held-out): all {m['perturbation_accuracy']:.3f}, non-target "
        f"{'n/a' if non_target is None else f'{non_target:.3f}'} (n={m['n_test_non_target']})"
    )
    if m.get("n_test_total", m["n_test"]) > m["n_test"]:
        print(
            f"  (on a seeded subsample of {m['n_test']} of the {m['n_test_total']} held-out samples)"
        )
    members = m.get("members", {}).get("perturbation_accuracy_non_target")
    if members:
        print(
            f"  {b.n_generators} generators (seeds {', '.join(map(str, b.member_seeds))}), their "
            f"mean perturbation; each one's non-target accuracy: median {members['median']:.3f}, "
            f"min {members['min']:.3f}, max {members['max']:.3f}"
        )
    _print_verdict(b.manifest.get("verdict"), indent="  ")


def _print_verdict(verdict: dict | None, *, indent: str = "", **kwargs) -> None:
    """Print a verdict (tspg.verdict.verdict_lines); nothing for a bundle without one."""
    from .verdict import verdict_lines

    if verdict:
        for line in verdict_lines(verdict, **kwargs):
            print(indent + line)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")


def _guarded(command, args, parser) -> int:
    """Run a command: a UserError becomes one line on stderr and exit code 2 (with
    ``--debug``, after its traceback); any other exception propagates (a bug)."""
    try:
        return command(args, parser)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)  # one line, whatever names it holds
        return 2


# ----------------------------------------------------------------------------- tspg <command>


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``tspg``: one subcommand per analysis (``tspg train`` is ``tspg-train``)."""
    p = argparse.ArgumentParser(
        prog="tspg", formatter_class=_Formatter, description="TSPG Explorer command line."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser("train", help="train a generator (same as tspg-train)", add_help=False)
    common, models = _common_parent(), _models_parent()
    bundle, k = _bundle_parent(), _k_parent()
    data, data_optional = _data_parent(required=True), _data_parent(required=False)

    def command(name: str, parents: list, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[*parents, common], formatter_class=_Formatter, **kw)

    imp = command(
        "import",
        [data],
        help="read a GEM into .h5ad",
        description="Read a GEM (text, .npy or .h5ad) and its labels into one .h5ad file.",
    )
    imp.add_argument("-o", "--output", required=True, help="output .h5ad")
    command("list", [models], help="list the bundles in the models folder")
    _add_perturb_parser(command, [bundle, data, k])
    _add_evaluate_parser(command, [bundle, data_optional, k])
    _add_enrich_parser(command, [bundle, data_optional, k])
    _add_map_parser(command, [bundle, data_optional])
    _add_app_parser(command, [models])
    _add_sweep_parser(command, [data, k])
    return p


def _add_perturb_parser(command, parents) -> None:
    pt = command(
        "perturb",
        [*parents, _samples_parent("perturb only these sample ids (default: every sample)")],
        help="perturb every sample of a GEM towards a bundle's target",
        description="Perturb a GEM with a bundle (genes matched by name, scaled with the bundle's scaler) and write "
        "x, P, x_adv, the target model's predictions and each sample's top genes.",
        epilog="examples:\n  tspg perturb pbmc68k-reduced-cd14-monocyte new_cells.h5ad -o perturbed.h5ad\n"
        "  tspg perturb my-bundle gem.tsv --labels labels.txt --csv -o perturbed/",
    )
    pt.add_argument("-o", "--output", required=True, help="output .h5ad (with --csv: a folder)")
    pt.add_argument(
        "--csv",
        action="store_true",
        help="write CSV files into the --output folder instead: perturbation.csv (P), perturbed.csv (x_adv), "
        "predictions.csv, top_genes.csv, consensus.csv",
    )


def _add_evaluate_parser(command, parents) -> None:
    ev = command(
        "evaluate",
        parents,
        help="perturbation accuracy and realism metrics of a bundle",
        description="Evaluate a bundle on the held-out split of its own dataset: perturbation accuracy (overall, "
        "non-target, per source class), independent classifiers, energy distance and spread against real target "
        "samples, discriminator scores, next to the mean-shift baseline; consensus top genes and their overlap "
        "with differential expression (target vs rest); and per source class, TSPG's genes beside differential "
        "expression of the target against that class alone and that class's mean shift. DATA may be omitted "
        "for the demo.",
    )
    ev.add_argument(
        "--json",
        help="also write every metric to this JSON file (with the per-source gene records)",
    )
    ev.add_argument(
        "--genes",
        action="store_true",
        help="also print, per source class, TSPG's top genes and the genes only the baselines rank high",
    )
    ev.add_argument("--seed", type=_seed, default=0, help="seed of the one-sample-per-class choice")


def _add_enrich_parser(command, parents) -> None:
    en = command(
        "enrich",
        [*parents, _samples_parent("sample ids whose consensus top genes to profile")],
        help="functional enrichment of a bundle's consensus top genes",
        description="Profile the consensus top-k up and down genes of chosen samples (default: the held-out "
        "non-target samples of the bundle's dataset) with Enrichr, or offline with GMT gene sets and the bundle's "
        "genes as background. DATA may be omitted for the demo.",
    )
    en.add_argument(
        "-o", "--output", required=True, help="output CSV (one row per direction and term)"
    )
    en.add_argument(
        "--direction", choices=["up", "down", "both"], default="both", help="which top genes"
    )
    en.add_argument(
        "--libraries",
        nargs="+",
        metavar="NAME",
        help="Enrichr libraries (default: tspg.enrichment.DEFAULT_LIBRARIES)",
    )
    en.add_argument(
        "--gmt",
        nargs="+",
        metavar="FILE",
        default=[],
        help="GMT files for the offline backend, besides the bundled blood-cell markers, the bundle's own "
        "gene-set file and every GMT in $TSPG_GMT_DIR",
    )
    en.add_argument(
        "--offline",
        action="store_true",
        help="never contact Enrichr: hypergeometric test against GMT gene sets",
    )
    en.add_argument(
        "--threshold",
        type=_bounded(float, low=0, high=1, low_open=True),
        default=1e-4,
        help="q-value below which a term counts as significant",
    )
    en.add_argument(
        "--timeout",
        type=_bounded(float, low=0, high=MAX_TIMEOUT_S, low_open=True),
        default=10.0,
        help="seconds to wait for Enrichr before answering offline",
    )


def _add_map_parser(command, parents) -> None:
    mp = command(
        "map",
        [*parents, _samples_parent("sample ids to perturb and place")],
        help="the t-SNE map of real samples with perturbed samples placed on it",
        description="Fit the reference t-SNE map of the real samples of some classes (the target first; at most "
        "--n-per-class each, seeded subsample), perturb the chosen samples (default: the held-out non-target samples "
        "of DATA, or all its non-target samples when it holds none of the bundle's held-out split) and place them on "
        "the fixed map. Writes the tidy map frame: x, y, sample, class, predicted, kind (real / perturbed). "
        "DATA may be omitted for the demo.",
        epilog="example:\n  tspg map pbmc68k-reduced-cd14-monocyte --classes 'CD19+ B' 'CD56+ NK' -o map.csv",
    )
    mp.add_argument("-o", "--output", required=True, help="output CSV (one row per point)")
    mp.add_argument(
        "--classes",
        nargs="+",
        metavar="CLASS",
        help="classes of the real samples (the target is always added); default: the target and the most "
        "frequent, 10 in all",
    )
    mp.add_argument(
        "--n-per-class",
        type=_bounded(int, low=1, high=MAX_PER_CLASS),
        default=300,
        help="at most this many real samples per class",
    )
    mp.add_argument(
        "--seed", type=_seed, default=0, help="seed of the subsample and of the t-SNE fit"
    )


def _add_app_parser(command, parents) -> None:
    app = command(
        "app",
        parents,
        help="open the dashboard (trains the demo generator first if there is no bundle)",
        description="Start the TSPG Explorer dashboard (streamlit run streamlit_app.py). If the models folder "
        "holds no readable bundle, the demo generator is trained first (as tspg-train --demo). It listens on "
        "127.0.0.1 (this machine only); --address 0.0.0.0 exposes it to the network, upload page included, "
        "without any login.",
    )
    app.add_argument(
        "--port",
        type=_bounded(int, low=1, high=65535),
        default=8501,
        help="port the dashboard listens on",
    )
    app.add_argument(
        "--address",
        default="127.0.0.1",
        help="address the dashboard listens on; 0.0.0.0 (every interface) exposes it to the network",
    )
    app.add_argument(
        "--demo-epochs",
        type=_bounded(int, low=1, high=MAX_EPOCHS),
        default=None,
        help="generator epochs of the demo, if it must be trained (default: the recipe's; target-model "
        "epochs are capped at this)",
    )
    app.add_argument("--headless", action="store_true", help="do not open a browser window")


def main(argv: list[str] | None = None) -> int:
    """``tspg``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return _run_train(build_train_parser("tspg train"), argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(False)
    return _guarded(COMMANDS[args.command], args, parser)


# ----------------------------------------------------------------------------- data and bundles


def _read_data(args):
    from .data import read_gem

    return read_gem(
        args.data,
        label_key=args.label_key,
        labels=args.labels,
        layer=args.layer,
        use_raw=args.use_raw,
        transpose=args.transpose,
        nan=args.nan,
        short_rows=args.short_rows,
        row_names=args.row_names,
        col_names=args.col_names,
        backed=getattr(args, "backed", None),
    )


def _load_bundle(args):
    from .bundle import load_bundle, resolve_bundle

    return load_bundle(resolve_bundle(args.bundle, args.models, allow_path=True))


def _data(args, bundle, *, own: bool):
    """(AnnData, label key or None, name for messages) of DATA; with ``own``, the bundle's
    dataset when DATA is omitted (and a warning when DATA is not it)."""
    from .datasets import load_bundle_dataset

    if args.labels and not args.label_key:
        args.label_key = bundle.label_key  # labels from a file are stored under the bundle's key
    if args.data is None:
        adata = load_bundle_dataset(bundle)
    else:
        adata = _read_data(args)
        if own:
            adata = load_bundle_dataset(bundle, adata)
    key = args.label_key or bundle.label_key
    name = str(args.data) if args.data else bundle.manifest["dataset"]["name"]
    return adata, key if key in adata.obs else None, name


# ----------------------------------------------------------------------------- commands


def _import(args, parser) -> int:
    from .data import write_gem

    check_writable(args.output)
    if args.labels is None and args.label_key is None and not str(args.data).endswith(".h5ad"):
        logger.warning("no --labels given: the .h5ad will have no classes")
    adata = _read_data(args)
    out = write_gem(adata, args.output)
    n_filled = adata.uns["tspg_import"]["n_missing_filled"]
    print(
        f"wrote {out}: {adata.n_obs} samples x {adata.n_vars} genes"
        + (f", {n_filled} missing values filled" if n_filled else "")
    )
    return 0


def _list(args, parser) -> int:
    from .bundle import list_bundles, models_dir

    root = models_dir(args.models)
    # (the library lists a missing folder as empty: the dashboard's may not exist yet)
    if not os.path.lexists(root):
        raise UserError(f"{root}: no such models folder (give the folder with --models)")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (--models is the folder that holds the bundles)")
    entries = list_bundles(root)
    if not entries:
        print("no bundles")
    for e in entries:
        s = {k: one_line(v) for k, v in e.summary().items()}  # one line, one tab per column
        if e.error:
            print(f"{s['name']}\tUNREADABLE: {s['error']}")
            continue
        acc = e.summary()["perturbation accuracy"]
        acc = f"{acc:.3f}" if isinstance(acc, int | float) else "n/a"
        n_gen = e.summary()["generators"]
        print(
            f"{s['name']}\t{s['dataset']}\t{s['target']}\t{s['genes']} genes\tperturbation accuracy {acc}"
            f"\t{n_gen} generator{'s' if n_gen != 1 else ''}"
        )
    return 0


def _perturb(args, parser) -> int:
    from .bundle import chosen_samples
    from .perturbation import perturb_adata, write_perturbed

    out = Path(args.output)
    if not args.csv and out.suffix.lower() != ".h5ad":
        parser.error("--output must end in .h5ad (or add --csv to write a folder of CSV files)")
    check_writable(out, folder=args.csv)  # now, not after the work
    bundle = _load_bundle(args)
    adata, key, name = _data(args, bundle, own=False)
    if args.samples:
        adata = adata[chosen_samples(adata, args.samples, source=name)].copy()
    if args.csv:
        result = perturb_adata(adata, bundle, label_key=key, source=name)
        written = result.to_csv(out, k=args.k)
        verdict = _write_verdict_json(bundle, result, out / "verdict.json")
        print(f"wrote {out}/: {', '.join(p.name for p in written)}, verdict.json")
        pred_after, labels = result.pred_after, result.labels
        match = result.gene_match.to_dict()
    else:
        result = write_perturbed(  # a chunk of samples at a time, straight into the file
            adata, bundle, out, label_key=key, k=args.k, source=name
        )
        print(
            f"wrote {out}: layers tspg_x, tspg_perturbation, tspg_perturbed; obs tspg_pred_before/after; "
            "uns['tspg'] (top genes, consensus, verdict)"
        )
        verdict = result.uns["tspg"]["verdict"]
        pred_after = result.obs["tspg_pred_after"].astype(str).to_numpy()
        labels = result.obs[key].astype(str).to_numpy() if key else None
        match = result.uns["tspg"]["gene_match"]
    _print_accuracy(bundle, pred_after, labels, match)
    _print_verdict(verdict, only=("fail", "caution"))
    return 0


def _print_accuracy(bundle, pred_after, labels, match: dict) -> None:
    from .data import gene_match_summary
    from .metrics import perturbation_accuracy_table

    n_target = int((pred_after == bundle.target).sum())
    if match.get("n_missing") or match.get("n_case_matched") or match.get("from_var_column"):
        print(f"genes: {gene_match_summary(match)}")  # matched ignoring case, by var, or filled
    print(
        f"{len(pred_after)} samples x {len(bundle.genes)} genes perturbed towards {bundle.target!r}: "
        f"{n_target} now predicted {bundle.target!r}"
    )
    if labels is not None and (labels != bundle.target).any():
        table = perturbation_accuracy_table(pred_after, labels, bundle.target)
        print("perturbation accuracy by source class:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _print_selection_verdict(bundle, result) -> None:
    """The verdict on the samples a command perturbed (the bundle's checks and the
    selection's), its level and every check that is not ok, as ``tspg perturb`` prints it."""
    from .verdict import selection_verdict

    _print_verdict(selection_verdict(bundle, result), only=("fail", "caution"))


def _write_verdict_json(bundle, result, path: Path) -> dict:
    """The selection's verdict (tspg.verdict.selection_verdict), written as JSON; returned."""
    import json

    from .verdict import selection_verdict

    verdict = selection_verdict(bundle, result)
    path.write_text(json.dumps(verdict, indent=1, allow_nan=False))
    return verdict


def _evaluate(args, parser) -> int:
    import json

    from .metrics import evaluate

    if args.json:
        check_writable(args.json)
    bundle = _load_bundle(args)
    adata, key, name = _data(args, bundle, own=True)
    if key is None:
        raise UserError(
            f"{name}: no label column {args.label_key or bundle.label_key!r} in obs; give --label-key (or --labels)"
        )
    result = evaluate(adata, bundle, label_key=key, k=args.k, seed=args.seed)
    _print_evaluation(result)
    _print_by_source(result["by_source"], genes=args.genes)
    print()
    _print_verdict(result["verdict"], figures=True)
    if args.json:
        with user_file(args.json):
            Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=False))
        print(f"wrote {args.json}")
    return 0


def _print_evaluation(result: dict) -> None:
    from .metrics import evaluation_table

    b = result["bundle"]
    print(
        f"bundle {b['name']}: target {b['target']!r}, {b['genes']} genes, {b['classes']} classes, dataset {b['dataset']}"
    )
    n = result["samples"]
    for part, used, total in (
        ("training", n["train"], n["train_total"]),
        ("held-out", n["heldout"], n["heldout_total"]),
    ):
        if used < total:
            print(
                f"on a seeded subsample of {used} of the {total} {part} samples (--seed {result['params']['seed']})"
            )
    section = None
    for row in evaluation_table(result).itertuples(index=False):
        if row.section != section:
            section = row.section
            print(f"\n{section}")
        value = row.value
        text = (
            "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        )
        print(f"  {row.metric:<62} {text}")
    tg = result["top_genes"]
    print(
        f"\nconsensus top-{tg['k']} up genes (held-out non-target samples): {', '.join(tg['consensus_up'])}"
    )
    print(f"consensus top-{tg['k']} down genes: {', '.join(tg['consensus_down'])}")


def _print_by_source(by_source: dict, *, genes: bool) -> None:
    import pandas as pd

    from .baselines import gene_table, source_table

    k, far = by_source["k"], by_source["far"]
    print(
        f"\nby source class (held-out samples of each class; top {k} per direction): TSPG's genes of the class "
        f"(by mean P) against DE (Wilcoxon, target vs that class alone) and MS (the class's mean shift, by the "
        f"change it makes), both fit on the training split. TSPG only: top {k} in TSPG, beyond rank {far} in DE "
        f"and MS; baselines only: top {k} in DE and MS, beyond rank {far} in TSPG; against source: TSPG's "
        f"genes whose mean P has the opposite sign of the class's mean shift; beyond target: whose mean x_adv "
        f"is more than one target sd from the target mean; accuracy: perturbation accuracy"
    )
    table = source_table(by_source["sources"])
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if not genes:
        print("(the genes of each list: --genes, or --json)")
        return
    records = pd.DataFrame(by_source["genes"])
    for s in table["source"]:
        for which, title in (
            ("tspg", f"TSPG's top {k} genes"),
            ("baselines", "genes the baselines rank high and TSPG does not"),
        ):
            rows = (
                records[(records["source"] == s) & (records["list"] == which)]
                if len(records)
                else records
            )
            if len(rows):
                print(f"\n{s}: {title}")
                with pd.option_context("display.width", 250, "display.max_columns", None):
                    print(
                        gene_table(rows).to_string(
                            index=False, float_format=lambda v: f"{v:.3f}", na_rep=""
                        )
                    )


def _enrich(args, parser) -> int:
    from .enrichment import EnrichrError, enrich_directions, offline_gmt_files
    from .perturbation import consensus_top, perturb_adata

    check_writable(args.output)
    bundle = _load_bundle(args)
    adata, key, name = _data(args, bundle, own=True)
    from .pipeline import HELDOUT_MAX_SAMPLES

    choice = bundle.source_samples(
        adata, samples=args.samples, label_key=key, source=name, max_samples=HELDOUT_MAX_SAMPLES
    )
    result = perturb_adata(adata[choice.ids], bundle, label_key=key, source=name)
    lists = consensus_top(result.P, bundle.genes, k=args.k)
    up = lists["up"] if args.direction in ("up", "both") else None
    down = lists["down"] if args.direction in ("down", "both") else None
    print(
        f"consensus top-{args.k} genes of {len(choice)} {choice.description}, towards {bundle.target!r}"
    )
    for d, genes in (("up", up), ("down", down)):
        if genes:
            print(f"  {d}: {', '.join(genes)}")
    try:
        table = enrich_directions(
            up,
            down,
            background=list(bundle.genes),
            libraries=args.libraries,
            gmt_files=offline_gmt_files(bundle, extra=args.gmt),
            backend="offline" if args.offline else "auto",
            threshold=args.threshold,
            timeout=args.timeout,
        )
    except EnrichrError as err:
        raise UserError(f"enrichment failed: {err}; try --offline") from err
    with user_file(args.output):
        table.to_csv(args.output, index=False)
    _print_enrichment(table, args.output, args.threshold)
    _print_selection_verdict(bundle, result)
    return 0


def _print_enrichment(table, out, threshold: float) -> None:
    for d, backend in table.attrs.get("backend", {}).items():
        message = table.attrs.get("messages", {}).get(d, "")
        print(f"{d}: backend {backend}" + (f" ({message})" if message else ""))
    n_sig = int(table["significant"].sum()) if len(table) else 0
    print(f"wrote {out}: {len(table)} terms, {n_sig} significant (q < {threshold:g})")
    if not len(table):
        return
    for d in ("up", "down"):
        for r in (
            table[(table["direction"] == d) & table["significant"]].head(3).itertuples(index=False)
        ):
            print(f"  {d}: {r.library} / {r.term} (q={r.q:.2g}, {r.overlap})")


def _map(args, parser) -> int:
    from .embedding import perturbation_map

    check_writable(args.output)
    bundle = _load_bundle(args)
    adata, key, name = _data(args, bundle, own=False)
    result = perturbation_map(
        adata,
        bundle,
        samples=args.samples,
        label_key=key or args.label_key or bundle.label_key,
        classes=args.classes,
        max_per_class=args.n_per_class,
        seed=args.seed,
        source=name,
    )
    with user_file(args.output):
        result.frame.to_csv(args.output, index=False)
    ref, pert = result.ref, result.perturbation
    n_target = int((pert.pred_after == bundle.target).sum())
    print(
        f"map of {len(ref)} real samples of {len(set(ref.labels))} classes; {len(pert)} {result.samples.description} "
        f"placed, {n_target} now predicted {bundle.target!r}"
    )
    print(f"wrote {args.output}: {len(result.frame)} rows (x, y, sample, class, predicted, kind)")
    _print_selection_verdict(bundle, pert)
    return 0


# ----------------------------------------------------------------------------- tspg app


def find_app_script() -> Path:
    """streamlit_app.py (with its ``app_pages/``) in the working folder, else beside the
    installed package's folder."""
    for folder in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (folder / "streamlit_app.py").is_file() and (folder / APP_PAGES).is_dir():
            return folder / "streamlit_app.py"
    raise UserError(
        f"streamlit_app.py not found in {Path.cwd()} or beside the tspg package; "
        "run `tspg app` from the TSPG Explorer folder (the one holding streamlit_app.py)"
    )


def _exec(cmd: list[str], env: dict, cwd: Path) -> int:
    """Replace this process with ``cmd`` run in ``cwd`` (a separate function, so tests can intercept it)."""
    if sys.platform == "win32":  # exec does not keep the console on Windows
        import subprocess

        return subprocess.call(cmd, env=env, cwd=cwd)
    os.chdir(cwd)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _ensure_a_bundle(root: Path, demo_epochs: int | None) -> int:
    """Train the demo into ``root`` when it holds no readable bundle; the exit code (0: fine)."""
    from .bundle import list_bundles

    if any(e.error is None for e in list_bundles(root)):
        return 0
    print(f"no readable bundle in {root}: training the demo generator first", file=sys.stderr)
    argv = ["--demo", "--out", str(root), "--overwrite"]
    if demo_epochs:
        target_epochs = min(TrainConfig().target_epochs, demo_epochs)
        argv += ["--epochs", str(demo_epochs), "--target-epochs", str(target_epochs)]
    return _run_train(build_train_parser("tspg app"), argv)


def _app(args, parser) -> int:
    from .bundle import models_dir

    script = find_app_script()
    root = models_dir(args.models).resolve()
    code = _ensure_a_bundle(root, args.demo_epochs)
    if code:
        return code
    env = dict(os.environ, TSPG_MODELS_DIR=str(root))
    if args.demo_epochs:
        env["TSPG_DEMO_EPOCHS"] = str(args.demo_epochs)
    cmd = [sys.executable, "-m", "streamlit", "run", str(script)]
    cmd += ["--server.port", str(args.port), "--server.address", args.address]
    if args.headless:
        cmd += ["--server.headless", "true"]
    if args.address not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "the dashboard listens on %s: anyone who can reach this machine can use it and upload files",
            args.address,
        )
    logger.info("starting the dashboard: %s (models: %s)", " ".join(cmd), root)
    return _exec(cmd, env, script.parent)  # there, streamlit reads the app's .streamlit/config.toml


# ----------------------------------------------------------------------------- tspg sweep

SWEEP_JOBQUEUES = ["lsf", "pbs", "sge", "slurm"]  # tspg.sweep.JOBQUEUES (no import for --help)


def _add_sweep_parser(command, parents) -> None:
    """``tspg sweep``: every gene set x target on Dask (the optional extra ``tspg[sweep]``)."""
    sw = command(
        "sweep",
        parents,
        help="train a generator for every gene set x target, in parallel on Dask",
        description="Train one target model per gene set and one generator per gene set and target, each a "
        "task on Dask: a local cluster by default, a running scheduler (--scheduler) or batch jobs "
        "(--jobqueue). Finished bundles are skipped on a rerun; failures are recorded and summarised "
        "(exit code 1 when any). Writes the bundles and the results table sweep.csv (and sweep.parquet) "
        'into --out. Needs pip install "tspg[sweep]".',
        epilog="examples:\n"
        "  tspg sweep gem.h5ad --label-key tissue --gene-sets h.all.gmt --out sweep-hallmark\n"
        "  tspg sweep gem.h5ad --label-key tissue --gene-sets h.all.gmt --sets 'HALLMARK_*' "
        "--targets Heart Lung --workers 4\n"
        "  tspg sweep gem.h5ad --label-key tissue --gene-sets h.all.gmt --jobqueue slurm --jobs 10 "
        "--device cuda",
    )
    g = sw.add_argument_group("grid")
    g.add_argument(
        "--gene-sets",
        nargs="+",
        metavar="FILE",
        help="GMT files and/or reference-format list files (default: one set of all genes)",
    )
    g.add_argument(
        "--sets",
        nargs="+",
        metavar="NAME",
        help="only the gene sets of these names (shell patterns allowed, e.g. 'HALLMARK_*')",
    )
    g.add_argument(
        "--min-genes",
        type=_bounded(int, low=1, high=MAX_GENES),
        help="only gene sets with at least this many genes in the GEM",
    )
    g.add_argument(
        "--max-genes",
        type=_bounded(int, low=1, high=MAX_GENES),
        help="only gene sets with at most this many genes in the GEM",
    )
    g.add_argument(
        "--targets", nargs="+", metavar="CLASS", default=["all"], help="target classes, or all"
    )
    _add_config_options(sw, g)
    e = sw.add_argument_group("engine (Dask)")
    e.add_argument(
        "--workers",
        type=_workers,
        help="worker processes of the local cluster (default: cores / --threads)",
    )
    e.add_argument(
        "--threads",
        type=_bounded(int, low=1, high=MAX_THREADS),
        help="torch threads per task (default: cores / --workers on the local cluster; "
        "elsewhere the workers' OMP_NUM_THREADS, 1 under Dask)",
    )
    e.add_argument(
        "--scheduler", metavar="ADDRESS", help="run on this Dask scheduler (tcp://host:8786)"
    )
    e.add_argument(
        "--jobqueue",
        choices=SWEEP_JOBQUEUES,
        help="run on batch jobs configured in Dask's jobqueue config (~/.config/dask/jobqueue.yaml)",
    )
    e.add_argument(
        "--jobs", type=_workers, default=1, help="batch jobs to submit (with --jobqueue)"
    )
    e.add_argument(
        "--retries",
        type=_bounded(int, low=0, high=MAX_RETRIES),
        default=1,
        help="retries of a task that crashed (a bad input or setting is not retried)",
    )
    e.add_argument(
        "--tasks-per-gpu",
        type=_workers,
        default=4,
        help="with --device cuda: tasks sharing one GPU (each asks for 1/N of a GPU resource)",
    )
    o = sw.add_argument_group("output")
    o.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where each task trains (chosen on the worker)",
    )
    o.add_argument(
        "--out",
        default=None,
        help="folder of the bundles and sweep.csv (default: $TSPG_MODELS_DIR or ./models); "
        "every worker must see it",
    )
    o.add_argument(
        "--overwrite", action="store_true", help="retrain finished bundles too (default: skip)"
    )
    o.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would run (and the batch job script with --jobqueue); start nothing",
    )
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _check_sweep_usage(args, parser) -> None:
    """Contradictory or missing arguments: a usage error (exit 2) before anything is read."""
    filters = args.sets or args.min_genes is not None or args.max_genes is not None
    problems = [
        (args.retries < 0, "--retries must be 0 or more"),
        (args.min_genes is not None and args.min_genes < 0, "--min-genes must be 0 or more"),
        (args.max_genes is not None and args.max_genes < 0, "--max-genes must be 0 or more"),
        (
            args.min_genes is not None
            and args.max_genes is not None
            and args.min_genes > args.max_genes,
            "--min-genes is more than --max-genes",
        ),
        (args.scheduler and args.jobqueue, "give --scheduler or --jobqueue, not both"),
        (
            args.workers and (args.scheduler or args.jobqueue),
            "--workers sizes the local cluster; with --scheduler or --jobqueue the workers are theirs",
        ),
        (args.jobs != 1 and not args.jobqueue, "--jobs needs --jobqueue"),
        (
            filters and not args.gene_sets,
            "--sets, --min-genes and --max-genes filter --gene-sets: give the files",
        ),
        (not args.label_key and not args.labels, "--label-key (or --labels) is required"),
        ("all" in args.targets and len(args.targets) > 1, "--targets: give all, or classes"),
    ]
    for wrong, message in problems:
        if wrong:
            parser.error(message)


def _sweep(args, parser) -> int:
    """``tspg sweep``: parse -> :func:`tspg.sweep.sweep` -> a summary; 1 when anything failed."""
    _check_sweep_usage(args, parser)
    _check_config_options(args, parser)
    from .sweep import quiet_dask, read_gene_set_files, sweep

    quiet_dask()
    start = time.perf_counter()
    adata = _read_data(args)
    gene_sets = None
    if args.gene_sets:
        gene_sets = read_gene_set_files(
            args.gene_sets,
            names=args.sets,
            min_genes=args.min_genes,
            max_genes=args.max_genes,
            gem_genes=adata.var_names,
        )
    bar = None

    def progress(row, counts):
        nonlocal bar
        if args.quiet:
            return
        from tqdm.auto import tqdm

        if bar is None:
            bar = tqdm(total=counts["total"], desc="sweep", unit="generator", file=sys.stderr)
        if row is not None:
            bar.update(1)
        left = counts["total"] - counts["trained"] - counts["failed"]
        bar.set_postfix(trained=counts["trained"], failed=counts["failed"], left=left)

    try:
        table = sweep(
            adata,
            label_key=args.label_key or "label",
            gene_sets=gene_sets,
            targets="all" if args.targets == ["all"] else args.targets,
            config=config_from_args(args),
            out=args.out,
            dataset=Path(args.data).stem,
            device=args.device,
            workers=args.workers,
            threads=args.threads,
            scheduler=args.scheduler,
            jobqueue=args.jobqueue,
            jobs=args.jobs,
            retries=args.retries,
            tasks_per_gpu=args.tasks_per_gpu,
            k=args.k,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.dry_run:
        _print_sweep_plan(table, args)
        return 0
    return _print_sweep_summary(table, time.perf_counter() - start)


def _print_sweep_plan(table, args) -> None:
    from .sweep import jobqueue_cluster

    counts = table["status"].value_counts()
    print(
        f"dry run: {table['gene_set'].nunique()} gene sets x {table['target'].nunique()} targets: "
        f"{counts.get('to train', 0)} to train, {counts.get('skipped', 0)} finished earlier, "
        f"{counts.get('failed', 0)} cannot run"
    )
    for r in table[table["status"] == "failed"].itertuples(index=False):
        print(f"  cannot run: {r.gene_set} / {r.target}: {r.error}")
    if args.jobqueue:
        cluster = jobqueue_cluster(args.jobqueue)
        try:
            print(f"\nthe {args.jobqueue} job script ({args.jobs} job(s) would be submitted):")
            print(cluster.job_script())
        finally:
            cluster.close()


def _print_sweep_summary(table, seconds: float) -> int:
    counts = table["status"].value_counts()
    print(
        f"sweep of {table['gene_set'].nunique()} gene sets x {table['target'].nunique()} targets: "
        f"{counts.get('trained', 0)} trained, {counts.get('skipped', 0)} skipped (finished earlier), "
        f"{counts.get('failed', 0)} failed; {seconds:.1f} s"
    )
    if "path" in table.attrs:
        print(f"results: {table.attrs['path']}")
    failed = table[table["status"] == "failed"]
    for r in failed.head(20).itertuples(index=False):
        print(f"  failed: {r.gene_set} / {r.target}: {r.error}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more (see the results table)")
    return 1 if len(failed) else 0


COMMANDS = {
    "import": _import,
    "list": _list,
    "app": _app,
    "perturb": _perturb,
    "evaluate": _evaluate,
    "enrich": _enrich,
    "map": _map,
    "sweep": _sweep,
}

if __name__ == "__main__":
    sys.exit(main())
