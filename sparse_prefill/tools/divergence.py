"""How far a patched model's next-token distributions are from dense: the measure that calibration (layer
sensitivity), the eval CLI and the fidelity benchmark share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_logp(model, ids: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, V] fp32 log-probabilities of the next token at the last ``rows`` positions of ``ids`` [1, S]."""
    with torch.no_grad():
        logits = model(ids, logits_to_keep=rows).logits[0]
    return F.log_softmax(logits.float(), -1)


def kl_to_dense(want: torch.Tensor, got: torch.Tensor) -> float:
    """KL(dense || patched) of next-token log-probabilities [rows, V] (``want`` dense), mean over rows."""
    return float((want.exp() * (want - got)).sum(-1).mean())
