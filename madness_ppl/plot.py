"""Figures: asinh-stretched colour composites of fields, models and residuals.

The colour composite follows Lupton et al. (2004): with :math:`I = (R + G + B)/3`,
each noise-normalised channel is scaled by :math:`\\mathrm{asinh}(I / s) / I`, where the
softening :math:`s` is a multiple of the noise so that faint galaxies stay visible and bright cores do not
saturate. Residuals are shown on the *same* stretch as the data so that they can be compared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["asinh_rgb", "intensity_top", "plot_panels", "save_figure"]


def _channel_indices(bands: Sequence[str], rgb_bands: Sequence[str]) -> list[int]:
    """Indices of the red, green, blue bands; falls back to the reddest available bands."""
    bands = list(bands)
    if all(b in bands for b in rgb_bands):
        return [bands.index(b) for b in rgb_bands]
    if len(bands) >= 3:
        return [len(bands) // 2 + 1, len(bands) // 2, len(bands) // 2 - 1]
    return [0] * 3 if len(bands) == 1 else [1, 0, 0]


def asinh_rgb(
    image: np.ndarray,
    bands: Sequence[str],
    *,
    rgb_bands: Sequence[str] = ("i", "r", "g"),
    noise: np.ndarray | None = None,
    stretch: float = 1.0,
    top: float | None = None,
) -> np.ndarray:
    """Lupton asinh colour composite of a ``(bands, H, W)`` image.

    Parameters
    ----------
    image
        Multi-band image in electrons.
    bands
        Band names of the image's first axis.
    rgb_bands
        Bands shown as red, green and blue (default i, r, g).
    noise
        Per-band noise sigma used to normalise the channels (default: a robust estimate from the
        image, 1.4826 x median absolute deviation).
    stretch
        Softening of the asinh in units of the noise: linear below, logarithmic above.
    top
        Intensity (in noise units) mapped to full brightness; default the 99.8th percentile.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` floats in [0, 1].
    """
    image = np.asarray(image, dtype=float)
    if image.ndim != 3 or image.shape[0] != len(bands):
        raise ValueError(f"image of shape {image.shape} does not match {len(bands)} bands")
    idx = _channel_indices(bands, rgb_bands)
    channels = np.nan_to_num(image[idx])
    if noise is None:
        med = np.median(channels, axis=(1, 2), keepdims=True)
        sigma = 1.4826 * np.median(np.abs(channels - med), axis=(1, 2), keepdims=True)
    else:
        sigma = np.asarray(noise, dtype=float)[idx][:, None, None]
    channels = channels / np.where(sigma > 0, sigma, 1.0)
    intensity = np.maximum(channels.mean(axis=0), 1e-6)
    if top is None:
        top = max(float(np.percentile(intensity, 99.8)), 5.0 * stretch)
    factor = np.arcsinh(intensity / stretch) / intensity / np.arcsinh(top / stretch)
    rgb = np.clip(channels * factor, 0.0, 1.0)
    return np.moveaxis(rgb, 0, -1)


def plot_panels(
    images: dict[str, np.ndarray],
    bands: Sequence[str],
    *,
    noise: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    path: str | None = None,
    title: str | None = None,
):
    """Side-by-side asinh RGB panels (e.g. data / model / residual) on one common stretch.

    Parameters
    ----------
    images
        Panel title -> ``(bands, H, W)`` image.
    bands
        Band names.
    noise
        Per-band noise sigma; default estimated from the first panel.
    positions
        Optional ``(N, 2)`` source positions marked on every panel.
    labels
        Optional text label per source.
    path
        If given, the figure is saved there (atomically) and closed.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    first = next(iter(images.values()))
    if noise is None:
        med = np.median(first, axis=(1, 2), keepdims=True)
        noise = 1.4826 * np.median(np.abs(first - med), axis=(1, 2))
    first_rgb_top = intensity_top(first, bands, noise)
    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 4.4), squeeze=False)
    for ax, (name, image) in zip(axes[0], images.items(), strict=True):
        ax.imshow(
            asinh_rgb(image, bands, noise=noise, top=first_rgb_top),
            origin="lower",
            interpolation="nearest",
        )
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        if positions is not None and len(positions):
            ax.scatter(
                positions[:, 0], positions[:, 1], s=30, facecolors="none", edgecolors="w", lw=0.8
            )
            for k, (x, y) in enumerate(positions):
                text = labels[k] if labels is not None else str(k)
                ax.annotate(
                    text, (x, y), xytext=(4, 4), textcoords="offset points", color="w", fontsize=7
                )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
        plt.close(fig)
    return fig


def intensity_top(image: np.ndarray, bands: Sequence[str], noise: np.ndarray) -> float:
    """99.8th percentile of the RGB mean intensity of ``image`` in noise units (at least 5)."""
    idx = _channel_indices(bands, ("i", "r", "g"))
    sigma = np.asarray(noise, dtype=float)[idx][:, None, None]
    intensity = (np.nan_to_num(np.asarray(image, float)[idx]) / np.where(sigma > 0, sigma, 1)).mean(
        0
    )
    return max(float(np.percentile(intensity, 99.8)), 5.0)


def save_figure(fig, path: str) -> None:
    """Save a matplotlib figure atomically (temporary file + rename)."""
    import os

    from madness_ppl.atomic import atomic_write

    root, ext = os.path.splitext(str(path))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), tmp=f"{root}.tmp{ext or '.png'}")
