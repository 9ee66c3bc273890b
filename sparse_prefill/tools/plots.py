"""PNG figures of an evaluation: the needle grid (dense vs patched) and the per-head pattern map of a config."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle

from ..config import PATTERN_DEFAULTS, HeadSpec, SparseConfig

matplotlib.use("Agg")  # files only; no display needed (and none on servers)

PATTERN_COLOURS = {
    "dense": "#9e9e9e",
    "a_shape": "#4c9be8",
    "vertical_slash": "#f28e2b",
    "block_sparse": "#59a14f",
    "adaptive": "#b07aa1",
}
SHORT = {"sink": "s", "local": "l", "vertical": "v", "slash": "d", "top_k": "k"}


def needle_heatmap(depths: list[float], lengths: list[int], grids: dict[str, list[list[float]]], path: str | Path):
    """Accuracy over the needle grid, one panel per mode.

    Args:
        depths: row labels (needle depth, 0 = start). lengths: column labels (prompt tokens).
        grids: mode name -> [len(depths)][len(lengths)] accuracy in [0, 1] (NaN where no sample).
        path: PNG file to write.
    """
    fig, axes = plt.subplots(
        1,
        len(grids),
        figsize=(1.6 + 1.1 * len(lengths) * len(grids), 1.4 + 0.5 * len(depths)),
        squeeze=False,
        constrained_layout=True,
    )
    for ax, (mode, grid) in zip(axes[0], grids.items()):
        values = np.array(grid, dtype=float)
        image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(mode)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pattern_map(
    config: SparseConfig,
    path: str | Path,
    density: list[list[float]] | None = None,
    title: str = "",
    chosen: list[list[str]] | None = None,
):
    """The config's pattern per (layer, head) as colour, with the measured density (or else the budgets) as text.

    Args:
        config: the config shown; ``config.layers[l][h]``.
        path: PNG file to write.
        density: optional [num_layers][num_heads] achieved tile density in [0, 1].
        title: figure title.
        chosen: optional [num_layers][num_heads] pattern that ran (``adaptive:<pattern>`` for adaptive heads, which
            are then coloured by their choice and drawn hatched); else the config's patterns.
    """
    names = list(PATTERN_DEFAULTS)
    ran = chosen or [[h.pattern for h in layer] for layer in config.layers]
    base = [[p.removeprefix("adaptive:") for p in layer] for layer in ran]
    codes = np.array([[names.index(p) for p in layer] for layer in base])
    n_layers, n_heads = codes.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * n_heads, 1.2 + 0.28 * n_layers), constrained_layout=True)
    ax.imshow(
        codes, cmap=ListedColormap([PATTERN_COLOURS[n] for n in names]), vmin=-0.5, vmax=len(names) - 0.5, aspect="auto"
    )
    for (layer, head), _ in np.ndenumerate(codes):
        spec = config.layers[layer][head]
        text = f"{density[layer][head]:.2f}" if density is not None else _budgets(spec)
        ax.text(head, layer, text, ha="center", va="center", fontsize=6)
        if ran[layer][head].startswith("adaptive:"):
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, hatch="///", lw=0, alpha=0.35))
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    used = sorted({p for layer in ran for p in layer}, key=lambda p: (names.index(p.removeprefix("adaptive:")), p))
    ax.legend(
        handles=[
            Patch(facecolor=PATTERN_COLOURS[n.removeprefix("adaptive:")], hatch="///" if ":" in n else None, label=n)
            for n in used
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=7,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _budgets(spec: HeadSpec) -> str:
    """Compact budgets, e.g. ``v1000 d6096`` (fractions as ``v.1``)."""
    return " ".join(f"{SHORT[k]}{v:g}".replace("0.", ".") for k, v in spec.params.items() if k in SHORT)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)
