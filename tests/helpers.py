"""The independent slow path: augment at one point, then plain decoding by the unmodified base model."""

import torch
import torch.nn.functional as F


def perturb_trainable(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor off its initial value (e.g. LoRA's B = 0), so tests see a generic coprocessor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * p.detach().abs().mean().clamp_min(1e-2) * torch.randn(p.shape, generator=g).to(p))


def reference_losses(model, ids: torch.Tensor, p: int) -> torch.Tensor:
    """Per-offset losses [N_A] of trace p for one sequence ids [1, T], through augment + plain decoding."""
    n_ahead = model.config.n_ahead
    aug = model.augment(ids[:, : p + 1])
    losses = [F.cross_entropy(aug.logits.float(), ids[:, p + 1])]
    if n_ahead > 1:
        cache_kw = {model.family.cache_kwarg: aug.cache}
        with torch.no_grad():
            logits = model.base(input_ids=ids[:, p + 1 : p + n_ahead], **cache_kw).logits  # plain HF decoding
        losses.extend(F.cross_entropy(logits[0].float(), ids[0, p + 2 : p + n_ahead + 1], reduction="none"))
    return torch.stack(losses)
