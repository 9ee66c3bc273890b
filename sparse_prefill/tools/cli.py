"""Argument checks shared by the command lines, so every one refuses a bad argument before it loads a model.

The parsers are argparse ``type=`` functions: they raise ``argparse.ArgumentTypeError``, which argparse turns into one
line naming the argument and exit code 2. :func:`output_problem` checks an output path the same way, early, so a run
never fails at its very end, after the long work, because its result cannot be written.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path

import torch

from ..config import MAX_INT


def parse_lengths(text: str, minimum: int = 1) -> list[int]:
    """Token counts, in order: ``"2k,4K, 6000"`` -> ``[2048, 4096, 6000]``.

    Each item is a whole number of tokens, or of K (1024) tokens with a ``k`` or ``K`` suffix, from ``minimum`` to
    ``MAX_INT``. Anything else (``4.5k``, ``infk``, ``0``, ``-1``, an empty item) raises ArgumentTypeError.
    """
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", item)
        n = int(m[1]) * (1024 if m[2] else 1) if m else None
        if n is None or not minimum <= n <= MAX_INT:
            raise argparse.ArgumentTypeError(
                f"bad length {item.strip()!r}: expected token counts from {minimum} to {MAX_INT}, like 4096 or 4k"
            )
        out.append(n)
    return out


def format_length(n: int) -> str:
    """A token count as :func:`parse_lengths` reads it back, in K where whole: 4096 -> ``"4k"``, 6000 -> ``"6000"``."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def lengths(minimum: int, distinct: bool = False):
    """argparse type: :func:`parse_lengths` with this ``minimum``; ``distinct``: sorted, each length once."""
    if distinct:
        return lambda text: sorted(set(parse_lengths(text, minimum)))
    return lambda text: parse_lengths(text, minimum)


def length(minimum: int):
    """argparse type: one length by the rule of :func:`parse_lengths`."""

    def parse(text: str) -> int:
        if "," in text:
            raise argparse.ArgumentTypeError(f"expected one length, got {text!r}")
        return parse_lengths(text, minimum)[0]

    return parse


def integer(minimum: int, maximum: int = MAX_INT):
    """argparse type: a whole number from ``minimum`` to ``maximum``."""

    def parse(text: str) -> int:
        n = int(text) if re.fullmatch(r"\s*[-+]?\d{1,20}\s*", text) else None
        if n is None or not minimum <= n <= maximum:
            raise argparse.ArgumentTypeError(f"must be an integer from {minimum} to {maximum}, got {text!r}")
        return n

    return parse


def fraction(low_open: bool = False, high_open: bool = False):
    """argparse type: a number in [0, 1]; ``low_open`` / ``high_open`` leave out 0 / 1; nan is refused."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not ((0 < x if low_open else 0 <= x) and (x < 1 if high_open else x <= 1)):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
        return x

    return parse


def fractions(low_open: bool = False, high_open: bool = False):
    """argparse type: comma-separated :func:`fraction` s."""
    one = fraction(low_open, high_open)
    return lambda text: [one(item) for item in text.split(",")]


def device(text: str) -> str:
    """argparse type: a torch device string this machine has (``cpu``, ``cuda``, ``cuda:1``), returned as given."""
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def output_problem(path: Path, folder: bool) -> str | None:
    """Why ``path`` cannot be written as a file (``folder=False``) or a folder, or None if it can.

    Outputs are written beside ``path`` and moved onto it, so what matters is that ``path`` is not of the other kind
    and that the nearest existing folder above it (missing ones are made) is a folder this process can write in.
    """
    try:
        if path.exists() and path.is_dir() != folder:
            return f"{path} is {'a file' if folder else 'a folder'}; expected {'a folder' if folder else 'a file'}"
        above = path.absolute().parent
        while not above.exists():
            above = above.parent
        if not above.is_dir():
            return f"{path} is under {above}, which is a file"
    except OSError as e:
        return f"cannot check {path} ({e.strerror or e})"
    try:
        with tempfile.TemporaryFile(dir=above):  # the real test: permissions, read-only mounts, ACLs
            pass
    except OSError as e:
        return f"cannot write {path}: cannot create files in {above} ({e.strerror or e})"
    return None


ROPE_TYPES = ("yarn", "linear", "dynamic")


def rope_scaling(text: str) -> tuple[str, float]:
    """argparse type of ``--rope-scaling TYPE:FACTOR``: ``"yarn:4"`` -> ``("yarn", 4.0)``.

    TYPE is one of :data:`ROPE_TYPES` (transformers' rope types), FACTOR a finite number above 1: the scaled model's
    context is its original one times FACTOR (:func:`sparse_prefill.tools.models.scale_rope`).
    """
    kind, _, factor = text.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = None
    if kind.strip() not in ROPE_TYPES or value is None or not 1.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected TYPE:FACTOR with TYPE one of {', '.join(ROPE_TYPES)} and FACTOR a number above 1 "
            f"(like yarn:4), got {text!r}"
        )
    return kind.strip(), value


def add_rope_scaling(parser: argparse.ArgumentParser) -> None:
    """The ``--rope-scaling`` option, as every command line that loads a model documents it."""
    parser.add_argument(
        "--rope-scaling",
        type=rope_scaling,
        metavar="TYPE:FACTOR",
        help=f"stretch the model's RoPE before it is built: TYPE one of {', '.join(ROPE_TYPES)}, FACTOR > 1; its "
        "context becomes the original one times FACTOR (e.g. yarn:4 runs SmolLM2 up to 32K)",
    )
