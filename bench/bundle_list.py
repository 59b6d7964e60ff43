"""What listing and loading bundles cost, with every check they make (issue 10).

Listing reads each manifest (strict JSON, the schema), checks each weight file's header
(names, shapes, types) and, once per version of a file, reads its values to refuse NaN
or infinity; later listings only ``stat`` the files. This script saves bundles of the
paper's network sizes for the demo's shape (765 genes, 10 classes, 700 samples) and for
GTEx's (4,386 genes, 53 classes, 11,690 samples) and prints, per size, the median of
several runs of:

- ``manifest``: reading and checking the manifest (``read_manifest``), next to a plain
  ``json.loads`` of the same file;
- ``headers``: the manifest and the weight files' headers only (what listing checked
  before issue 10; the networks' shapes built anew each time, as then);
- ``first listing``: ``list_bundles`` of a folder holding that one bundle, values read;
- ``later listing``: the same again (values and shapes known from the caches);
- ``load``: ``load_bundle`` (every value read and checked again).

    python bench/bundle_list.py            # both sizes, 7 runs each
    python bench/bundle_list.py --runs 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tspg import bundle as B
from tspg.bundle import Bundle, list_bundles, load_bundle, new_manifest, read_manifest, save_bundle
from tspg.config import TrainConfig
from tspg.nets import Discriminator, Generator, TargetClassifier

SIZES = {"demo (765 genes)": (765, 10, 700), "GTEx (4,386 genes)": (4386, 53, 11690)}


def make_bundle(n_genes: int, n_classes: int, n_samples: int) -> Bundle:
    rng = np.random.default_rng(0)
    genes = [f"GENE{j:05d}" for j in range(n_genes)]
    classes = [f"class-{c:02d}" for c in range(n_classes)]
    samples = [f"SAMPLE-{i:06d}" for i in range(n_samples)]
    n_test = n_samples // 5
    manifest = new_manifest(
        name="bench",
        dataset={"name": "bench", "fingerprint": "0" * 64, "n_samples": n_samples},
        label_key="label",
        classes=classes,
        target=classes[0],
        genes=genes,
        gene_set={"name": "all", "source": None, "n_requested": n_genes, "n_missing": 0},
        scaler={
            "minimum": rng.random(n_genes).tolist(),
            "range": (rng.random(n_genes) + 0.5).tolist(),
        },
        split={"train": samples[n_test:], "test": samples[:n_test]},
        config=TrainConfig().to_dict(),
        target_mean=rng.random(n_genes).tolist(),
        covariance_used="none (L_td off)",
        target_model_from=None,
        metrics={
            "target_model_accuracy": 0.9,
            "perturbation_accuracy": 0.95,
            "perturbation_accuracy_non_target": 0.95,
            "perturbation_accuracy_by_source": {c: 0.95 for c in classes[1:]},
            "n_test": n_test,
            "n_test_non_target": n_test - 10,
        },
        history={k: rng.random(60).tolist() for k in ("total", "gan", "adv", "ed", "d")},
    )
    torch.manual_seed(0)
    return Bundle(
        manifest,
        Generator(n_genes).eval(),
        Discriminator(n_genes).eval(),
        TargetClassifier(n_genes, n_classes).eval(),
    )


def median_ms(fn, runs: int, before=None) -> float:
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def headers(path: Path) -> None:
    manifest = read_manifest(path)
    root = path.parent.resolve()
    for key, expected in B._expected_tensors(manifest, path).items():
        B._weight_file(path, key, expected, root, values=False)


def forget() -> None:
    """Forget what listing learnt: the weight files' values and the networks' shapes."""
    B._VALUES_CHECKED.clear()
    B._EXPECTED.clear()


def measure(label: str, shape: tuple[int, int, int], folder: Path, runs: int) -> dict:
    root = folder / label.split()[0].lower()
    path = save_bundle(make_bundle(*shape), root)
    size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    manifest_mb = (path / "manifest.json").stat().st_size / 1e6
    text = (path / "manifest.json").read_text()
    list_bundles(root)  # warm the page cache and the imports
    return {
        "bundle": f"{label}, {size_mb:.0f} MB (manifest {manifest_mb:.2f} MB)",
        "json.loads": median_ms(lambda: json.loads(text), runs),
        "manifest": median_ms(lambda: read_manifest(path), runs),
        "headers": median_ms(lambda: headers(path), runs, before=B._EXPECTED.clear),
        "first listing": median_ms(lambda: list_bundles(root), runs, before=forget),
        "later listing": median_ms(lambda: list_bundles(root), runs),
        "load": median_ms(lambda: load_bundle(path), runs),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(label, shape, Path(tmp), args.runs) for label, shape in SIZES.items()]
    cols = list(rows[0])
    print(f"median of {args.runs} runs, ms (1 torch thread)")
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join([row["bundle"]] + [f"{row[c]:.1f}" for c in cols[1:]]))


if __name__ == "__main__":
    main()
