"""Model bundles: save, load (fresh process, no pickle), validation, atomic writes, listing."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_CONFIG, make_tiny_adata
from safetensors.torch import load_file, save_file

from tspg.bundle import (
    Bundle,
    check_name,
    list_bundles,
    load_bundle,
    models_dir,
    resolve_bundle,
    save_bundle,
    slug,
    train_command,
)
from tspg.config import (
    TrainConfig,
    config_fields,
    config_options,
    config_problem,
    field_kind,
    format_option,
    option_name,
)
from tspg.data import align_genes
from tspg.errors import UserError
from tspg.perturbation import class_probabilities, generate_perturbed


class _Trap:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture
def bundle_copy(quick_bundle, tmp_path) -> Path:
    """A private copy of the quick bundle's folder, safe to damage."""
    dst = tmp_path / "models" / quick_bundle.name
    shutil.copytree(quick_bundle.path, dst)
    return dst


def one_line_value_error(func, *args) -> str:
    with pytest.raises(ValueError) as err:
        func(*args)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- round trip


def test_saved_bundle_layout(quick_bundle):
    path = quick_bundle.path
    assert sorted(p.name for p in path.iterdir()) == [
        "discriminator.safetensors",
        "generator.safetensors",
        "manifest.json",
        "target_model.safetensors",
    ]
    m = json.loads((path / "manifest.json").read_text())
    for key in (
        "format_version",
        "created",
        "tspg_version",
        "torch_version",
        "dataset",
        "label_key",
        "classes",
        "target",
        "genes",
        "gene_set",
        "scaler",
        "split",
        "config",
        "metrics",
        "history",
    ):
        assert key in m, key
    assert m["classes"] == ["alpha", "beta", "gamma"] and m["target"] == "beta"
    assert m["config"]["seed"] == 0 and m["dataset"]["fingerprint"]
    assert sorted(m["split"]["train"] + m["split"]["test"]) == sorted(make_tiny_adata().obs_names)


def test_load_in_same_process_gives_same_outputs(quick_bundle):
    loaded = load_bundle(quick_bundle.path)
    assert loaded.genes == quick_bundle.genes and loaded.classes == quick_bundle.classes
    assert loaded.config == quick_bundle.config
    X = quick_bundle.scaler.transform(make_tiny_adata().X)
    np.testing.assert_array_equal(
        generate_perturbed(loaded.generator, X)[0], generate_perturbed(quick_bundle.generator, X)[0]
    )


FRESH = r"""
import json, sys
import numpy as np, anndata as ad
from tspg.bundle import load_bundle
from tspg.config import (
    TrainConfig,
    config_fields,
    config_options,
    config_problem,
    format_option,
    option_name,
)
from tspg.data import align_genes
from tspg.errors import UserError
from tspg.perturbation import class_probabilities, generate_perturbed
b = load_bundle(sys.argv[1])
adata = ad.read_h5ad(sys.argv[2])
test = adata[b.split["test"]]
X = b.scaler.transform(align_genes(test, b.genes))
P = generate_perturbed(b.generator, X)[0]
pred = class_probabilities(b.target_model, np.clip(X + P, 0, 1)).argmax(1)
non_target = (test.obs[b.label_key].astype(str) != b.target).to_numpy()
np.save(sys.argv[3], P)
print(json.dumps({"genes": b.genes, "accuracy": float((pred[non_target] == b.classes.index(b.target)).mean())}))
"""


def test_fresh_process_loads_same_genes_same_p_same_accuracy(quick_bundle, tmp_path):
    adata = make_tiny_adata()
    shuffled = adata[
        :, list(adata.var_names[::-1])
    ].copy()  # genes in another order: matched by name
    shuffled.write_h5ad(tmp_path / "tiny.h5ad")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH,
            str(quick_bundle.path),
            str(tmp_path / "tiny.h5ad"),
            str(tmp_path / "P.npy"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["genes"] == quick_bundle.genes
    assert result["accuracy"] == quick_bundle.metrics["perturbation_accuracy_non_target"]
    test = adata[quick_bundle.split["test"]]
    X = quick_bundle.scaler.transform(align_genes(test, quick_bundle.genes))
    np.testing.assert_allclose(
        np.load(tmp_path / "P.npy"), generate_perturbed(quick_bundle.generator, X)[0], atol=1e-6
    )


# ----------------------------------------------------------------------------- no pickle, validation


def test_loading_never_unpickles(bundle_copy, tmp_path):
    sentinel = tmp_path / "unpickled"
    trap = pickle.dumps(_Trap(str(sentinel)))
    for name in ("generator.pt", "generator.pth", "model.pkl", "target_model.bin"):
        (bundle_copy / name).write_bytes(trap)
    torch.save({"trap": _Trap(str(sentinel))}, bundle_copy / "discriminator.pt")
    load_bundle(bundle_copy)
    list_bundles(bundle_copy.parent)
    assert not sentinel.exists()
    # a pickle where the weights should be is refused, not run
    (bundle_copy / "generator.safetensors").write_bytes(trap)
    msg = one_line_value_error(load_bundle, bundle_copy)
    assert "generator.safetensors: unreadable weights" in msg
    assert not sentinel.exists()


def test_tensor_with_wrong_shape_named(bundle_copy):
    file = bundle_copy / "target_model.safetensors"
    tensors = load_file(str(file))
    tensors["net.0.weight"] = tensors["net.0.weight"][:, :-1].contiguous()  # one gene short
    save_file(tensors, str(file))
    msg = one_line_value_error(load_bundle, bundle_copy)
    assert str(file) in msg and "'net.0.weight'" in msg and "shape" in msg


def test_missing_or_extra_tensor_named(bundle_copy):
    file = bundle_copy / "discriminator.safetensors"
    tensors = load_file(str(file))
    save_file({**tensors, "net.99.weight": torch.zeros(2)}, str(file))
    assert "unexpected tensor" in one_line_value_error(load_bundle, bundle_copy)
    del tensors["net.0.bias"]
    save_file(tensors, str(file))
    assert "tensor 'net.0.bias' is missing" in one_line_value_error(load_bundle, bundle_copy)


def test_missing_weight_file_named(bundle_copy):
    (bundle_copy / "generator.safetensors").unlink()
    msg = one_line_value_error(load_bundle, bundle_copy)
    assert str(bundle_copy) in msg and "generator.safetensors" in msg


CORRUPT_MANIFESTS = {
    "truncated": lambda m: json.dumps(m)[:200],
    "binary": lambda m: b"\xff\xfe\x00garbage",
    "a list": lambda m: "[1, 2, 3]",
    "no genes": lambda m: json.dumps({k: v for k, v in m.items() if k != "genes"}),
    "target not a class": lambda m: json.dumps({**m, "target": "delta"}),
    "scaler too short": lambda m: json.dumps({**m, "scaler": {"minimum": [0.0], "range": [1.0]}}),
    "scaler not a dict": lambda m: json.dumps({**m, "scaler": [1, 2]}),
    "format version text": lambda m: json.dumps({**m, "format_version": "one"}),
    "format version newer": lambda m: json.dumps({**m, "format_version": 99}),
    "config wrong": lambda m: json.dumps({**m, "config": {**m["config"], "gen_encoder": "wide"}}),
    "config word wrong": lambda m: json.dumps(
        {**m, "config": {**m["config"], "adv_space": "prob"}}
    ),
    "no dataset": lambda m: json.dumps({k: v for k, v in m.items() if k != "dataset"}),
    "gene set not a dict": lambda m: json.dumps({**m, "gene_set": "all"}),
}


@pytest.mark.parametrize("damage", list(CORRUPT_MANIFESTS))
def test_corrupt_manifest_is_a_one_line_error_naming_the_file(bundle_copy, damage):
    mf = bundle_copy / "manifest.json"
    content = CORRUPT_MANIFESTS[damage](json.loads(mf.read_text()))
    mf.write_bytes(content if isinstance(content, bytes) else content.encode())
    msg = one_line_value_error(load_bundle, bundle_copy)
    assert str(mf) in msg
    [entry] = list_bundles(bundle_copy.parent)
    assert entry.manifest is None and str(mf) in entry.error


def test_folder_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "not a bundle (no manifest.json)" in one_line_value_error(
        load_bundle, tmp_path / "empty"
    )


# ----------------------------------------------------------------------------- atomic save


def unsaved_copy(bundle: Bundle, **manifest_changes) -> Bundle:
    return Bundle(
        {**bundle.manifest, **manifest_changes},
        bundle.generator,
        bundle.discriminator,
        bundle.target_model,
    )


def test_failed_save_leaves_nothing_behind(quick_bundle, tmp_path):
    root = tmp_path / "models"
    bad = unsaved_copy(quick_bundle, name="half", metrics={"not json": object()})
    with pytest.raises(TypeError, match="cannot store object in a manifest"):
        save_bundle(bad, root)
    assert not root.exists()  # checked before anything is written: no folder at all
    assert list_bundles(root) == []


def test_failed_overwrite_keeps_the_old_bundle(quick_bundle, tmp_path):
    root = tmp_path / "models"
    save_bundle(unsaved_copy(quick_bundle, name="keep"), root)
    before = (root / "keep" / "manifest.json").read_text()
    with pytest.raises(TypeError):
        save_bundle(
            unsaved_copy(quick_bundle, name="keep", metrics={"x": object()}), root, overwrite=True
        )
    assert [p.name for p in root.iterdir()] == ["keep"]
    assert (root / "keep" / "manifest.json").read_text() == before
    load_bundle(root / "keep")


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("metrics", {"target_model_accuracy": float("nan")}, "metrics.target_model_accuracy"),
        ("history", {"total": [1.0, 0.5, np.float32("inf")]}, "history.total[2]"),
        ("target_mean", np.array([0.5, -np.inf]), "target_mean[1]"),
    ],
)
def test_save_refuses_nan_in_the_manifest_naming_the_field(
    quick_bundle, tmp_path, field, value, named
):
    root = tmp_path / "models"
    bad = unsaved_copy(quick_bundle, name="nan", **{field: value})
    msg = one_line_value_error(save_bundle, bad, root)
    assert f"manifest field {named!r}" in msg and ("nan" in msg or "inf" in msg)
    assert not root.exists()  # nothing written
    save_bundle(unsaved_copy(quick_bundle, name="fine"), root)
    assert "NaN" not in (root / "fine" / "manifest.json").read_text()  # strict JSON
    json.loads(
        (root / "fine" / "manifest.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"{c} in manifest"),
    )


def test_save_refuses_existing_name_unless_overwrite(quick_bundle, tmp_path):
    root = tmp_path / "models"
    save_bundle(unsaved_copy(quick_bundle, name="b1"), root)
    with pytest.raises(ValueError, match="a bundle of that name exists"):
        save_bundle(unsaved_copy(quick_bundle, name="b1"), root)
    save_bundle(unsaved_copy(quick_bundle, name="b1", target="gamma"), root, overwrite=True)
    assert [p.name for p in root.iterdir()] == ["b1"]  # no .old folder left
    assert load_bundle(root / "b1").target == "gamma"


def test_save_refuses_unsafe_names(quick_bundle, tmp_path):
    for name in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="invalid bundle name"):
            save_bundle(unsaved_copy(quick_bundle, name=name), tmp_path / "models")
    assert not (tmp_path / "escape").exists()


# ----------------------------------------------------------------------------- listing, names


def test_list_bundles_reports_unreadable_and_others_still_load(quick_bundle, tmp_path):
    root = tmp_path / "models"
    save_bundle(unsaved_copy(quick_bundle, name="good"), root)
    shutil.copytree(root / "good", root / "broken-json")
    (root / "broken-json" / "manifest.json").write_text("{not json")
    shutil.copytree(root / "good", root / "no-weights")
    (root / "no-weights" / "target_model.safetensors").unlink()
    (root / "stray-folder").mkdir()
    (root / ".tmp-in-progress").mkdir()
    (root / "README.md").write_text("models live here")
    entries = {e.name: e for e in list_bundles(root)}
    assert list(entries) == ["broken-json", "good", "no-weights", "stray-folder"]
    assert entries["good"].error is None and entries["good"].manifest["target"] == "beta"
    assert "not valid JSON" in entries["broken-json"].error
    assert "target_model.safetensors" in entries["no-weights"].error
    assert "no manifest.json" in entries["stray-folder"].error
    assert load_bundle(entries["good"].path).target == "beta"


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x00\x01not a safetensors file at all" * 4)


def _truncated(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 64])  # header intact, the tensors cut short


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _pickled(file: Path) -> None:
    file.write_bytes(pickle.dumps({"net.0.weight": np.zeros(3)}))


def _wrong_shape(file: Path) -> None:
    tensors = load_file(str(file))
    tensors["net.0.weight"] = tensors["net.0.weight"][:-1].contiguous()
    save_file(tensors, str(file))


def _extra_tensor(file: Path) -> None:
    save_file({**load_file(str(file)), "net.99.weight": torch.zeros(2)}, str(file))


WEIGHT_DAMAGE = {
    "garbage": (_garbage, "unreadable weights"),
    "truncated": (_truncated, "unreadable weights"),
    "empty": (_empty, "unreadable weights"),
    "pickle": (_pickled, "unreadable weights"),
    "wrong shape": (_wrong_shape, "tensor 'net.0.weight' has shape"),
    "extra tensor": (_extra_tensor, "unexpected tensor"),
}


@pytest.mark.parametrize("damage", list(WEIGHT_DAMAGE))
@pytest.mark.parametrize("fname", ["generator.safetensors", "target_model.safetensors"])
def test_list_bundles_checks_each_weight_file_header(quick_bundle, tmp_path, damage, fname):
    root = tmp_path / "models"
    save_bundle(unsaved_copy(quick_bundle, name="good"), root)
    shutil.copytree(root / "good", root / "damaged")
    file = root / "damaged" / fname
    damage_fn, reason = WEIGHT_DAMAGE[damage]
    damage_fn(file)
    entries = {e.name: e for e in list_bundles(root)}
    assert entries["good"].error is None
    bad = entries["damaged"]
    assert (
        bad.manifest is None
        and str(file) in bad.error
        and reason in bad.error
        and "\n" not in bad.error
    )
    assert reason in one_line_value_error(
        load_bundle, root / "damaged"
    )  # loading agrees with listing


def test_list_bundles_checks_shapes_against_the_manifest(quick_bundle, tmp_path):
    """Weights that are fine on their own but belong to another gene set are listed as unreadable."""
    root = tmp_path / "models"
    save_bundle(unsaved_copy(quick_bundle, name="good"), root)
    shutil.copytree(root / "good", root / "fewer-genes")
    mf = root / "fewer-genes" / "manifest.json"
    m = json.loads(mf.read_text())
    m["genes"], m["scaler"] = m["genes"][:-1], {k: v[:-1] for k, v in m["scaler"].items()}
    m.pop("target_mean", None)
    mf.write_text(json.dumps(m))
    entry = {e.name: e for e in list_bundles(root)}["fewer-genes"]
    n = len(quick_bundle.genes)
    assert entry.error is not None and "generator.safetensors" in entry.error
    assert "the manifest implies" in entry.error and str(n) in entry.error


def test_models_dir_default_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TSPG_MODELS_DIR", raising=False)
    assert models_dir() == Path("models")
    monkeypatch.setenv("TSPG_MODELS_DIR", str(tmp_path))
    assert models_dir() == tmp_path and models_dir("x") == Path("x")
    assert list_bundles(tmp_path / "absent") == []


@pytest.mark.parametrize("name", ["../x", "/etc", ".hidden", "..", ".", "a/b", "a\\b", ""])
def test_resolve_bundle_refuses_names_outside_the_folder(tmp_path, name):
    (tmp_path / "models").mkdir()
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="invalid bundle name"):
        resolve_bundle(name, tmp_path / "models")


def test_resolve_bundle(quick_bundle, tmp_path):
    root = quick_bundle.path.parent
    assert resolve_bundle(quick_bundle.name, root) == quick_bundle.path.resolve()
    with pytest.raises(ValueError, match="no bundle 'absent'"):
        resolve_bundle("absent", root)
    # a path is only accepted from the command line, and only to a bundle folder
    assert resolve_bundle(str(quick_bundle.path), tmp_path, allow_path=True) == quick_bundle.path
    with pytest.raises(ValueError, match="invalid bundle name"):
        resolve_bundle(str(quick_bundle.path), tmp_path)


def test_slug_and_check_name():
    assert slug("CD14+ Monocyte") == "cd14-monocyte"
    assert slug("  ") == "bundle"
    assert check_name("pbmc-cd14_v2+") == "pbmc-cd14_v2+"


# ----------------------------------------------------------------------------- one home per operation


def test_scale_matches_genes_by_name_and_names_the_fault(quick_bundle):
    adata = make_tiny_adata()
    Xs = quick_bundle.scale(adata)
    expected = quick_bundle.scaler.transform(align_genes(adata, quick_bundle.genes))
    np.testing.assert_array_equal(Xs, expected)
    assert Xs.dtype == np.float32 and Xs.min() >= 0 and Xs.max() <= 1
    shuffled = adata[:, list(adata.var_names[::-1])].copy()
    np.testing.assert_array_equal(quick_bundle.scale(shuffled), Xs)  # order of the bundle's genes
    broken = adata.copy()
    broken.X[3, 7] = np.nan
    with pytest.raises(
        UserError, match=r"^new\.h5ad: missing or infinite value at sample 's003', gene 'G07'"
    ):
        quick_bundle.scale(broken, source="new.h5ad")
    with pytest.raises(UserError, match="no layer 'counts'"):
        quick_bundle.scale(adata, layer="counts")


def test_predict_is_the_target_models_argmax(quick_bundle):
    Xs = quick_bundle.scale(make_tiny_adata())
    proba = class_probabilities(quick_bundle.target_model, Xs)
    np.testing.assert_array_equal(quick_bundle.predict_proba(Xs), proba)
    assert list(quick_bundle.predict(Xs)) == [quick_bundle.classes[i] for i in proba.argmax(1)]
    assert quick_bundle.predict(Xs[:0]).shape == (0,)
    assert quick_bundle.predict_proba(Xs[:0]).shape == (0, len(quick_bundle.classes))


def test_sample_pool_and_source_samples_one_fallback_rule(quick_bundle):
    adata = make_tiny_adata()
    labels = adata.obs["cell_type"].astype(str)
    test = quick_bundle.split["test"]
    held = [s for s in adata.obs_names if s in set(test)]
    assert quick_bundle.sample_pool(adata) == held  # in the data's order
    assert quick_bundle.sample_pool(adata, heldout=False) == list(adata.obs_names)
    choice = quick_bundle.source_samples(adata)
    assert choice.description == "held-out non-target samples"
    assert choice.ids == [s for s in held if labels[s] != "beta"] and len(choice) == 8
    # other data (none of the held-out samples): every sample, still without the target class
    other = adata[[s for s in adata.obs_names if s not in set(test)]].copy()
    assert quick_bundle.sample_pool(other) == list(other.obs_names)
    choice = quick_bundle.source_samples(other)
    assert choice.description == "non-target samples"
    assert choice.ids == [s for s in other.obs_names if labels[s] != "beta"]
    # unknown labels: nothing is left out; chosen ids are checked
    bare = adata.copy()
    del bare.obs["cell_type"]
    assert quick_bundle.source_samples(bare).ids == held
    assert quick_bundle.source_samples(bare).description == "held-out samples"
    chosen = quick_bundle.source_samples(adata, samples=["s045", "s001", "s045"])
    assert chosen.ids == ["s045", "s001"] and chosen.description == "chosen samples"
    with pytest.raises(
        UserError, match=r"^x\.h5ad: 1 of the 2 sample ids given are not in the data: nope$"
    ):
        quick_bundle.source_samples(adata, samples=["s001", "nope"], source="x.h5ad")
    only_target = adata[labels.to_numpy() == "beta"].copy()
    with pytest.raises(UserError, match="every candidate sample is of the target class 'beta'"):
        quick_bundle.source_samples(only_target)


def test_is_own_dataset_by_fingerprint(quick_bundle):
    adata = make_tiny_adata()
    assert quick_bundle.is_own_dataset(adata) is True
    changed = adata.copy()
    changed.X[0, 0] += 1
    assert quick_bundle.is_own_dataset(changed) is False
    assert quick_bundle.is_own_dataset(adata[:-1].copy()) is False  # a sample less
    assert quick_bundle.is_own_dataset(adata[:, 1:].copy()) is None  # a gene missing: cannot tell


def test_summary_is_one_row_for_bundles_and_listed_folders(quick_bundle, tmp_path):
    s = quick_bundle.summary()
    assert s["name"] == quick_bundle.name and s["target"] == "beta" and s["genes"] == 30
    assert s["perturbation accuracy"] == quick_bundle.metrics["perturbation_accuracy_non_target"]
    shutil.copytree(quick_bundle.path, tmp_path / "good")
    (tmp_path / "bad").mkdir()
    bad, good = list_bundles(tmp_path)
    assert good.summary() == {**s, "name": "good", "status": "ok", "error": ""}
    assert bad.summary()["status"] == "unreadable" and "no manifest.json" in bad.summary()["error"]


def _every_field_changed(recipe: str) -> TrainConfig:
    """A config of ``recipe`` whose every field (but the recipe) differs from the recipe's default."""
    base = TrainConfig.for_recipe(recipe)
    changed = {}
    for name in config_options():
        f, v = config_fields()[name], getattr(base, name)
        meta = f.metadata
        if v is None:  # an optional setting, unset by default
            new = {"int": 1, "float": 0.5}[field_kind(name)[0]]
        elif meta.get("choices"):
            new = next(c for c in meta["choices"] if c != v)
        elif isinstance(v, bool):
            new = not v
        elif isinstance(v, tuple):
            new = tuple(max(1, w // 2 + 1) for w in v) + (3,)
        elif isinstance(v, int):
            new = v + 1
        else:
            high = meta.get("high")
            new = v * 1.5 + 0.25
            if high is not None and new >= high:
                new = (v + (meta.get("low") or 0.0)) / 2
        assert config_problem(name, new) is None, (name, new)
        changed[name] = new
    config = TrainConfig.for_recipe(recipe, **changed)
    assert all(getattr(config, n) != getattr(base, n) for n in config_options())
    return config


@pytest.mark.parametrize("recipe", ["tspg+", "paper"])
def test_every_generated_train_command_parses_back_into_the_same_config(recipe, tmp_path):
    import json
    import shlex

    from tspg.cli import build_train_parser, config_from_args

    config = _every_field_changed(recipe)
    manifests = [
        {"dataset": {"name": "my gem"}, "label_key": "tissue type", "gene_set": {"name": "all"}},
        {
            "dataset": {"name": "pbmc68k_reduced"},
            "label_key": "bulk_labels",
            "gene_set": {"name": "all"},
        },
        {
            "dataset": {"name": "gem"},
            "label_key": "tissue",
            "gene_set": {"name": "HALLMARK_HYPOXIA", "source": "/data/h all.gmt"},
        },
        {
            "dataset": {"name": "gem"},
            "label_key": "tissue",
            "gene_set": {"name": "mine", "source": "/data/mine.txt"},
        },
    ]
    for extra in manifests:
        manifest = json.loads(  # as a manifest stores it: tuples become lists
            json.dumps(
                {"name": "a b", "target": "CD14+ Monocyte", "config": config.to_dict(), **extra}
            )
        )
        command = train_command(manifest, out=tmp_path / "my models")
        argv = shlex.split(command)
        assert argv[0] == "tspg-train"
        args = build_train_parser().parse_args(argv[1:])
        assert config_from_args(args) == config, command
        assert (args.target, args.name, args.out) == (
            "CD14+ Monocyte",
            "a b",
            str(tmp_path / "my models"),
        )
        for name in config_options():  # every field is written out, widths included
            assert option_name(name) in argv
    assert args.genes == "/data/mine.txt"
    demo_args = build_train_parser().parse_args(
        shlex.split(train_command({**manifest, **manifests[1]}))[1:]
    )
    assert demo_args.demo and demo_args.data is None
    hypoxia = build_train_parser().parse_args(
        shlex.split(train_command({**manifest, **manifests[2]}))[1:]
    )
    assert hypoxia.gene_set == "/data/h all.gmt:HALLMARK_HYPOXIA"
    reused = train_command({**manifest, "target_model_from": "gem-heart"})
    assert "--target-model gem-heart" in reused and "--gene-set" not in reused


def test_bundle_train_command_of_a_trained_bundle(quick_bundle):
    """The quick bundle's own command: the options that differ from the tspg+ recipe."""
    command = quick_bundle.train_command()
    assert command.startswith("tspg-train tiny.h5ad --label-key cell_type --target beta ")
    for name, value in QUICK_CONFIG.items():
        assert f"{option_name(name)} {format_option(value)}" in command
    assert "--gen-residual" not in command  # the recipe's value is not repeated
