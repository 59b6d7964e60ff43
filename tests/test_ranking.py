"""The one ranking of top genes (mean P), by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tspg.perturbation import consensus, consensus_top
from tspg.ranking import rank_genes

GENES = ["A", "B", "C", "D", "E"]
P3 = np.array(
    [
        [0.5, -0.2, 0.1, -0.9, 0.3],
        [0.4, 0.3, -0.3, 0.2, -0.1],
        [0.6, -0.4, 0.2, -0.5, -0.3],
    ],
    dtype=np.float32,
)


def test_rank_genes_by_hand():
    df = rank_genes(P3, GENES, k=2)
    assert list(df.columns) == ["direction", "rank", "gene", "mean_P", "n_top", "frequency"]
    up, down = df[df.direction == "up"], df[df.direction == "down"]
    # mean P: A 0.5, B -0.1, C 0.0, D -0.4, E -0.0333
    assert up["gene"].tolist() == ["A", "C"] and up["rank"].tolist() == [1, 2]
    assert down["gene"].tolist() == ["D", "B"]
    np.testing.assert_allclose(up["mean_P"], [0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(down["mean_P"], [-0.4, -0.1], atol=1e-7)
    # each sample's own top-2 up: {A,E}, {A,B}, {A,C}; down: {D,B}, {C,E}, {D,B}
    assert up["n_top"].tolist() == [3, 1] and down["n_top"].tolist() == [2, 2]
    np.testing.assert_allclose(down["frequency"], [2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="no samples"):
        rank_genes(P3[:0], GENES)


def test_one_sample_is_ranked_by_its_own_P_and_k_none_splits_every_gene():
    df = rank_genes(P3[0], GENES, k=2)
    assert df.loc[df.direction == "up", "gene"].tolist() == ["A", "E"]
    assert df.loc[df.direction == "down", "gene"].tolist() == ["D", "B"]
    every = rank_genes(P3[0], GENES, k=None)
    assert every.loc[every.direction == "up", "gene"].tolist() == ["A", "E", "C"]
    assert every.loc[every.direction == "down", "gene"].tolist() == ["D", "B"]


def test_mean_P_not_frequency_ranks_and_consensus_top_follows():
    """A gene strongly moved in one sample outranks one weakly moved in every sample;
    the frequency table (consensus) keeps its own order and says so by its columns."""
    P = np.array([[0.1, 0.9, 0.0], [0.1, 0.0, 0.05], [0.1, 0.0, 0.05]])
    genes = ["weak_everywhere", "strong_once", "other"]
    ranked = rank_genes(P, genes, k=1)
    assert ranked.loc[ranked.direction == "up", "gene"].tolist() == ["strong_once"]
    assert ranked.loc[ranked.direction == "up", "n_top"].tolist() == [1]
    assert consensus_top(P, genes, k=1)["up"] == ["strong_once"]
    freq = consensus(P, genes, k=1)
    assert freq.loc[freq.direction == "up", "gene"].tolist()[0] == "weak_everywhere"
