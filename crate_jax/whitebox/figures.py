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


def _layer_axis(ax, x) -> None:
  """A per-layer panel's x axis: one tick per layer, light grid."""
  ax.set_xlabel("layer", fontsize=9)
  ax.set_xticks(x)
  ax.tick_params(labelsize=8)
  ax.grid(alpha=0.3)


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
                     names=None, alpha: float = 0.6, what: str = "attention") -> str:
  """Rows = images; columns = input, then head k's CLS attention (ToST: its memberships,
  what="memberships"; min-max per map) over it.

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
      _image_panel(ax, images[i], f"layer {layer} head {h}"
                   + ("" if what == "attention" else f" ({what})") if i == 0 else None)
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
    if "objective" in stats:
      _band(ax, x, stats, "objective", r"$R^c + \lambda\|Z\|_0/N - R$", "C3")
    ax.legend(fontsize=7)
  ax.set_title("rates and objective", fontsize=10)
  ax = axes[0, 2]
  if "sparsity" in stats:   # families with ISTA codes
    _band(ax, x, stats, "sparsity", "zero fraction", "C4")
    _band(ax, x, stats, "density", r"density $\|Z^{\ell+1}\|_0/(Nd)$", "C5")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
  ax.set_title("sparsity of ISTA codes" if "sparsity" in stats else "(no ISTA codes)",
               fontsize=10)
  for ax in axes[0]:
    _layer_axis(ax, x)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(left=0.06, right=0.99, bottom=0.15, top=0.82 if title else 0.9, wspace=0.25)
  return _save(fig, path)


BASELINE_STYLES = {"centred_box": ("k", "--"), "all_foreground": ("0.5", ":")}


def segmentation_figure(ious: dict, baselines: dict, path: str, *, random_ious: dict | None = None,
                        title: str = "") -> str:
  """One panel: mean IoU against the ground truth vs layer, one solid line per method (dashed in
  the same colour: the same model at random initialisation), baselines as horizontal lines.
  ious / random_ious {method: (L,)}; baselines {name: IoU}."""
  fig, axes = _grid(1, 1, CURVE_PX)
  ax = axes[0, 0]
  depth = len(next(iter(ious.values())))
  x = np.arange(depth)
  for i, (method, v) in enumerate(ious.items()):
    ax.plot(x, v, "o-", color=f"C{i}", label=f"{method}")
    if random_ious and method in random_ious:
      ax.plot(x, random_ious[method], "x--", color=f"C{i}", alpha=0.6,
              label=f"{method} (random init)")
  for name, value in baselines.items():
    color, style = BASELINE_STYLES.get(name, ("0.3", "-."))
    ax.axhline(value, color=color, linestyle=style, linewidth=1, label=name.replace("_", " "))
  _layer_axis(ax, x)
  ax.set_ylabel("mean IoU with ground truth", fontsize=9)
  ax.set_ylim(0.0, 1.0)
  ax.legend(fontsize=6, ncol=2, loc="upper left")
  if title:
    ax.set_title(title, fontsize=8)
  fig.subplots_adjust(left=0.13, right=0.98, bottom=0.14, top=0.9)
  return _save(fig, path)


def overlay_figure(images: np.ndarray, gt: np.ndarray, masks: dict, path: str, *, layer: int,
                   names=None) -> str:
  """Rows = images; columns = input with the ground-truth contour, then each method's mask
  (red) over the image with the ground-truth contour (white). images (B, H, W, 3) in [0, 1];
  gt (B, H, W) bool; masks {method: bool (B, H, W)} at the image size."""
  b = images.shape[0]
  fig, axes = _grid(b, len(masks) + 1)
  for i in range(b):
    _image_panel(axes[i, 0], images[i], names[i] if names else ("ground truth" if i == 0 else None))
    axes[i, 0].contour(gt[i].astype(float), levels=[0.5], colors="c", linewidths=0.8)
    for j, (method, m) in enumerate(masks.items()):
      ax = axes[i, j + 1]
      _image_panel(ax, images[i], f"layer {layer}: {method}" if i == 0 else None)
      red = np.zeros((*m[i].shape, 4), np.float32)
      red[..., 0], red[..., 3] = 1.0, 0.45 * m[i]
      ax.imshow(red, interpolation="nearest")
      ax.contour(gt[i].astype(float), levels=[0.5], colors="c", linewidths=0.8)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.12 / b, wspace=0.04,
                      hspace=0.12)
  return _save(fig, path)


def subspaces_figure(stats: dict, random_stats: dict, path: str, *, title: str = "") -> str:
  """Two panels over the layer index: incoherence max / mean of ||U_k^T U_j||_2 (k != j) and the
  dictionary's ||D^T D - I||_F / ||I||_F, trained (solid) against random init (dashed)."""
  depth = len(stats["incoherence_max"])
  x = np.arange(depth)
  fig, axes = _grid(1, 2, CURVE_PX)
  panels = ((axes[0, 0], (("incoherence_max", "max", "C0"), ("incoherence_mean", "mean", "C1")),
             r"incoherence $\|U_k^T U_j\|_2$, $k \neq j$"),
            (axes[0, 1], (("dictionary_orthogonality", "D", "C2"),),
             r"$\|D^T D - I\|_F / \|I\|_F$"))
  for ax, keys, name in panels:
    for key, label, color in keys:
      ax.plot(x, stats[key], "o-", color=color, label=f"{label} (trained)")
      if key in random_stats:
        ax.plot(x, random_stats[key], "x--", color=color, alpha=0.6, label=f"{label} (random)")
    ax.set_title(name, fontsize=10)
    _layer_axis(ax, x)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(left=0.08, right=0.99, bottom=0.15, top=0.82 if title else 0.9, wspace=0.25)
  return _save(fig, path)
