"""Long prompts built in code: a passkey hidden at a chosen depth in filler text."""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, n_tokens: int, depth: float = 0.5, seed: int = 0) -> tuple[str, str]:
    """A chat prompt of about ``n_tokens`` tokens with a 5-digit passkey at ``depth`` (0 = start, 1 = end).

    Returns (prompt text with the chat template applied, passkey).
    """
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    n_fill = max(1, (n_tokens - 80) // per_filler)
    at = round(depth * n_fill)
    haystack = FILLER * at + needle + FILLER * (n_fill - at)
    question = (
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        f"{haystack}\nWhat is the pass key? Answer with the number only."
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return text + "The pass key is", key
