"""Command line: ``tspg-train`` and ``tspg <command>``. Argument parsing only.

Every command calls the same functions as the Python API and the dashboard. A bad input
ends with one line on stderr naming the file, sample or gene, and exit code 1; a bad
command line exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

logger = logging.getLogger("tspg")


def config_options() -> list[str]:
    """The TrainConfig fields that are command-line options (--field-name): every number or word but the recipe."""
    from .config import TrainConfig

    base = TrainConfig()
    return [
        f.name
        for f in fields(TrainConfig)
        if f.name != "recipe"
        and isinstance(getattr(base, f.name), int | float | str)
        and not isinstance(getattr(base, f.name), bool)
    ]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help, except None and False (nothing to show)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_data_args(p: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    g = p.add_argument_group("input GEM")
    g.add_argument(
        "data",
        nargs=None if data_required else "?",
        help="GEM file: .h5ad, .csv, .tsv, .txt or .npy",
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
        row_names=args.row_names,
        col_names=args.col_names,
    )


def build_train_parser(prog: str = "tspg-train") -> argparse.ArgumentParser:
    from .config import CHOICES, TrainConfig, config_fields

    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=_Formatter,
        description="Train a TSPG target model and generator on a labelled GEM and write a bundle.",
        epilog="examples:\n  tspg-train --demo\n  tspg-train gem.h5ad --label-key tissue --target Heart --gene-set hallmark.gmt:HALLMARK_HYPOXIA",
    )
    _add_data_args(p, data_required=False)
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
    g.add_argument("--target-model", help="reuse the target model, split and scaler of this bundle")
    g.add_argument(
        "--recipe",
        choices=CHOICES["recipe"],
        default="tspg+",
        help="loss recipe; options below override it",
    )
    h = p.add_argument_group("hyper-parameters (default: the recipe's value)")
    base, paper = TrainConfig.for_recipe("tspg+"), TrainConfig.for_recipe("paper")
    for name in config_options():
        a, b = getattr(base, name), getattr(paper, name)
        default = f"tspg+: {a}" + (f", paper: {b}" if a != b else "")
        h.add_argument(
            "--" + name.replace("_", "-"),
            type=type(a),
            default=None,
            choices=CHOICES.get(name),
            help=f"{config_fields()[name].metadata['help']} ({default})",
        )
    o = p.add_argument_group("output")
    o.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train"
    )
    o.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: the cores idle now, at least 1; or $TSPG_THREADS)",
    )
    o.add_argument(
        "--compile",
        action="store_true",
        help="run the networks through torch.compile (adds its compile time; plain torch where it fails)",
    )
    o.add_argument(
        "--out", default=None, help="bundle folder (default: $TSPG_MODELS_DIR or ./models)"
    )
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
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.target_model and (args.gene_set or args.genes):
        parser.error(
            "--gene-set and --genes cannot be used with --target-model: the reused target model fixes the genes"
        )
    if args.name and args.all_targets:
        parser.error("--name needs a single --target")
    if args.name:
        from .bundle import check_name

        try:
            check_name(args.name)
        except ValueError as err:
            parser.error(f"--name: {err}")
    from .config import config_problem

    for name in config_options():
        value = getattr(args, name)
        problem = None if value is None else config_problem(name, value)
        if problem:
            parser.error(f"--{name.replace('_', '-')} {value}: {problem}")
    _setup_logging(args.quiet)
    from .training import use_threads

    try:
        use_threads(args.threads)  # --threads, else $TSPG_THREADS, else the idle cores
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        return _train(args, parser, start)
    except (ValueError, OSError) as err:
        print(_error_line(err), file=sys.stderr)
        return 1


def _error_line(err: Exception) -> str:
    """The one stderr line of a failed command; a system error names its file."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"error: {err.filename}: {err.strerror or err}"
    return f"error: {err}"


def _train(args, parser, start: float) -> int:
    from .bundle import load_bundle, models_dir, resolve_bundle, save_bundle
    from .config import TrainConfig
    from .data import validate_labels
    from .datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo
    from .genesets import select_genes
    from .pipeline import TARGET_MODEL_FIELDS, default_names, train_all_targets

    reuse = (
        load_bundle(resolve_bundle(args.target_model, args.out, allow_path=True))
        if args.target_model
        else None
    )
    for name in (
        TARGET_MODEL_FIELDS if reuse else ()
    ):  # the reused bundle's settings are kept: refuse others
        given, used = getattr(args, name, None), getattr(reuse.config, name)
        if given is not None and given != used:
            option = "--" + name.replace("_", "-")
            parser.error(
                f"{option} {given} conflicts with --target-model {args.target_model}, whose target model and split were made with {option} {used}; drop {option}"
            )
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
    config = TrainConfig.for_recipe(
        args.recipe, **{name: getattr(args, name) for name in config_options()}
    )
    genes = (
        None
        if reuse
        else select_genes(adata.var_names, gene_set=args.gene_set, genes_file=args.genes)
    )
    # everything that can stop the run after training is checked before it
    validate_labels(adata, label_key, source=dataset)
    if target:
        targets = [target]
    else:
        targets = (
            list(reuse.classes) if reuse else sorted(adata.obs[label_key].astype(str).unique())
        )
    names = [args.name] if args.name else default_names(dataset, targets)
    root = models_dir(args.out)
    blocking = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(f"{blocking}: is a file; the bundles go into a folder (--out)")
    for name in names:
        if (root / name).exists() and not args.overwrite:
            raise ValueError(
                f"{root / name}: a bundle of that name exists; pass --overwrite or choose --name"
            )
    what = f"the genes, split and target model of {reuse.name!r}" if reuse else genes.summary()
    logger.info("data: %s, %d samples x %d genes; %s", dataset, adata.n_obs, adata.n_vars, what)
    logger.info("config: %s", config.to_dict())
    bars: dict = {}

    def progress(stage, step, n, losses):
        if args.quiet:
            return
        from tqdm.auto import tqdm

        if stage not in bars:
            bars[stage] = tqdm(total=n, desc=stage, unit="epoch", leave=True, file=sys.stderr)
        bar = bars[stage]
        bar.set_postfix(
            {k: f"{v:.3g}" for k, v in losses.items() if k != "total" and v}, refresh=False
        )
        bar.update(1)
        if step == n:
            bar.close()

    bundles = train_all_targets(
        adata,
        label_key=label_key,
        targets=targets,
        config=config,
        genes=genes,
        layer=None,
        dataset=dataset,
        target_model=reuse,
        device=args.device,
        names=names,
        progress=progress,
        compile=args.compile,
    )
    for b in bundles:
        path = save_bundle(b, args.out, overwrite=args.overwrite)
        m, used = b.metrics, b.config
        non_target = m["perturbation_accuracy_non_target"]
        print(f"bundle {path}")
        cov = f", L_td covariance: {b.manifest['covariance_used']}" if used.w_td else ""
        print(
            f"  target {b.target!r}, {len(b.genes)} genes, recipe {used.recipe}, device {m['device']}{cov}"
        )
        print(f"  target model held-out accuracy: {m['target_model_accuracy']:.3f}")
        print(
            f"  perturbation accuracy (held-out): all {m['perturbation_accuracy']:.3f}, non-target {'n/a' if non_target is None else f'{non_target:.3f}'} (n={m['n_test_non_target']})"
        )
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")


# ----------------------------------------------------------------------------- tspg <command>


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tspg", formatter_class=_Formatter, description="TSPG Explorer command line."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser("train", help="train a generator (same as tspg-train)", add_help=False)

    imp = sub.add_parser(
        "import",
        formatter_class=_Formatter,
        help="read a GEM into .h5ad",
        description="Read a GEM (text, .npy or .h5ad) and its labels into one .h5ad file.",
    )
    _add_data_args(imp)
    imp.add_argument("-o", "--output", required=True, help="output .h5ad")

    ls = sub.add_parser(
        "list", formatter_class=_Formatter, help="list the bundles in the models folder"
    )
    ls.add_argument(
        "--models", default=None, help="models folder (default: $TSPG_MODELS_DIR or ./models)"
    )
    _add_analysis_parsers(sub)

    app = sub.add_parser(
        "app",
        formatter_class=_Formatter,
        help="open the dashboard (trains the demo generator first if there is no bundle)",
        description="Start the TSPG Explorer dashboard (streamlit run streamlit_app.py). If the models folder holds no readable bundle, the demo generator is trained first (as tspg-train --demo).",
    )
    app.add_argument(
        "--models", default=None, help="models folder (default: $TSPG_MODELS_DIR or ./models)"
    )
    app.add_argument("--port", type=int, default=8501, help="port the dashboard listens on")
    app.add_argument(
        "--demo-epochs",
        type=int,
        default=None,
        help="generator epochs of the demo, if it must be trained (default: the recipe's; target-model epochs are capped at this)",
    )
    app.add_argument("--headless", action="store_true", help="do not open a browser window")
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
    except (ValueError, OSError) as err:
        print(_error_line(err), file=sys.stderr)
        return 1


def _import(args, parser) -> int:
    from .data import write_gem

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
    from .bundle import list_bundles

    entries = list_bundles(args.models)
    if not entries:
        print("no bundles")
    for e in entries:
        if e.error:
            print(f"{e.name}\tUNREADABLE: {e.error}")
        else:
            m = e.manifest
            acc = m.get("metrics", {}).get("perturbation_accuracy_non_target")
            acc = f"{acc:.3f}" if isinstance(acc, (int, float)) else "n/a"
            print(
                f"{e.name}\t{m.get('dataset', {}).get('name', '?')}\t{m['target']}\t{len(m['genes'])} genes\tperturbation accuracy {acc}"
            )
    return 0


def _find_app_script() -> Path:
    """streamlit_app.py in the working folder, else next to the installed package's folder."""
    for folder in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (folder / "streamlit_app.py").is_file() and (folder / "pages").is_dir():
            return folder / "streamlit_app.py"
    raise ValueError(
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


def _app(args, parser) -> int:
    from .bundle import list_bundles, models_dir

    if args.demo_epochs is not None and args.demo_epochs < 1:
        parser.error("--demo-epochs must be at least 1")
    if not 0 < args.port < 65536:
        parser.error("--port must be between 1 and 65535")
    script = _find_app_script()
    root = models_dir(args.models).resolve()
    entries = list_bundles(root)
    if not any(e.error is None for e in entries):
        print(f"no readable bundle in {root}: training the demo generator first", file=sys.stderr)
        train_argv = ["--demo", "--out", str(root), "--overwrite"]
        if args.demo_epochs:
            from .config import TrainConfig

            target_epochs = min(TrainConfig().target_epochs, args.demo_epochs)
            train_argv += ["--epochs", str(args.demo_epochs), "--target-epochs", str(target_epochs)]
        code = _run_train(build_train_parser("tspg app"), train_argv)
        if code:
            return code
    env = dict(os.environ, TSPG_MODELS_DIR=str(root))
    if args.demo_epochs:
        env["TSPG_DEMO_EPOCHS"] = str(args.demo_epochs)
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(args.port)]
    if args.headless:
        cmd += ["--server.headless", "true"]
    logger.info("starting the dashboard: %s (models: %s)", " ".join(cmd), root)
    return _exec(cmd, env, script.parent)  # there, streamlit reads the app's .streamlit/config.toml


# ----------------------------------------------------------------------------- perturb, evaluate, enrich


def _add_analysis_parsers(sub) -> None:
    """``tspg perturb``, ``tspg evaluate`` and ``tspg enrich``."""
    models_help = "models folder (default: $TSPG_MODELS_DIR or ./models)"
    bundle_help = "bundle name in the models folder, or the path of a bundle folder"

    pt = sub.add_parser(
        "perturb",
        formatter_class=_Formatter,
        help="perturb every sample of a GEM towards a bundle's target",
        description="Perturb a GEM with a bundle (genes matched by name, scaled with the bundle's scaler) and write "
        "x, P, x_adv, the target model's predictions and each sample's top genes.",
        epilog="examples:\n  tspg perturb pbmc68k-reduced-cd14-monocyte new_cells.h5ad -o perturbed.h5ad\n"
        "  tspg perturb my-bundle gem.tsv --labels labels.txt --csv -o perturbed/",
    )
    pt.add_argument("bundle", help=bundle_help)
    _add_data_args(pt)
    pt.add_argument("-o", "--output", required=True, help="output .h5ad (with --csv: a folder)")
    pt.add_argument(
        "--samples",
        nargs="+",
        metavar="ID",
        help="perturb only these sample ids (default: every sample)",
    )
    pt.add_argument("--k", type=int, default=20, help="top genes per direction and sample")
    pt.add_argument(
        "--csv",
        action="store_true",
        help="write CSV files into the --output folder instead: perturbation.csv (P), perturbed.csv (x_adv), predictions.csv, top_genes.csv, consensus.csv",
    )
    pt.add_argument("--models", default=None, help=models_help)

    ev = sub.add_parser(
        "evaluate",
        formatter_class=_Formatter,
        help="perturbation accuracy and realism metrics of a bundle",
        description="Evaluate a bundle on the held-out split of its own dataset: perturbation accuracy (overall, "
        "non-target, per source class), independent classifiers, energy distance and spread against real target "
        "samples, discriminator scores, next to the mean-shift baseline; consensus top genes and their overlap "
        "with differential expression. DATA may be omitted for the demo.",
    )
    ev.add_argument("bundle", help=bundle_help)
    _add_data_args(ev, data_required=False)
    ev.add_argument("--json", help="also write every metric to this JSON file")
    ev.add_argument("--k", type=int, default=20, help="top genes per direction")
    ev.add_argument("--seed", type=int, default=0, help="seed of the one-sample-per-class choice")
    ev.add_argument("--models", default=None, help=models_help)

    en = sub.add_parser(
        "enrich",
        formatter_class=_Formatter,
        help="functional enrichment of a bundle's consensus top genes",
        description="Profile the consensus top-k up and down genes of chosen samples (default: the held-out "
        "non-target samples of the bundle's dataset) with Enrichr, or offline with GMT gene sets and the bundle's "
        "genes as background. DATA may be omitted for the demo.",
    )
    en.add_argument("bundle", help=bundle_help)
    _add_data_args(en, data_required=False)
    en.add_argument(
        "-o", "--output", required=True, help="output CSV (one row per direction and term)"
    )
    en.add_argument(
        "--samples", nargs="+", metavar="ID", help="sample ids whose consensus top genes to profile"
    )
    en.add_argument(
        "--direction", choices=["up", "down", "both"], default="both", help="which top genes"
    )
    en.add_argument("--k", type=int, default=20, help="consensus top genes per direction")
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
        help="GMT files for the offline backend, besides the bundled blood-cell markers, the bundle's own gene-set file and every GMT in $TSPG_GMT_DIR",
    )
    en.add_argument(
        "--offline",
        action="store_true",
        help="never contact Enrichr: hypergeometric test against GMT gene sets",
    )
    en.add_argument(
        "--threshold",
        type=float,
        default=1e-4,
        help="q-value below which a term counts as significant",
    )
    en.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for Enrichr before answering offline",
    )
    en.add_argument("--models", default=None, help=models_help)

    mp = sub.add_parser(
        "map",
        formatter_class=_Formatter,
        help="the t-SNE map of real samples with perturbed samples placed on it",
        description="Fit the reference t-SNE map of the real samples of some classes (the target first; at most "
        "--n-per-class each, seeded subsample), perturb the chosen samples (default: the held-out non-target samples "
        "of DATA, or all its non-target samples when it holds none of the bundle's held-out split) and place them on "
        "the fixed map. Writes the tidy map frame: x, y, sample, class, predicted, kind (real / perturbed). "
        "DATA may be omitted for the demo.",
        epilog="example:\n  tspg map pbmc68k-reduced-cd14-monocyte --classes 'CD19+ B' 'CD56+ NK' -o map.csv",
    )
    mp.add_argument("bundle", help=bundle_help)
    _add_data_args(mp, data_required=False)
    mp.add_argument("-o", "--output", required=True, help="output CSV (one row per point)")
    mp.add_argument(
        "--classes",
        nargs="+",
        metavar="CLASS",
        help="classes of the real samples (the target is always added); default: the target and the most frequent, 10 in all",
    )
    mp.add_argument(
        "--n-per-class", type=int, default=300, help="at most this many real samples per class"
    )
    mp.add_argument("--samples", nargs="+", metavar="ID", help="sample ids to perturb and place")
    mp.add_argument(
        "--seed", type=int, default=0, help="seed of the subsample and of the t-SNE fit"
    )
    mp.add_argument("--models", default=None, help=models_help)


def _load_cli_bundle(args):
    from .bundle import load_bundle, resolve_bundle

    return load_bundle(resolve_bundle(args.bundle, args.models, allow_path=True))


def _cli_data(args, bundle, *, own: bool):
    """(AnnData, label key or None) from DATA; with ``own``, the bundle's dataset when DATA is omitted."""
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
    return adata, key if key in adata.obs else None


def _chosen_samples(adata, samples: list[str], source: str) -> list[str]:
    """The sample ids asked for, each once, in the order given; an error lists those not in the data."""
    ids = list(dict.fromkeys(samples))
    unknown = [s for s in ids if s not in adata.obs_names]
    if unknown:
        shown = ", ".join(unknown[:10]) + (
            f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        )
        raise ValueError(
            f"{source}: {len(unknown)} of the {len(ids)} sample ids given are not in the data: {shown}"
        )
    return ids


def _data_name(args, bundle) -> str:
    """How messages name DATA: the file, else the bundle's own dataset."""
    return str(args.data) if args.data else bundle.manifest.get("dataset", {}).get("name", "data")


def _check_k(parser, k: int) -> None:
    if k < 1:
        parser.error("--k must be at least 1")


def _perturb(args, parser) -> int:
    import pandas as pd

    from .data import write_gem
    from .metrics import perturbation_accuracy_table
    from .perturb import consensus, perturb, perturb_adata, top_genes_df

    _check_k(parser, args.k)
    bundle = _load_cli_bundle(args)
    adata, label_key = _cli_data(args, bundle, own=False)
    if args.samples:
        adata = adata[_chosen_samples(adata, args.samples, _data_name(args, bundle))].copy()
    out = Path(args.output)
    if args.csv:
        result = perturb_adata(bundle, adata, label_key=label_key, source=str(args.data))
        out.mkdir(parents=True, exist_ok=True)
        index = pd.Index(result.samples, name="sample")
        pd.DataFrame(result.P, index=index, columns=bundle.genes).to_csv(
            out / "perturbation.csv", float_format="%.6g"
        )
        pd.DataFrame(result.x_adv, index=index, columns=bundle.genes).to_csv(
            out / "perturbed.csv", float_format="%.6g"
        )
        result.predictions_df().to_csv(out / "predictions.csv")
        top_genes_df(result, k=args.k).to_csv(out / "top_genes.csv", index=False)
        consensus(result.P[result.source_rows()], bundle.genes, k=args.k).to_csv(
            out / "consensus.csv", index=False
        )
        pred_after, labels = result.pred_after, result.labels
        print(
            f"wrote {out}/: perturbation.csv, perturbed.csv, predictions.csv, top_genes.csv, consensus.csv"
        )
    else:
        if out.suffix.lower() != ".h5ad":
            parser.error("--output must end in .h5ad (or add --csv to write a folder of CSV files)")
        result = perturb(
            adata, bundle, label_key=label_key, k=args.k, source=str(args.data), copy=True
        )
        write_gem(result, out)
        pred_after = result.obs["tspg_pred_after"].astype(str).to_numpy()
        labels = result.obs[label_key].astype(str).to_numpy() if label_key else None
        print(
            f"wrote {out}: layers tspg_x, tspg_perturbation, tspg_perturbed; obs tspg_pred_before/after; uns['tspg'] (top genes, consensus)"
        )
    n_target = int((pred_after == bundle.target).sum())
    print(
        f"{len(pred_after)} samples x {len(bundle.genes)} genes perturbed towards {bundle.target!r}: {n_target} now predicted {bundle.target!r}"
    )
    if labels is not None and (labels != bundle.target).any():
        table = perturbation_accuracy_table(pred_after, labels, bundle.target)
        print("perturbation accuracy by source class:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _evaluate(args, parser) -> int:
    import json

    from .metrics import evaluate, evaluation_table

    _check_k(parser, args.k)
    bundle = _load_cli_bundle(args)
    adata, label_key = _cli_data(args, bundle, own=True)
    if label_key is None:
        raise ValueError(
            f"data: no label column {args.label_key or bundle.label_key!r} in obs; give --label-key (or --labels)"
        )
    result = evaluate(bundle, adata, label_key=label_key, k=args.k, seed=args.seed)
    b = result["bundle"]
    print(
        f"bundle {b['name']}: target {b['target']!r}, {b['genes']} genes, {b['classes']} classes, dataset {b['dataset']}"
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
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=False))
        print(f"wrote {args.json}")
    return 0


def _enrich(args, parser) -> int:
    import numpy as np

    from .enrichment import EnrichrError, enrich_directions, offline_gmt_files
    from .perturb import consensus_top, perturb_adata

    _check_k(parser, args.k)
    bundle = _load_cli_bundle(args)
    adata, label_key = _cli_data(args, bundle, own=True)
    if args.samples:
        ids = _chosen_samples(adata, args.samples, _data_name(args, bundle))
        what = "chosen samples"
    else:
        ids = [s for s in bundle.split["test"] if s in adata.obs_names]
        what = "held-out"
        if not ids:
            ids, what = list(adata.obs_names), "all"
        if label_key:
            labels = adata[ids].obs[label_key].astype(str).to_numpy()
            ids = list(np.asarray(ids, dtype=object)[labels != bundle.target])
            what += " non-target samples"
        else:
            what += " samples"
        if not ids:
            raise ValueError(
                "no samples to profile: every selected sample is of the target class; give --samples"
            )
    result = perturb_adata(bundle, adata[ids], label_key=label_key)
    lists = consensus_top(result.P, bundle.genes, k=args.k)
    up = lists["up"] if args.direction in ("up", "both") else None
    down = lists["down"] if args.direction in ("down", "both") else None
    print(f"consensus top-{args.k} genes of {len(ids)} {what}, towards {bundle.target!r}")
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
        raise ValueError(f"enrichment failed: {err}") from err
    out = Path(args.output)
    table.to_csv(out, index=False)
    for d, backend in table.attrs.get("backend", {}).items():
        message = table.attrs.get("messages", {}).get(d, "")
        print(f"{d}: backend {backend}" + (f" ({message})" if message else ""))
    n_sig = int(table["significant"].sum()) if len(table) else 0
    print(f"wrote {out}: {len(table)} terms, {n_sig} significant (q < {args.threshold:g})")
    for d in ("up", "down"):
        top = (
            table[(table["direction"] == d) & table["significant"]].head(3) if len(table) else table
        )
        for r in top.itertuples(index=False):
            print(f"  {d}: {r.library} / {r.term} (q={r.q:.2g}, {r.overlap})")
    return 0


def _map(args, parser) -> int:
    import numpy as np

    from .data import align_genes
    from .embedding import MAP_MAX_CLASSES, fit_class_map, map_frame, place
    from .perturb import class_probabilities, perturb_adata

    if args.n_per_class < 1:
        parser.error("--n-per-class must be at least 1")
    bundle = _load_cli_bundle(args)
    adata, label_key = _cli_data(args, bundle, own=False)
    if label_key is None:
        raise ValueError(
            f"data: no label column {args.label_key or bundle.label_key!r} in obs; the map colours real samples by class (give --label-key or --labels)"
        )
    labels = adata.obs[label_key].astype(str).to_numpy()
    names = np.asarray(adata.obs_names).astype(str)
    if args.samples:
        ids, what = _chosen_samples(adata, args.samples, _data_name(args, bundle)), "chosen samples"
    else:
        held = set(bundle.split.get("test", []))
        rows = np.isin(names, list(held)) if held else np.zeros(len(names), bool)
        what = "held-out non-target samples"
        if not rows.any():
            rows, what = np.ones(len(names), bool), "non-target samples"
        ids = names[rows & (labels != bundle.target)].tolist()
        if not ids:
            raise ValueError(
                "no samples to place: every candidate is of the target class; give --samples"
            )
    source = _data_name(args, bundle)
    Xs = bundle.scaler.transform(
        align_genes(adata, bundle.genes, source=source), genes=bundle.genes, source=source
    )
    ref, idx = fit_class_map(
        Xs,
        labels,
        names,
        classes=args.classes,
        target=bundle.target,
        max_classes=None if args.classes else MAP_MAX_CLASSES,
        max_per_class=args.n_per_class,
        seed=args.seed,
    )
    real_pred = np.asarray(bundle.classes, dtype=object)[
        class_probabilities(bundle.target_model, Xs[idx]).argmax(1)
    ]
    result = perturb_adata(bundle, adata[ids], label_key=label_key)
    frame = map_frame(
        ref,
        place(ref, result.x_adv),
        new_samples=result.samples,
        new_source=result.labels,
        new_pred=result.pred_after,
        real_pred=real_pred,
    )
    frame.to_csv(args.output, index=False)
    n_target = int((result.pred_after == bundle.target).sum())
    print(
        f"map of {len(ref)} real samples of {len(set(ref.labels))} classes; {len(ids)} {what} placed, {n_target} now predicted {bundle.target!r}"
    )
    print(f"wrote {args.output}: {len(frame)} rows (x, y, sample, class, predicted, kind)")
    return 0


COMMANDS = {
    "import": _import,
    "list": _list,
    "app": _app,
    "perturb": _perturb,
    "evaluate": _evaluate,
    "enrich": _enrich,
    "map": _map,
}

if __name__ == "__main__":
    sys.exit(main())
