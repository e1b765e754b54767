"""Perplexity with the paper's protocol: non-overlapping windows, mean token NLL, exp."""
from __future__ import annotations

import math

import torch
from ..utils.monitor import StepLog


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, device=None, desc: str = "ppl") -> float:
    """exp(mean negative log-likelihood of every predicted token) over `windows` [n, T]."""
    device = device or next(model.parameters()).device
    model.eval()
    total_nll, total_tokens = 0.0, 0
    steps = StepLog(len(windows), f"[eval] {desc}", unit="window")
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        steps.update(len(batch))
    steps.close()
    return math.exp(total_nll / total_tokens)
