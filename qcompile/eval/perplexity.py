"""Perplexity by the standard protocol: ppl = exp(mean over windows of the window's mean token loss)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def window_losses(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor,
                  progress: bool = True) -> list[float]:
    """Mean next-token loss of each window; ``logits_fn`` maps ids [1, L] to logits [1, L, V]."""
    losses = []
    for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        ids = w[None]
        logits = logits_fn(ids).float()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} on window {len(losses)}")
        losses.append(loss.item())
    return losses


def ppl_of(losses: list[float]) -> float:
    return math.exp(sum(losses) / len(losses))


def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, progress: bool = True) -> float:
    return ppl_of(window_losses(logits_fn, windows, progress))
