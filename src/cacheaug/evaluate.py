"""Held-out evaluation: per-offset loss of the augmented model against the frozen decoder on the same tokens."""

from __future__ import annotations

import contextlib
import math

import torch

from .model import CacheAugmentedLM


def autocast_for(model: CacheAugmentedLM):
    """bf16/fp16 autocast when the decoder's weights are in half precision (fp32 coprocessor master weights)."""
    dtype = model.base.get_input_embeddings().weight.dtype
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(model.device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def heldout_losses(model: CacheAugmentedLM, seqs: torch.Tensor, n_points: int, batch: int = 4) -> dict:
    """Mean augmented and base loss per offset (lists of N_A floats) over ``n_points`` evenly spaced insertion
    points of every sequence in ``seqs`` ``[N, T]``."""
    was_training = model.training
    model.eval()
    T, N_A = seqs.shape[1], model.config.n_ahead
    positions = torch.linspace(0, T - 1 - N_A, n_points).long()
    aug = torch.zeros(N_A, dtype=torch.float64, device=model.device)
    base = torch.zeros_like(aug)
    with autocast_for(model):
        for i in range(0, len(seqs), batch):
            out = model(seqs[i : i + batch].to(model.device), positions=positions, return_base_losses=True)
            aug += out.token_losses.sum((0, 1)).double()
            base += out.base_token_losses.sum((0, 1)).double()
    model.train(was_training)
    n = len(seqs) * n_points
    return {"augmented": (aug / n).tolist(), "base": (base / n).tolist(), "n_points": n}


def relative_ppl_change(losses: dict) -> list[float]:
    """exp(mean augmented loss - mean base loss) - 1 per offset, in percent."""
    return [100 * (math.exp(a - b) - 1) for a, b in zip(losses["augmented"], losses["base"])]
