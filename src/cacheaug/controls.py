"""Controls that must be trained on the same data and budget as the coprocessor (docs/results.md).

* pause tokens: ``CoprocessorConfig(init="pause")``, N_L context-free trainable embeddings through the same
  insertion path as the latents (coprocessor.py);
* a LoRA-tuned decoder: :class:`LoraDecoderLM` below. No latents: rank-r adapters on the decoder itself,
  trained on the same target tokens (offsets 1..N_A after the same insertion points) with the same loss.
  Its per-offset losses therefore compare one-to-one with the coprocessor's.

The adapters live on a copy of the decoder's module tree whose parameters and buffers are the decoder's own
tensors (no second copy of the weights); the decoder's modules are not touched.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn

from .arms import Arm, register_arm
from .coprocessor import inject_lora
from .model import CacheAugmentedLM, build_model  # noqa: F401  (re-exported)


class LoraDecoderLM(CacheAugmentedLM):
    """The LoRA-tuned-decoder control with :class:`CacheAugmentedLM`'s interface (forward, generate, save).

    ``self.coprocessor`` holds the adapted copy of the whole causal LM, so training, checkpoints and
    evaluation code work unchanged. ``augment`` does not apply (there are no latents).
    """

    def _build_trainable(self, calibrate: bool) -> nn.Module:
        base = self.base
        shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
        adapted = copy.deepcopy(base, shared)
        # the decoder's linear layers by name (q_proj, ..., down_proj); the LM head is not among them
        targets = sorted(
            {n.rsplit(".", 1)[-1] for n, m in adapted.get_decoder().named_modules() if isinstance(m, nn.Linear)}
        )
        return inject_lora(adapted, self.config, base.get_input_embeddings().weight, targets)

    @property
    def scoring_lm(self) -> nn.Module:
        """The adapted decoder scores text (lm-eval, perplexity)."""
        return self.coprocessor

    def forward(self, input_ids, positions=None, *, return_base_losses: bool = False, generator=None):
        ids = self._check_ids(input_ids, "input_ids")
        positions, _ = self._positions(positions, ids.shape[0], ids.shape[1], generator)  # [B, K]
        return self._run_pass(ids, positions, return_base_losses)

    def _target_states(self, ids: torch.Tensor, positions: torch.Tensor, with_base: bool, groups: int = 1):
        # one pass over the text serves every trace: trace groups (the insertion points' sampling) change nothing here
        B, T = ids.shape
        K, N_A = positions.shape[1], self.config.n_ahead
        offsets = torch.arange(1, N_A + 1, device=ids.device)
        rows = (positions[:, :, None] + offsets - 1).view(B, -1)  # token p+o-1 predicts p+o
        targets = ids.gather(1, rows + 1).view(B, K, N_A)

        def states_of(decoder) -> torch.Tensor:
            h = decoder(input_ids=ids).last_hidden_state  # [B, T, D]
            return h.gather(1, rows[:, :, None].expand(-1, -1, h.shape[-1])).view(B, K, N_A, h.shape[-1])

        h = states_of(self.coprocessor.get_decoder())
        h_base = None
        if with_base:
            with torch.no_grad():
                h_base = states_of(self.base.get_decoder())
        return h, None, h_base, targets

    def augment(self, prompt_ids, past_key_values=None):
        raise TypeError("The LoRA-decoder control inserts no latents; use generate() or forward().")

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int = 32, *, augment: bool = True, **kwargs):
        """With ``augment=True`` the adapted decoder generates; with ``augment=False`` the frozen one."""
        ids = self._check_ids(prompt_ids, "prompt_ids")
        model = self.coprocessor if augment and self.enabled else self.base
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "generator"}
        return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=kwargs.pop("do_sample", False), **kwargs)


register_arm(
    Arm(
        "lora-decoder",
        "control: LoRA adapters on the decoder itself, no latents",
        model_class=LoraDecoderLM,
        has_latents=False,
        shards=False,
    )
)
