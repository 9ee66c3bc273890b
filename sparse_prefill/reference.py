"""The fp32 reference every backend is tested against: softmax attention over an explicit boolean mask.

With :func:`~sparse_prefill.masks.token_mask` of an index it is the definition of sparse attention over that index;
the Triton kernels and the blockwise torch path (:mod:`sparse_prefill.blockwise`) must reproduce it.
"""

from __future__ import annotations

import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked attention in fp32.

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D], ``Hq % Hkv == 0``: query head h reads KV head ``h // (Hq // Hkv)``.
        mask: [B, Hq, Sq, Sk] bool, True = attend. Rows with no True give zeros.
        scale: softmax scale.
    Returns:
        [B, Sq, Hq, D] fp32.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)
