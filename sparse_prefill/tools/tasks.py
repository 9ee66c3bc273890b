"""Long-context retrieval tasks built in code (RULER-style definitions) and their scorer.

Every task makes :class:`Sample` s of a target token length: a chat prompt that ends with an answer prefix, the gold
answers, and the depth of the queried needle in the context (0 = start, 1 = end). Samples are deterministic in
(seed, task, length, depth, index). The filler is natural-ish English made from a small grammar (or sentences of a
user file); the passkey task keeps its own repeated noise filler, as in RULER.

* ``niah``: one "special magic number" needle; run over the depth × length grid.
* ``passkey``: a 5-digit pass key in noise (:func:`sparse_prefill.tools.prompts.passkey_prompt`).
* ``multikey``: the queried needle among distractor needles with other keys.
* ``kv``: key-value retrieval from a JSON object of UUID pairs filling the context.
* ``vt``: variable tracking: follow a chain of ``VAR X = VAR Y`` assignments, name every variable in it.
* ``cwe``: common-words extraction: the 10 most frequent words of a numbered list (no needle, depth None).

Calibration reads the same content as token ids of an exact length: :func:`kv_prompt`, :func:`multi_needle_prompt`.
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

from .metrics import string_match_all
from .prompts import chat, chat_ids, encode, n_tokens, natural_prompt, passkey_prompt

# Word lists for the filler grammar, needle keys and the common-words task (320 distinct words), and the sentence
# templates of the grammar: data, in data/filler.json.
_FILLER = json.loads(resources.files(__package__).joinpath("data", "filler.json").read_text(encoding="utf-8"))
NOUNS, ADJECTIVES, VERBS = _FILLER["nouns"], _FILLER["adjectives"], _FILLER["verbs"]
NAMES, TIMES, TEMPLATES = _FILLER["names"], _FILLER["times"], _FILLER["templates"]
WORDS = sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS))

NEEDLE_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


@dataclass
class Sample:
    """One prompt. ``prompt`` has the chat template applied and ends with the answer prefix; ``depth`` is where the
    queried needle sits in the context (0 = start, 1 = end; None for ``cwe``). ``max_new_tokens`` and ``score``
    (by :data:`metric`) are the task's."""

    task: str
    length: int
    depth: float | None
    prompt: str
    answers: list[str]
    metric: ClassVar[str] = "string_match_all"

    @property
    def max_new_tokens(self) -> int:
        return TASKS[self.task].max_new_tokens

    def score(self, prediction: str) -> float:
        return score(prediction, self.answers)


@dataclass(frozen=True)
class Task:
    make: Callable[..., Sample]  # (tokenizer, prompt tokens, depth, rng, haystack) -> Sample
    max_new_tokens: int


class Haystack:
    """Filler sentences: from the built-in grammar, or cycled from a text file starting at a random sentence."""

    def __init__(self, path: str | Path | None = None):
        self.sentences = None
        if path is not None:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            # Long runs without sentence ends are cut into 40-word pieces so the needle lands near its depth.
            parts = [s.split() for s in re.split(r"(?<=[.!?])\s+", text)]
            self.sentences = [" ".join(p[i : i + 40]) for p in parts for i in range(0, len(p), 40)]
            if not self.sentences:
                raise ValueError(f"{path}: no text")

    def take(self, seed: str, n: int) -> list[str]:
        """The first ``n`` sentences of the stream named by ``seed`` (so a longer take extends a shorter one)."""
        rng = random.Random(seed)
        if self.sentences is None:
            return [_sentence(rng) for _ in range(n)]
        start = rng.randrange(len(self.sentences))
        return [self.sentences[(start + i) % len(self.sentences)] for i in range(n)]


def _sentence(rng: random.Random) -> str:
    noun, noun2 = rng.sample(NOUNS, 2)
    name, name2 = rng.sample(NAMES, 2)
    adj = rng.choice(ADJECTIVES)
    a_adj = ("an " if adj[0] in "aeiou" else "a ") + adj
    return rng.choice(TEMPLATES).format(
        noun=noun,
        noun2=noun2,
        name=name,
        name2=name2,
        adj=adj,
        a_adj=a_adj,
        verb=rng.choice(VERBS),
        time=rng.choice(TIMES),
    )


def fit(tokenizer, length: int, build: Callable[[int], Sample]) -> Sample:
    """``build(n)`` with as many filler units ``n`` as fit: the prompt is at most ``length`` tokens, and close to it.

    Token counts are measured, not guessed: a few secant steps on the tokens per unit, then shrink until it fits.
    """
    base = n_tokens(tokenizer, build(0).prompt)
    if base >= length:
        raise ValueError(f"length {length}: the prompt needs {base} tokens before any filler")
    n = 32
    for _ in range(3):
        rate = max(1.0, (n_tokens(tokenizer, build(n).prompt) - base) / n) if n else 1.0
        n = int((length - base) / rate)
    while n > 0:
        sample = build(n)
        over = n_tokens(tokenizer, sample.prompt) - length
        if over <= 0:
            return sample
        n -= max(1, int(over / rate))
    return build(0)


def insert(sentences: list[str], needles: list[tuple[float, str]], sep: str = " ") -> str:
    """Join ``sentences`` with each needle inserted at the sentence boundary nearest its depth (0..1)."""
    at = {}
    for depth, text in needles:
        at.setdefault(round(depth * len(sentences)), []).append(text)
    parts = []
    for i in range(len(sentences) + 1):
        parts += at.get(i, [])
        if i < len(sentences):
            parts.append(sentences[i])
    return sep.join(parts)


def magic_keys(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct needle keys like ``quiet-lantern``."""
    keys: list[str] = []
    while len(keys) < n:
        if (key := f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}") not in keys:
            keys.append(key)
    return keys


def magic_needle(key: str, value: int) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def magic_value(rng: random.Random) -> int:
    return rng.randint(10**6, 10**7 - 1)


def make_niah(tokenizer, length: int, depth: float, rng: random.Random, haystack: Haystack, distractors: int = 0):
    """Single needle (``distractors=0``) or multi-key needle: distractor needles with other keys at random depths."""
    keys = magic_keys(rng, distractors + 1)
    values = [magic_value(rng) for _ in keys]
    needles = [(depth if i == 0 else rng.random(), magic_needle(k, v)) for i, (k, v) in enumerate(zip(keys, values))]
    stream = f"{rng.random()}"
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"

    def build(n: int) -> Sample:
        context = insert(haystack.take(stream, n), needles)
        prompt = chat(tokenizer, f"{NEEDLE_INSTRUCTION}\n{context}\n{question}", prefix)
        return Sample("multikey" if distractors else "niah", length, depth, prompt, [str(values[0])])

    return fit(tokenizer, length, build)


def make_multikey(tokenizer, length, depth, rng, haystack):
    return make_niah(tokenizer, length, depth, rng, haystack, distractors=3)


def make_passkey(tokenizer, length, depth, rng, haystack):
    prompt, key = passkey_prompt(tokenizer, length, depth, seed=rng.randrange(2**31))
    return Sample("passkey", length, depth, prompt, [key])


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
KV_ANSWER = "The value associated with the key is"


def make_kv(tokenizer, length, depth, rng, haystack):
    """A JSON object of UUID pairs fills the whole context; the queried pair sits at ``depth``."""
    key, value = random_uuid(rng), random_uuid(rng)
    stream = f"{rng.random()}"

    def build(n: int) -> Sample:
        pairs_rng = random.Random(stream)
        pairs = [f'"{random_uuid(pairs_rng)}": "{random_uuid(pairs_rng)}",' for _ in range(n)]
        body = insert(pairs, [(depth, f'"{key}": "{value}",')], sep="\n")
        user = f'{KV_INSTRUCTION}\n\nJSON data:\n{{\n{body.rstrip(",")}\n}}\n\nKey: "{key}"\nCorresponding value:'
        return Sample("kv", length, depth, chat(tokenizer, user, KV_ANSWER), [value])

    return fit(tokenizer, length, build)


def make_vt(tokenizer, length, depth, rng, haystack, hops: int = 4):
    """A chain ``VAR A = 12345, VAR B = VAR A, ...``; its links are spread from ``depth`` to the end."""
    names = []
    while len(names) < hops + 1:
        if (name := "".join(rng.choices(string.ascii_uppercase, k=5))) not in names:
            names.append(name)
    value = rng.randint(10000, 99999)
    links = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    needles = [(depth + (1 - depth) * i / (hops + 1), link) for i, link in enumerate(links)]
    stream = f"{rng.random()}"
    question = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        f"Question: Find all variables that are assigned the value {value} in the text above."
    )
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
        f"assigned the value {value}, they are:"
    )

    def build(n: int) -> Sample:
        context = insert(haystack.take(stream, n), needles)
        return Sample("vt", length, depth, chat(tokenizer, question.format(context=context), prefix), names)

    return fit(tokenizer, length, build)


def make_cwe(tokenizer, length, depth, rng, haystack, num_cw: int = 10):
    """A numbered word list where ``num_cw`` words are frequent (RULER: 30 times vs 3 for the others, scaled down
    for short prompts so the common words still fit)."""
    words = rng.sample(WORDS, len(WORDS))
    common = words[:num_cw]
    stream = f"{rng.random()}"
    # Items a prompt of this length holds, at ~7 tokens per "123. word" item after ~200 tokens of instructions.
    freq_cw = min(30, max(2, (length - 200) // 7 // 13))
    freq_ucw = max(1, freq_cw // 10)

    def build(n: int) -> Sample:
        n = min(n, len(words) - num_cw)  # beyond the word pool the list stops growing, and fit() stops there
        items = common * freq_cw + words[num_cw : num_cw + n] * freq_ucw
        random.Random(stream).shuffle(items)
        listing = " ".join(f"{i}. {w}" for i, w in enumerate(items, 1))
        user = (
            "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            f"that appear most often.\n{listing}\nQuestion: What are the {num_cw} most common words in the above list?"
        )
        prefix = f"Answer: The top {num_cw} words that appear most often in the list are:"
        return Sample("cwe", length, None, chat(tokenizer, user, prefix), list(common))

    return fit(tokenizer, length, build)


# Token-exact prompts (calibration's): the tasks' content, assembled as token ids of exactly ``length``.


def kv_prompt(tokenizer, length: int, rng: random.Random) -> list[int]:
    """``kv``'s JSON object of UUID pairs and its question about one key, as exactly ``length`` token ids."""
    lines, total = [], 0
    while total < length:
        pair = (random_uuid(rng), random_uuid(rng))
        lines.append((pair, encode(tokenizer, f'"{pair[0]}": "{pair[1]}",\n')))
        total += len(lines[-1][1])
    body = encode(tokenizer, f"{KV_INSTRUCTION}\n\nJSON data:\n{{\n") + [t for _, ids in lines for t in ids]
    # Ask about a pair that survives trimming (the body loses at most its last few pairs).
    key = lines[rng.randrange(max(1, len(lines) - 8))][0][0]
    return chat_ids(tokenizer, body, f'Key: "{key}"\nCorresponding value:', KV_ANSWER, length)


def multi_needle_prompt(tokenizer, text_ids: list[int], length: int, rng: random.Random, needles: int = 4):
    """Several ``niah`` needles at random depths of natural text (token ids of :func:`natural_text`), then a question
    for all of them, as exactly ``length`` token ids."""
    keys = magic_keys(rng, needles)
    body = natural_prompt(text_ids, length, rng)
    for key, at in zip(keys, sorted(rng.sample(range(length - 200), needles), reverse=True)):
        body[at:at] = encode(tokenizer, f" {magic_needle(key, magic_value(rng))} ")
    question = f"What are the special magic numbers for {', '.join(keys)} mentioned in the provided text?"
    return chat_ids(tokenizer, body, question, "The special magic numbers are", length)


TASKS: dict[str, Task] = {
    "niah": Task(make_niah, 16),
    "passkey": Task(make_passkey, 12),
    "multikey": Task(make_multikey, 16),
    "kv": Task(make_kv, 48),
    "vt": Task(make_vt, 40),
    "cwe": Task(make_cwe, 64),
}


def make_samples(
    tokenizer,
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int,
    haystack: Haystack | None = None,
) -> list[Sample]:
    """All prompts of a run: ``niah`` over depths × lengths × samples; other tasks ``samples`` per length at random
    depths. Deterministic in ``seed``.

    A length counts the prompt and the answer tokens (as RULER does), so prompt and answer fit a model's context.
    """
    haystack = haystack or Haystack()
    out = []
    for task in tasks:
        spec = TASKS[task]
        for length in lengths:
            grid = depths if task == "niah" else [None]
            for depth in grid:
                for i in range(samples):
                    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{i}")
                    at = rng.random() if depth is None else depth
                    sample = spec.make(tokenizer, length - spec.max_new_tokens, at, rng, haystack)
                    sample.length = length
                    out.append(sample)
    return out


def score(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of gold answers contained in the prediction (case-insensitive), so a
    single-answer task scores 0 or 1 and multi-answer tasks get partial credit."""
    return string_match_all(prediction, answers)
