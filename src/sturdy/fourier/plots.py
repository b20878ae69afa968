"""Figures of the Fourier part: frequency maps, perturbations, clean vs perturbed examples.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so no global backend or
figure registry is touched (save it with :func:`sturdy.utils.atomic_save_figure`). matplotlib is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from sturdy.fourier._common import call_model, in_eval_mode
from sturdy.fourier.perturbation import Bounds, apply_perturbation, check_bounds, check_delta, check_images
from sturdy.utils import model_device_dtype
from sturdy.validation import check_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_fourier_maps", "plot_perturbation", "plot_examples"]


def plot_fourier_maps(panels: Sequence[Tuple[str, Tensor]], *, vmax: Optional[float] = None) -> Figure:
    """Side-by-side centred frequency maps ``[(title, (H, W) tensor), ...]`` on a shared colour scale.

    Axes show the centred frequencies (``-H//2 .. (H-1)//2``). NaN entries (frequencies not measured) are
    left transparent over a grey, hatched background, and the title counts the measured ones.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    maps = [m.detach().cpu().double() for _, m in panels]
    finite = [m[torch.isfinite(m)] for m in maps]
    top = vmax if vmax is not None else max((float(f.max()) for f in finite if f.numel()), default=0.0) or 1.0
    fig = Figure(figsize=(3.6 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, _), m in zip(axes[0], panels, maps):
        h, w = m.shape
        extent = (-(w // 2) - 0.5, (w - 1) // 2 + 0.5, (h - 1) // 2 + 0.5, -(h // 2) - 0.5)
        missing = ~torch.isfinite(m)
        if bool(missing.any()):
            ax.add_patch(Rectangle((extent[0], extent[3]), w, h, facecolor="0.85", edgecolor="0.55", hatch="///",
                                   linewidth=0, zorder=0))
            title = f"{title}\n{int((~missing).sum())} of {h * w} measured (hatched: not measured)"
        data = np.ma.masked_invalid(m.numpy())
        im = ax.imshow(data, cmap="magma", vmin=0.0, vmax=top, extent=extent, interpolation="nearest", zorder=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("l (horizontal frequency)")
        ax.set_ylabel("k (vertical frequency)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def plot_perturbation(delta: Tensor, *, title: str = "") -> Figure:
    """A perturbation ``(C, H, W)``: one panel per channel, symmetric colour scale."""
    from matplotlib.figure import Figure

    d = delta.detach().cpu().double()
    top = float(d.abs().max()) or 1.0
    fig = Figure(figsize=(3.0 * d.shape[0], 2.8))
    axes = fig.subplots(1, d.shape[0], squeeze=False)
    for c, ax in enumerate(axes[0]):
        im = ax.imshow(d[c].numpy(), cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
        ax.set_title(f"{title} channel {c}".strip(), fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


@in_eval_mode
@torch.no_grad()
def plot_examples(
    model: nn.Module, delta: Tensor, x: Tensor, *, n: int = 6, bounds: Bounds = (0.0, 1.0)
) -> Figure:
    """Clean (top) and perturbed (bottom) images with the model's predicted labels; red: prediction changed.

    Args:
        model: classifier on ``(N, C, H, W)`` images (evaluated in eval mode, training flags restored).
        delta: perturbation ``(C, H, W)``.
        x: images; the first ``n`` are shown (RGB for three channels, else the first channel in grey).
        n: number of images.
        bounds: valid pixel range the perturbed images are clipped to.
    """
    from matplotlib.figure import Figure

    n = check_int(n, "n", low=1)
    bounds = check_bounds(bounds)
    check_images(x, bounds)
    device, dtype = model_device_dtype(model, x)
    check_delta(delta, x.shape[1:], bounds, dtype)
    x = x[:n].to(device=device, dtype=dtype)
    perturbed = apply_perturbation(x, delta.to(device=device, dtype=dtype), bounds=bounds).images
    clean_pred = call_model(model, x).argmax(1).tolist()
    adv_pred = call_model(model, perturbed).argmax(1).tolist()
    fig = Figure(figsize=(1.6 * len(x), 3.6))
    axes = fig.subplots(2, len(x), squeeze=False)
    for i in range(len(x)):
        for row, (images, preds, name) in enumerate(((x, clean_pred, "clean"), (perturbed, adv_pred, "SFA"))):
            img = images[i].detach().cpu().float()
            img = img.permute(1, 2, 0) if img.shape[0] == 3 else img[0]  # RGB, else the first channel
            ax = axes[row][i]
            ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None, vmin=0, vmax=1)
            ax.set_title(f"{name}: {preds[i]}", fontsize=8, color="black" if preds[i] == clean_pred[i] else "red")
            ax.axis("off")
    fig.tight_layout()
    return fig
