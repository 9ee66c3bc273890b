"""Dense attention backends: SDPA (fastest kernel first on CUDA) and flash-attn, for calls and heads that run dense.

:mod:`sparse_prefill.devices` says which one is faster per device; the dispatcher picks per call.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .layout import call_unsupported

# Fastest first: cuDNN is the fastest dense kernel on Hopper; SDPA skips the ones that cannot take the input.
_DENSE_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _fastest_first(query: torch.Tensor):
    return sdpa_kernel(_DENSE_BACKENDS, set_priority=True) if query.is_cuda else contextlib.nullcontext()


def dense_attention(module, query, key, value, attention_mask, **kwargs):
    """Stock SDPA, with the fastest backend first on CUDA."""
    with _fastest_first(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def dense_heads_into(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    heads: list[int],
    scale: float,
) -> None:
    """Dense attention of some query heads by SDPA (fastest backend first), written into their slots of ``out``.

    Args:
        out: [B, q_len, Hq, D], the other heads' output. query, key, value: as for
            :func:`~sparse_prefill.dispatch.sparse_prefill_attention`. attention_mask: its mask (a tensor or a
            lower-right ``CausalBias``), or None for bottom-right causal attention (the queries are the last q_len
            positions, as in the index).
            heads: ascending query heads.
    One SDPA call per KV head over its selected query heads, so K/V are never repeated.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    mask, causal = attention_mask, attention_mask is None
    if causal and q_len != kv_len:  # is_causal aligns top-left
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        causal = False
    group = query.shape[1] // key.shape[1]
    with _fastest_first(query):
        for kv, run in itertools.groupby(heads, lambda h: h // group):
            run = list(run)
            rows = slice(run[0], run[-1] + 1) if run[-1] - run[0] + 1 == len(run) else run  # a view when it can be
            o = F.scaled_dot_product_attention(
                query[:, rows],
                key[:, kv : kv + 1],
                value[:, kv : kv + 1],
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=True,
            )
            out[:, :, rows] = o.transpose(1, 2)


def flash_unsupported(query, key, attention_mask, kwargs: dict) -> str:
    """Why flash-attn cannot run this dense call ("" when it can). It runs causal prefill without a mask only: a
    padding mask or q_len != kv_len stays on SDPA, which reads the mask transformers built."""
    if not query.is_cuda:
        return "not a CUDA tensor"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {query.dtype}"
    if attention_mask is not None:
        return "an attention mask"
    if query.shape[2] != key.shape[2]:
        return "q_len != kv_len"
    if query.shape[-1] > 256:
        return f"head_dim {query.shape[-1]}"
    return call_unsupported(None, kwargs, 0.0, key.shape[2])


def flash_attention(query, key, value, dropout: float, scaling: float) -> tuple[torch.Tensor, None]:
    """Causal attention with flash-attn's ``flash_attn_func`` (GQA-native): query [B, Hq, S, D], key/value
    [B, Hkv, S, D] -> ([B, S, Hq, D], None), the layout transformers expects."""
    out = load_flash_attn()(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
    )
    return out, None


def load_flash_attn():
    """``flash_attn.flash_attn_func``; ImportError naming the fix when flash-attn is missing or broken."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise ImportError(
            f"dense_backend='flash_attn' needs the flash-attn package ({e}); install it with "
            "pip install 'sparse-prefill[flash]', or use dense_backend='auto'"
        ) from e
    return flash_attn_func


def flash_attn_error() -> str | None:
    """None when flash-attn imports, else why not."""
    try:
        load_flash_attn()
    except ImportError as e:
        return str(e.__cause__ or e)
    return None
