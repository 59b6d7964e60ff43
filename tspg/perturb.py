"""Perturbing data with a bundle: x -> P = G(x) -> x_adv = clip(x + P, 0, 1).

All three live in the bundle's scaled space ([0, 1] per gene, scaled with the minimum and
range stored in the bundle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from .bundle import Bundle
from .data import align_genes
from .train import generate, predict_proba

logger = logging.getLogger(__name__)


@dataclass
class Perturbation:
    """x, P, x_adv (samples x genes, scaled) and the target model's view before and after."""

    samples: list[str]
    genes: list[str]
    classes: list[str]
    target: str
    x: np.ndarray
    P: np.ndarray
    x_adv: np.ndarray
    proba_before: np.ndarray  # (samples, classes)
    proba_after: np.ndarray

    @property
    def pred_before(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.proba_before.argmax(1)]

    @property
    def pred_after(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.proba_after.argmax(1)]

    def predictions_df(self) -> pd.DataFrame:
        """One row per sample: predicted class and probabilities before and after."""
        t = self.classes.index(self.target)
        return pd.DataFrame(
            {
                "pred_before": self.pred_before,
                "prob_before": self.proba_before.max(1),
                "pred_after": self.pred_after,
                "prob_after": self.proba_after.max(1),
                "prob_target_before": self.proba_before[:, t],
                "prob_target_after": self.proba_after[:, t],
            },
            index=pd.Index(self.samples, name="sample"),
        )


def perturb_scaled(bundle: Bundle, Xs: np.ndarray, samples=None) -> Perturbation:
    """Perturb already-scaled data whose columns are the bundle's genes."""
    Xs = np.ascontiguousarray(Xs, dtype=np.float32)
    P = generate(bundle.generator, Xs)
    x_adv = np.clip(Xs + P, 0.0, 1.0)
    samples = list(samples) if samples is not None else [str(i) for i in range(len(Xs))]
    return Perturbation(
        samples, list(bundle.genes), list(bundle.classes), bundle.target, Xs, P, x_adv,
        predict_proba(bundle.target_model, Xs), predict_proba(bundle.target_model, x_adv),
    )


def perturb_adata(bundle: Bundle, adata: ad.AnnData, *, layer: str | None = None, source: str = "data") -> Perturbation:
    """Match genes by name, scale with the bundle's scaler, and perturb."""
    X = align_genes(adata, bundle.genes, layer=layer, source=source)
    if not np.isfinite(X).all():
        i, j = map(int, np.argwhere(~np.isfinite(X))[0])
        raise ValueError(f"{source}: missing or infinite value at sample {adata.obs_names[i]!r}, gene {bundle.genes[j]!r}")
    return perturb_scaled(bundle, bundle.scaler.transform(X), adata.obs_names)


def perturb(
    adata: ad.AnnData,
    bundle: Bundle,
    *,
    layer: str | None = None,
    key_added: str = "tspg",
    copy: bool = False,
) -> ad.AnnData | None:
    """Perturb every sample of ``adata`` towards the bundle's target class.

    Genes are matched by name. In place (``copy=False``) needs ``adata`` to hold exactly the
    bundle's genes in its order; ``copy=True`` returns a new AnnData restricted to them.

    Returns
    -------
    With ``copy=True`` a new AnnData, else None. Either way it holds:

    - ``layers[f"{key_added}_x"]``: the scaled input x
    - ``layers[f"{key_added}_perturbation"]``: P
    - ``layers[f"{key_added}_perturbed"]``: x_adv
    - ``obs[f"{key_added}_pred_before"]``, ``obs[f"{key_added}_pred_after"]``: predicted class
    - ``obs[f"{key_added}_prob_target_before"]``, ``obs[f"{key_added}_prob_target_after"]``
    - ``uns[key_added]["params"]``: bundle name, target, layer
    """
    if not copy and list(adata.var_names) != list(bundle.genes):
        raise ValueError("in-place perturbation needs exactly the bundle's genes in order; use copy=True")
    result = perturb_adata(bundle, adata, layer=layer)
    out = adata[:, bundle.genes].copy() if copy else adata
    out.layers[f"{key_added}_x"] = result.x
    out.layers[f"{key_added}_perturbation"] = result.P
    out.layers[f"{key_added}_perturbed"] = result.x_adv
    pred = result.predictions_df()
    for col in ("pred_before", "pred_after"):
        out.obs[f"{key_added}_{col}"] = pd.Categorical(pred[col].to_numpy(), categories=bundle.classes)
    for col in ("prob_target_before", "prob_target_after"):
        out.obs[f"{key_added}_{col}"] = pred[col].to_numpy()
    out.uns[key_added] = {"params": {"bundle": bundle.name, "target": bundle.target, "layer": layer or "X"}}
    return out if copy else None
