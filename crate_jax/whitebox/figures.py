"""Matplotlib (Agg) figures of the white-box analysis. Every figure is a grid of square panels of
PANEL_PX x PANEL_PX pixels (curves: CURVE_PX), saved at DPI without cropping, so a figure with R
rows and C columns is exactly (R * PANEL_PX) x (C * PANEL_PX) pixels."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
PANEL_PX = 200
CURVE_PX = (400, 320)  # (width, height) of one curve panel


def _grid(rows: int, cols: int, panel_px=(PANEL_PX, PANEL_PX)):
  fig, axes = plt.subplots(rows, cols, squeeze=False,
                           figsize=(cols * panel_px[0] / DPI, rows * panel_px[1] / DPI), dpi=DPI)
  return fig, axes


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def _image_panel(ax, image, title=None):
  ax.imshow(np.clip(image, 0.0, 1.0), interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9, pad=2)


def attention_figure(images: np.ndarray, maps: np.ndarray, path: str, *, layer: int,
                     names=None, alpha: float = 0.6) -> str:
  """Rows = images; columns = input, then head k's CLS attention (min-max per map) over it.

  images (B, H, W, 3) in [0, 1]; maps (B, K, H, W) already upsampled to the image size.
  """
  b, k = maps.shape[:2]
  fig, axes = _grid(b, k + 1)
  lo = maps.min(axis=(2, 3), keepdims=True)
  hi = maps.max(axis=(2, 3), keepdims=True)
  maps = (maps - lo) / np.maximum(hi - lo, 1e-12)
  for i in range(b):
    _image_panel(axes[i, 0], images[i], names[i] if names else f"image {i}")
    for h in range(k):
      ax = axes[i, h + 1]
      _image_panel(ax, images[i], f"layer {layer} head {h}" if i == 0 else None)
      ax.imshow(maps[i, h], cmap="inferno", alpha=alpha, vmin=0.0, vmax=1.0,
                interpolation="nearest")
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.12 / b, wspace=0.04,
                      hspace=0.12)
  return _save(fig, path)


def pca_figure(images: np.ndarray, vis: dict, path: str, *, layer: int, names=None) -> str:
  """Rows = images; columns = input, 1st component (viridis) with the foreground contour,
  components 1-3 as RGB, foreground-only PCA as RGB (background black). vis from
  maps.pca_visualisation, already upsampled to the image size."""
  b = images.shape[0]
  fig, axes = _grid(b, 4)
  titles = ("input", f"layer {layer}: PC1", "PC1-3 as RGB", "foreground PCA")
  for i in range(b):
    top = i == 0
    _image_panel(axes[i, 0], images[i], names[i] if names else (titles[0] if top else None))
    axes[i, 1].imshow(vis["first"][i], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[i, 1].contour(vis["fg"][i].astype(float), levels=[0.5], colors="w", linewidths=0.8)
    axes[i, 1].set_xticks([])
    axes[i, 1].set_yticks([])
    if top:
      axes[i, 1].set_title(titles[1], fontsize=9, pad=2)
    _image_panel(axes[i, 2], vis["rgb"][i], titles[2] if top else None)
    _image_panel(axes[i, 3], vis["fg_rgb"][i], titles[3] if top else None)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.12 / b, wspace=0.04,
                      hspace=0.12)
  return _save(fig, path)


def _band(ax, x, stats, key, label, color):
  mean = np.asarray(stats[key])
  ax.plot(x, mean, "o-", color=color, label=label)
  if key + "_std" in stats:
    std = np.asarray(stats[key + "_std"])
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)


def curves_figure(stats: dict, path: str, *, title: str = "") -> str:
  """Three panels over the layer index: R^c (official, mean +- std); R, Delta R and the objective
  (when present); sparsity (zero fraction) and density of the ISTA codes (mean +- std)."""
  depth = len(np.asarray(stats["coding_rate_c"]))
  x = np.arange(depth)
  fig, axes = _grid(1, 3, CURVE_PX)
  ax = axes[0, 0]
  _band(ax, x, stats, "coding_rate_c", r"$R^c$ (official)", "C0")
  ax.set_title(r"compression $R^c(Z^\ell; U^\ell_{[K]})$", fontsize=10)
  ax = axes[0, 1]
  if "coding_rate" in stats:
    _band(ax, x, stats, "coding_rate", r"$R$", "C1")
    _band(ax, x, stats, "rate_reduction", r"$\Delta R = R - R^c$", "C2")
    _band(ax, x, stats, "objective", r"$R^c + \lambda\|Z\|_0/N - R$", "C3")
    ax.legend(fontsize=7)
  ax.set_title("rates and objective", fontsize=10)
  ax = axes[0, 2]
  _band(ax, x, stats, "sparsity", "zero fraction", "C4")
  _band(ax, x, stats, "density", r"density $\|Z^{\ell+1}\|_0/(Nd)$", "C5")
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=7)
  ax.set_title("sparsity of ISTA codes", fontsize=10)
  for ax in axes[0]:
    ax.set_xlabel("layer", fontsize=9)
    ax.set_xticks(x)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(left=0.06, right=0.99, bottom=0.15, top=0.82 if title else 0.9, wspace=0.25)
  return _save(fig, path)
