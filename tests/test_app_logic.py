"""The dashboard's pure logic (tspg/app/selection.py, tspg/app/views.py), without Streamlit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_adata

from tspg.app import keys as K
from tspg.app.query import PARAMS, decode, encode
from tspg.app.selection import (
    Data,
    clamp_n,
    compatible_bundles,
    default_classes,
    map_class_options,
    map_classes_default,
    picked_map_classes,
    present_classes,
    select_samples,
)
from tspg.app.views import command, data_arg, demo_epochs, gene_frames, heatmap_frame
from tspg.embedding import ReferenceMap
from tspg.errors import UserError
from tspg.perturbation import Perturbation

ROOT = Path(__file__).resolve().parent.parent
NAMES = [f"s{i}" for i in range(10)]
LABELS = dict(zip(NAMES, ["a", "a", "b", "b", "b", "t", "t", "c", "c", "c"], strict=True))


def test_pure_modules_import_no_streamlit_and_only_the_app_package_does():
    code = (
        "import sys\nimport tspg.app, tspg.app.selection, tspg.app.views, tspg.app.query\n"
        "assert 'streamlit' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    importers = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "tspg").rglob("*.py")
        if re.search(r"^\s*(import streamlit|from streamlit)", p.read_text(), re.M)
    ]
    assert importers and all(p.startswith("tspg/app/") for p in importers), importers


def test_random_selection_is_seeded_and_leaves_out_the_target():
    pool = NAMES[2:]
    sel = select_samples(pool, LABELS, target="t", n=4, seed=1)
    assert len(sel.samples) == 4 and set(sel.samples) <= set(pool) - {"s5", "s6"}
    assert list(sel.samples) == sorted(sel.samples, key=NAMES.index)  # in the data's order
    assert sel == select_samples(pool, LABELS, target="t", n=4, seed=1)
    assert sel.samples != select_samples(pool, LABELS, target="t", n=4, seed=2).samples
    assert sel.params == {"mode": "random", "n": 4, "seed": 1, "heldout_only": False}
    everything = select_samples(pool, LABELS, target="t", n=99, leave_out_target=False)
    assert everything.samples == tuple(pool) and everything.description.startswith("8 random")
    unlabelled = select_samples(pool, None, target="t", n=99)  # nothing to leave out
    assert unlabelled.samples == tuple(pool)
    held = select_samples(pool, LABELS, target="t", n=2, heldout=True)
    assert held.description.endswith(", held-out split") and held.params["heldout_only"]


def test_class_and_id_selection():
    sel = select_samples(NAMES, LABELS, target="t", mode="class", classes=["c", "a"])
    assert sel.samples == ("s0", "s1", "s7", "s8", "s9")
    assert sel.description == "5 samples of c, a" and sel.params["classes"] == ["c", "a"]
    with pytest.raises(UserError, match="cannot be picked by class"):
        select_samples(NAMES, None, target="t", mode="class", classes=["a"])
    ids = select_samples(
        NAMES, LABELS, target="t", mode="id", ids=["s9", "zz", "s1", "s9"], known=NAMES
    )
    assert ids.samples == ("s9", "s1") and ids.params["ids"] == ["s9", "s1"]


def test_default_and_present_classes():
    labels = np.array(["b", "t", "x", "a"])
    assert default_classes(["a", "b", "t"], labels, "t") == ["a"]
    assert default_classes(["t"], labels, "t") == [] and default_classes(["a"], None, "t") == []
    assert present_classes(["t", "b", "q"], labels) == ["t", "b", "a", "x"]


def test_map_classes_follow_the_selection_until_the_user_picks():
    labels = np.array(["t"] * 5 + [f"k{i}" for i in range(12) for _ in range(12 - i)])
    options = map_class_options(labels, "t")
    assert options == [f"k{i}" for i in range(12)]  # most frequent first, no target
    rare = ["k11", "k10"]
    default = map_classes_default(labels, "t", sources=rare + rare[:1])
    assert len(default) == 9 and set(rare) <= set(default) and "k9" not in default
    assert default == [c for c in options if c in default]  # frequency order: one map per set
    # untouched (picked == the default last shown, or nothing): the default for the sources
    assert picked_map_classes(labels, "t", rare, picked=default, auto=default) == ["t", *default]
    assert picked_map_classes(labels, "t", None, picked=None, auto=None) == ["t", *options[:9]]
    # the user's own choice stays, in the options' order, at most nine
    assert picked_map_classes(labels, "t", rare, picked=["k3", "k1"], auto=default) == [
        "t",
        "k1",
        "k3",
    ]
    assert len(picked_map_classes(labels, "t", rare, picked=options, auto=default)) == 10


def test_compatible_bundles():
    bundle = SimpleNamespace(name="b1", genes=["g1", "g2"], classes=["x", "y"], label_key="k")
    same = {"genes": ["g1", "g2"], "classes": ["x", "y"], "label_key": "k"}
    entries = [
        SimpleNamespace(name="b1", error=None, manifest=same),
        SimpleNamespace(name="b2", error=None, manifest=same),
        SimpleNamespace(name="other-genes", error=None, manifest={**same, "genes": ["g1"]}),
        SimpleNamespace(name="other-key", error=None, manifest={**same, "label_key": "z"}),
        SimpleNamespace(name="broken", error="unreadable", manifest=None),
    ]
    assert compatible_bundles(bundle, entries) == ["b1", "b2"]
    assert compatible_bundles(bundle, entries[2:]) == ["b1"]  # always itself


def _perturbation() -> Perturbation:
    x = np.array([[0.1, 0.5, 0.9], [0.3, 0.5, 0.7]], np.float32)
    P = np.array([[0.4, -0.2, 0.0], [0.2, 0.0, -0.4]], np.float32)
    empty = np.zeros((2, 0), np.float32)
    return Perturbation(
        ["s1", "s2"],
        ["g1", "g2", "g3"],
        ["a", "t"],
        "t",
        x,
        P,
        x + P,
        empty,
        empty,
        np.array(["a", "a"], object),
    )


def test_heatmap_frame_of_a_selection_is_its_mean():
    pert = _perturbation()
    frame = heatmap_frame(pert, np.array([1.0, 0.0, 0.5]), n_genes=1)
    wide = frame.pivot(index="gene", columns="column", values="value")
    assert list(frame.drop_duplicates("gene")["gene"]) == [
        "g1",
        "g3",
    ]  # most positive, most negative mean P
    assert wide.loc["g1", "P"] == pytest.approx(0.3) and wide.loc["g3", "P"] == pytest.approx(-0.2)
    assert wide.loc["g1", "x"] == pytest.approx(0.2) and wide.loc["g1", "target mean"] == 1.0
    one = heatmap_frame(pert.subset(["s2"]), None, n_genes=5)
    assert one["value"][one["column"] == "target mean"].isna().all()  # no target mean: empty column


def test_gene_frames_put_real_and_perturbed_values_side_by_side():
    pert = _perturbation()
    Xs = np.arange(12, dtype=np.float32).reshape(4, 3) / 12
    ref = ReferenceMap(
        coords=np.array([[0.0, 0.0], [1.0, 1.0]]),
        samples=np.array(["r0", "r2"]),
        labels=np.array(["a", "t"]),
    )
    frames = gene_frames(
        ref,
        np.array([[5.0, 5.0], [6.0, 6.0]]),
        pert,
        Xs,
        np.array([0, 2]),
        ["a", "b", "t", "a"],
        "g2",
    )
    m = frames["map"]
    assert list(m["kind"]) == ["real", "real", "perturbed", "perturbed"]
    np.testing.assert_allclose(m["value"], [Xs[0, 1], Xs[2, 1], *pert.x_adv[:, 1]])
    d = frames["distribution"]
    assert (
        list(d["class"]) == ["a", "b", "t", "a", "a", "a"]
        and list(d["kind"]).count("perturbed") == 2
    )


def test_commands_and_data_arguments():
    assert command("tspg map", "", "b", "-o x.csv") == "tspg map b -o x.csv"
    demo_bundle = SimpleNamespace(manifest={"dataset": {"name": "pbmc68k_reduced"}})
    other = SimpleNamespace(manifest={"dataset": {"name": "my gem"}})
    adata = make_tiny_adata()
    adata.uns["tspg_import"] = {"source": "my file.h5ad"}
    assert data_arg(demo_bundle, Data(adata, "demo", "demo", own=True), optional=True) == ""
    assert (
        data_arg(demo_bundle, Data(adata, "demo", "demo", own=True), optional=False) == "demo.h5ad"
    )
    assert (
        data_arg(other, Data(adata, "upload:1", "upload", own=False), optional=True)
        == "'my file.h5ad'"
    )
    assert data_arg(other, Data(adata, "x", "x", own=True), optional=True) == "'my gem.h5ad'"


def test_demo_epochs_setting():
    assert demo_epochs(None) is None and demo_epochs("") is None and demo_epochs("3") == 3
    with pytest.raises(UserError, match="not a whole number"):
        demo_epochs("many")
    with pytest.raises(UserError, match="at least 1 epoch"):
        demo_epochs("0")


def test_data_labels():
    adata = make_tiny_adata()
    data = Data(adata, "k", "tiny", own=False)
    assert list(data.labels("cell_type")) == list(adata.obs["cell_type"].astype(str))
    assert data.labels("nope") is None
    assert isinstance(pd.Series(data.labels("cell_type")).iloc[0], str)


# ----------------------------------------------------------------------------- the URL


def test_query_parameters_round_trip_and_leave_defaults_out():
    state = {
        K.BUNDLE: "b1",
        K.SEL_MODE: "class",
        K.SEL_CLASSES: ["CD19+ B", "NK & friends"],
        K.SEL_N: 20,  # the default: not written
        K.SEL_SEED: 7,
        K.SEL_HELDOUT: False,
        K.TOP_K: 35,
        K.MAP_MOVES: False,
        K.ENR_THRESHOLD: 0.05,
        K.SEL_IDS: [],
    }
    params = encode(state, defaults=K.DEFAULTS)
    assert params == {
        "bundle": ["b1"],
        "mode": ["class"],
        "classes": ["CD19+ B", "NK & friends"],
        "ids": [""],  # an emptied list stays empty
        "seed": ["7"],
        "heldout": ["0"],
        "k": ["35"],
        "moves": ["0"],
        "q": ["0.05"],
    }
    values, notes = decode(params, bundles=["b1", "b2"])
    assert notes == []
    assert values == {k: v for k, v in state.items() if k != K.SEL_N}
    # every parameter names its own key
    assert len({p.name for p in PARAMS}) == len({p.key for p in PARAMS}) == len(PARAMS)


def test_query_parameters_that_cannot_be_used_are_noted_not_raised():
    values, notes = decode(
        {
            "bundle": ["gone"],
            "mode": ["sideways"],
            "n": ["0"],
            "seed": ["-1"],
            "heldout": ["maybe"],
            "q": ["0.02"],
            "k": ["12"],
            "what": ["x"],
        },
        bundles=["b1"],
    )
    assert values == {K.TOP_K: 12}
    assert len(notes) == 7
    assert any("bundle=gone" in n for n in notes) and any(
        "`what` is not a setting" in n for n in notes
    )
    assert any("n=0" in n and "between 1" in n for n in notes)


def test_clamp_n_says_why():
    assert clamp_n(20, 142) == (20, None)
    assert clamp_n(300, 142) == (
        142,
        "N = 300 is more than the 142 samples to pick from: using all 142",
    )
    assert clamp_n(0, 142)[0] == 1 and clamp_n(None, 5)[0] == 5
