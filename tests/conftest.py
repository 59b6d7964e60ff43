"""Shared fixtures: a tiny synthetic labelled GEM and small trained bundles (CPU, seconds)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tspg.bundle import save_bundle
from tspg.config import TrainConfig
from tspg.pipeline import train

TINY_CLASSES = ["alpha", "beta", "gamma"]


def make_tiny_adata(n_per_class: int = 20, n_genes: int = 30, seed: int = 0) -> ad.AnnData:
    """Three well separated classes; each raises its own block of 5 genes."""
    rng = np.random.default_rng(seed)
    X, labels = [], []
    for c, name in enumerate(TINY_CLASSES):
        block = rng.normal(1.0, 0.3, (n_per_class, n_genes))
        block[:, 5 * c : 5 * c + 5] += 3.0
        X.append(block)
        labels += [name] * n_per_class
    X = np.clip(np.vstack(X), 0, None).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels)}, index=[f"s{i:03d}" for i in range(len(labels))]
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{j:02d}" for j in range(n_genes)]))


@pytest.fixture
def tiny_adata() -> ad.AnnData:
    return make_tiny_adata()


# Tests that do not test seed ensembles train one generator (seeds=1): the default of 3
# would triple every generator's time. ONE_GENERATOR goes into every cheap test config.
ONE_GENERATOR = dict(seeds=1)
TINY_CONFIG = dict(epochs=150, target_epochs=50, batch_size=32, **ONE_GENERATOR)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A bundle trained on the tiny GEM (target 'beta'), saved under a temporary models folder."""
    adata = make_tiny_adata()
    b = train(
        adata,
        label_key="cell_type",
        target="beta",
        config=TrainConfig.for_recipe("tspg+", **TINY_CONFIG),
        device="cpu",
        dataset="tiny",
    )
    save_bundle(b, tmp_path_factory.mktemp("models"))
    return b


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory):
    """A models folder holding a short-trained demo bundle (pbmc68k_reduced, CD14+ Monocyte)."""
    from tspg.datasets import DEMO_LABEL_KEY, DEMO_TARGET, demo

    root = tmp_path_factory.mktemp("demo_models")
    b = train(
        demo(),
        label_key=DEMO_LABEL_KEY,
        target=DEMO_TARGET,
        config=TrainConfig.for_recipe("tspg+", epochs=10, target_epochs=10, **ONE_GENERATOR),
        device="cpu",
        dataset="pbmc68k_reduced",
    )
    save_bundle(b, root)
    return root


# ----------------------------------------------------------------------------- fast variants


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """One torch thread (override with TSPG_TEST_THREADS): these networks are tiny, and on a
    busy 2-core machine two threads made training ~10x slower (spinning, not computing)."""
    import os

    import torch

    before, env = torch.get_num_threads(), os.environ.get("TSPG_THREADS")
    threads = os.environ.get("TSPG_TEST_THREADS", "1")
    torch.set_num_threads(int(threads))
    os.environ["TSPG_THREADS"] = threads  # what tspg-train (tspg.training.use_threads) takes
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("TSPG_THREADS", None)
    else:
        os.environ["TSPG_THREADS"] = env


# The paper's networks, trained a little faster (higher learning rates, fewer epochs): a few
# seconds on 2 CPU cores, still reaching full perturbation accuracy on the tiny GEM.
QUICK_CONFIG = dict(
    epochs=30, target_epochs=20, batch_size=32, g_lr=1e-3, d_lr=5e-4, **ONE_GENERATOR
)
# Much smaller networks (and one generator), for tests about the loop's mechanics (seeding,
# sharing, recipes).
SMALL_NETS = dict(
    **ONE_GENERATOR,
    gen_encoder=(32, 16),
    gen_residual=1,
    gen_decoder=(32,),
    disc_hidden=(32, 16),
    target_hidden=(32, 16),
)


@pytest.fixture(scope="session")
def quick_bundle(tmp_path_factory):
    """Like ``tiny_bundle`` (target 'beta', saved under a temporary models folder) but ~5x faster.

    Session-wide: tests that change the saved folder must copy it first.
    """
    adata = make_tiny_adata()
    b = train(
        adata,
        label_key="cell_type",
        target="beta",
        config=TrainConfig.for_recipe("tspg+", **QUICK_CONFIG),
        device="cpu",
        dataset="tiny",
    )
    save_bundle(b, tmp_path_factory.mktemp("quick_models"))
    return b


@pytest.fixture(scope="session")
def shuffled_bundle():
    """A bundle whose target model was trained on shuffled labels (its verdict fails), and
    its data; trained once for every test module that needs it."""
    adata = make_tiny_adata(n_per_class=40)
    rng = np.random.default_rng(0)
    adata.obs["cell_type"] = adata.obs["cell_type"].to_numpy()[rng.permutation(adata.n_obs)]
    bundle = train(
        adata,
        label_key="cell_type",
        target="beta",
        config=TrainConfig.for_recipe("tspg+", epochs=5, target_epochs=30, **SMALL_NETS),
        device="cpu",
        dataset="shuffled",
    )
    return bundle, adata
