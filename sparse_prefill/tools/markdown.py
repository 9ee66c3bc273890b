"""Markdown for the tools' reports (eval's summary.md, compare_evals): tables and number cells, written one way."""

from __future__ import annotations


def table(header: list, rows: list[list]) -> list[str]:
    """A markdown table as lines: the header, its rule, then one line per row; cells through ``str``."""
    return [row(header), "|" + "---|" * len(header)] + [row(cells) for cells in rows]


def row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def fidelity_cells(p: dict) -> list[str]:
    """Cells of one eval ``per_length`` record: samples, top-1, KL, attention error (worst layer)."""
    worst = max(p["layer_attn_rel_err"])
    return [p["samples"], num(p["top1"]), num(p["kl"], 4), f"{num(p['attn_rel_err'], 4)} ({num(worst, 4)})"]


def num(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; ``-`` for None (an empty cell)."""
    return "-" if x is None else f"{x:.{digits}f}"
