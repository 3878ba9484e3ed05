"""Selective augmentation: a gate that decides, from the frozen decoder's state at a position, whether to insert
latents there (the paper's abstract: augmentation can be skipped where "a given cache is deemed not to require extra
computation").

The gate is a logistic head on the frozen decoder's last hidden state at the insertion point p (the state that
predicts token p+1; standardised, then one linear layer: D + 1 weights). It is fitted after the coprocessor, from
what augmenting did at many positions of a corpus: the change in the mean loss of the next N_A tokens, augmented
minus frozen (one parallel pass gives both). A position is a positive where augmenting lowered that loss by more
than ``margin`` nats; each position is weighted by how much was at stake (|change - margin|), so the fit is a
cost-sensitive classifier of "augmenting here pays". Where it does not fire, decoding is the frozen model's, bit
for bit.

    ckpt/
      gate_config.json      GateConfig (threshold, margin, what it was fitted on and how it did)
      gate.safetensors      mean, scale, weight, bias

``cacheaug train-gate --checkpoint ckpt/ --data ...`` fits it and writes it into the checkpoint folder; every
consumer (``augment`` / ``generate``, ``eval synth`` / ``eval ppl``, lm-eval, the server's ``gate`` policy) then
uses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import atomic

GATE_CONFIG = "gate_config.json"
GATE_WEIGHTS = "gate.safetensors"


@dataclass(frozen=True)
class GateConfig:
    """A fitted gate's settings.

    Args:
        hidden_size: D, the frozen decoder's hidden size.
        threshold: fire where the gate's probability is at least this (``augment`` / ``generate`` / evaluation
            take another per call).
        margin: nats; a position counted as a positive when augmenting lowered the mean loss of its next
            ``n_ahead`` tokens by more than this.
        n_ahead: the window of next tokens whose loss change it was fitted on.
        fit: what it was fitted on and how it did on its validation positions (informational).
    """

    hidden_size: int
    threshold: float = 0.5
    margin: float = 0.0
    n_ahead: int = 16
    fit: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or isinstance(self.threshold, bool):
            raise ValueError(f"the gate's threshold must be a probability in [0, 1], got {self.threshold!r}")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(f"the gate's margin must be a finite number of nats >= 0, got {self.margin!r}")


class Gate(nn.Module):
    """``p(fire) = sigmoid(w . (h - mean) / scale + b)`` on the frozen decoder's last hidden state ``h`` at p."""

    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.register_buffer("mean", torch.zeros(D))
        self.register_buffer("scale", torch.ones(D))
        self.linear = nn.Linear(D, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.requires_grad_(False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[...]`` logits for hidden states ``[..., D]`` (computed in float32 whatever the decoder's dtype)."""
        x = (hidden.float().to(self.mean.device) - self.mean) / self.scale
        return x @ self.linear.weight[0].float() + self.linear.bias[0].float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[...]`` probabilities that augmenting at these states pays."""
        return torch.sigmoid(self.logits(hidden))

    def fires(self, hidden: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """``[...]`` bool: the gate says augment (probability >= ``threshold``, default the config's)."""
        return self(hidden) >= (self.config.threshold if threshold is None else threshold)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "scale": self.scale, "weight": self.linear.weight[0], "bias": self.linear.bias}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
        (path / GATE_CONFIG).unlink(missing_ok=True)  # the config marks a complete gate: it goes last
        atomic.write_file(path / GATE_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic.write_text(
            path / GATE_CONFIG, json.dumps(dataclasses.asdict(self.config), indent=2, sort_keys=True) + "\n"
        )
        return path

    @classmethod
    def load(cls, path: str | Path, hidden_size: int | None = None) -> "Gate | None":
        """The gate saved in a checkpoint folder, or None when it has none."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / GATE_CONFIG).is_file():
            return None
        try:
            data = json.loads((path / GATE_CONFIG).read_text())
            known = {f.name for f in dataclasses.fields(GateConfig)}
            config = GateConfig(**{k: v for k, v in data.items() if k in known})
            state = load_file(str(path / GATE_WEIGHTS))
        except Exception as err:  # json, dataclass and safetensors errors (the latter have their own types)
            raise ValueError(
                f"{path / GATE_CONFIG} or {GATE_WEIGHTS} is corrupt ({err}): fit the gate again with "
                "`cacheaug train-gate`, or delete both files to use the checkpoint without one"
            ) from err
        if hidden_size is not None and config.hidden_size != hidden_size:
            raise ValueError(
                f"the gate in {path} reads hidden states of size {config.hidden_size}, but the base model's "
                f"are {hidden_size}: it belongs to another model"
            )
        gate = cls(config)
        with torch.no_grad():
            gate.mean.copy_(state["mean"])
            gate.scale.copy_(state["scale"])
            gate.linear.weight[0].copy_(state["weight"])
            gate.linear.bias.copy_(state["bias"])
        return gate


# ---------------------------------------------------------------------------------------------------- fitting
def fit(
    states: torch.Tensor,
    deltas: torch.Tensor,
    *,
    margin: float = 0.0,
    threshold: float = 0.5,
    l2: float = 1e-3,
    steps: int = 200,
    n_ahead: int = 16,
) -> Gate:
    """A gate fitted to hidden states ``[n, D]`` and loss changes ``[n]`` (augmented minus frozen, nats): weighted
    logistic regression (label: change < -margin; weight: |change + margin|, normalised to mean 1) with an L2
    penalty, by L-BFGS on the full set."""
    X = states.reshape(-1, states.shape[-1]).double()
    d = deltas.reshape(-1).double()
    if len(d) < 2:
        raise ValueError("the gate needs at least two scored positions to fit")
    gate = Gate(GateConfig(hidden_size=X.shape[1], threshold=threshold, margin=margin, n_ahead=n_ahead))
    mean, scale = X.mean(0), X.std(0).clamp_min(1e-6)
    Z = (X - mean) / scale
    y = (d < -margin).double()
    w = (d + margin).abs()
    w = w / w.mean().clamp_min(1e-12)
    weight = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = Z @ weight + bias
        loss = (w * nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).mean() + l2 * weight.pow(
            2
        ).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        gate.mean.copy_(mean.float())
        gate.scale.copy_(scale.float())
        gate.linear.weight[0].copy_(weight.detach().float())
        gate.linear.bias.copy_(bias.detach().float())
    return gate


def outcome(gate: Gate, states: torch.Tensor, deltas: torch.Tensor, threshold: float | None = None) -> dict:
    """How a gate does on scored positions: how often it fires, the mean loss change it keeps per position (the
    change where it fires, 0 elsewhere), against augmenting everywhere and an oracle that fires exactly where
    augmenting lowers the loss."""
    fire = gate.fires(states, threshold).reshape(-1)
    d = deltas.reshape(-1).double()
    kept, oracle = (d * fire).mean().item(), d.clamp(max=0).mean().item()
    return {
        "positions": len(d),
        "fire_rate": fire.double().mean().item(),
        "loss_change_gated": kept,
        "loss_change_always": d.mean().item(),
        "loss_change_oracle": oracle,
        "helped_share": (d < 0).double().mean().item(),
        "precision": (d[fire] < 0).double().mean().item() if fire.any() else float("nan"),
    }
