"""Prompt building blocks shared by the tools: token counts, the chat wrapper (as text, or token-exact around a token
body), natural English text and windows of it, and the passkey prompt."""

from __future__ import annotations

import math
import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a chat template brings its own)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def n_tokens(tokenizer, text: str) -> int:
    return len(encode(tokenizer, text))


def chat(tokenizer, user: str, answer_prefix: str) -> str:
    """``user`` as one chat turn, the assistant's turn opened and started with ``answer_prefix``."""
    return (
        tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        + answer_prefix
    )


def chat_ids(tokenizer, body: list[int], question: str, answer_prefix: str, length: int) -> list[int]:
    """:func:`chat` of ``body`` (token ids) then ``question``, exactly ``length`` token ids: the body is cut to fit."""
    head, tail = chat(tokenizer, "\0", "").split("\0")
    pre, post = encode(tokenizer, head), encode(tokenizer, "\n" + question + tail + answer_prefix)
    return pre + body[: length - len(pre) - len(post)] + post


def natural_text(split: str = "calibration") -> str:
    """English prose from the Python reference manual that CPython ships (``pydoc_data.topics``, ~465 KB).

    Every fourth topic (in sorted order) is held out for checks, the rest is calibration text, so a check never
    measures on text the calibration saw.
    """
    from pydoc_data.topics import topics

    if split not in ("calibration", "heldout"):
        raise ValueError(f"split: must be 'calibration' or 'heldout', got {split!r}")
    held = split == "heldout"
    return "\n\n".join(topics[k] for i, k in enumerate(sorted(topics)) if (i % 4 == 3) == held)


def natural_prompt(text_ids: list[int], length: int, rng: random.Random) -> list[int]:
    """``length`` consecutive tokens of the text from a random offset (the text repeats if it is shorter): a long
    document as a language model reads it."""
    ids = text_ids * math.ceil((length + 1) / len(text_ids))
    start = rng.randrange(len(ids) - length)
    return ids[start : start + length]


def passkey_prompt(tokenizer, length: int, depth: float = 0.5, seed: int = 0) -> tuple[str, str]:
    """A chat prompt of about ``length`` tokens with a 5-digit passkey at ``depth`` (0 = start, 1 = end).

    Returns (prompt text with the chat template applied, passkey).
    """
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = n_tokens(tokenizer, FILLER)
    n_fill = max(1, (length - 80) // per_filler)
    at = round(depth * n_fill)
    haystack = FILLER * at + needle + FILLER * (n_fill - at)
    question = (
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        f"{haystack}\nWhat is the pass key? Answer with the number only."
    )
    return chat(tokenizer, question, "The pass key is"), key
