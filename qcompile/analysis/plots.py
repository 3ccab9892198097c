"""The pictures the DuQuant and SpinQuant papers draw, for a ``stats.Comparison``: PNG files, one per plot.

- ``…-layers.png``: max |x| and kurtosis of every layer's linear inputs, before (dashed) and after (solid);
- ``…-channels-L{layer}-{role}.png``: per-channel max |x| of one input, before above after (same scale),
  where an outlier channel shows as a spike that the transform should flatten;
- ``…-surface-L{layer}-{role}.png``: |x| over tokens × channels of one window as a 3-D surface, before and
  after on one z scale; max-pooled to at most 64 × 128 cells so that outliers survive the downsampling.

matplotlib is imported when a plot is drawn (Agg backend: files only, no display needed).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from qcompile.analysis.stats import ROLES, Comparison

GRID = (64, 128)  # the surface's (tokens, channels) cells at most
DPI = 90


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stem(model: str, recipe: str) -> str:
    """A file-name prefix naming the model and recipe (``tiny:llama``, paths and ``+`` made safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(model.rstrip('/')).name}-{recipe}")


def layers(c: Comparison, title: str, path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=DPI)
    for ax, what, label in ((axes[0], "max", "max |x|"), (axes[1], "kurtosis", "kurtosis")):
        for i, role in enumerate(ROLES):
            rows = [(b, a) for b, a in c.rows() if b.site.role == role]
            x = [b.site.layer for b, _ in rows]
            ax.plot(x, [getattr(b, what) for b, _ in rows], "--", marker=".", color=f"C{i}", alpha=0.6,
                    label=f"{role} before")
            ax.plot(x, [getattr(a, what) for _, a in rows], "-", marker=".", color=f"C{i}", label=f"{role} after")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(3.0, color="grey", lw=0.8)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def channels(c: Comparison, key: str, title: str, path: Path) -> Path:
    plt = _pyplot()
    b, a = _pair(c, key)
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), dpi=DPI, sharey=True)
    for ax, s, when, color in ((axes[0], b, "before", "C3"), (axes[1], a, "after", "C0")):
        y = s.channel_max.numpy()
        ax.fill_between(range(len(y)), y, color=color, alpha=0.35, lw=0)
        ax.plot(y, color=color, lw=0.6)  # a line, not bars: a one-channel spike stays visible at any width
        top = int(y.argmax())
        right = top > 0.8 * len(y)
        ax.annotate(f"ch {top}: {y[top]:.1f}", (top, y[top]), xytext=(-4 if right else 4, -10),
                    textcoords="offset points", ha="right" if right else "left", fontsize=8)
        ax.set_xlim(0, len(y) - 1)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("max |x|")
        ax.set_title(f"{when}: max {s.max:.2f}, kurtosis {s.kurtosis:.1f}", fontsize=9, loc="left")
    axes[1].set_xlabel("channel")
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def surface(before: torch.Tensor, after: torch.Tensor, title: str, path: Path) -> Path:
    """``before``/``after``: |x| as [tokens, channels] of one window."""
    plt = _pyplot()
    import numpy as np

    fig = plt.figure(figsize=(11, 4.6), dpi=DPI)
    top = float(max(before.max(), after.max()))
    for i, (mag, when) in enumerate(((before, "before"), (after, "after"))):
        cells = (min(GRID[0], mag.shape[0]), min(GRID[1], mag.shape[1]))
        z = F.adaptive_max_pool2d(mag[None, None].float(), cells)[0, 0].numpy()
        tok, ch = np.meshgrid(np.linspace(0, mag.shape[0] - 1, cells[0]), np.linspace(0, mag.shape[1] - 1, cells[1]),
                              indexing="ij")
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        ax.plot_surface(ch, tok, z, cmap="coolwarm", vmin=0, vmax=top, linewidth=0, antialiased=False)
        ax.set_zlim(0, top)
        ax.set_xlabel("channel")
        ax.set_ylabel("token")
        ax.set_zlabel("|x|")
        ax.set_title(f"{when}: max {float(mag.max()):.2f}", fontsize=9)
    fig.suptitle(f"{title} (max-pooled to ≤ {GRID[0]}×{GRID[1]} cells)", fontsize=10)
    return _save(fig, plt, path)


def write(c: Comparison, model: str, keys: list[str], out: str | Path) -> list[str]:
    """Write the layers plot and, per site key ("LAYER:ROLE"), the channel and surface plots (the surface needs
    the comparison measured with ``keep_tokens``); return the file paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = stem(model, c.recipe)
    what = f"{model}, recipe {c.recipe} (quantization off)"
    paths = [layers(c, f"{what}: every linear input, before (dashed) and after (solid)", out / f"{name}-layers.png")]
    for key in keys:
        layer, role = key.split(":")
        site = f"layer {layer} {role} input"
        paths.append(channels(c, key, f"{what}: {site}, per-channel max |x|",
                              out / f"{name}-channels-L{layer}-{role}.png"))
        b, a = _pair(c, key)
        paths.append(surface(b.tokens, a.tokens, f"{what}: {site}, |x| per token and channel",
                             out / f"{name}-surface-L{layer}-{role}.png"))
    return [str(p) for p in paths]


def _pair(c: Comparison, key: str):
    return next((b, a) for b, a in c.rows() if b.site.key == key)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
