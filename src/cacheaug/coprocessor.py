"""The coprocessor: a trainable copy of the decoder's backbone that reads its kv-cache and writes latents.

Input: the frozen decoder's per-layer K/V of a prefix, used directly as the coprocessor's past key/values,
plus N_L trainable soft tokens. Output: N_L latent embeddings in one forward pass (paper section 2.1).
Choices the paper leaves open:

* read-out = the backbone's final hidden state (after its final norm) at the soft-token positions, times
  one learned scalar, initialised so that the latents start with the RMS of the soft tokens, which are
  real (scaled) input embeddings;
* soft tokens are initialised from the input embeddings of ``n_latents`` random vocabulary entries;
* the backbone never sees token ids, so it has no embedding matrix and no LM head (nothing duplicated).

Options (:class:`~cacheaug.config.CoprocessorConfig`): ``readout="pre_norm"`` drops the backbone's final norm;
``echo_residual`` adds token p's input embedding to every latent and starts the scale at 0.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn
from transformers import DynamicCache

from .arms import Arm, get_arm, register_arm
from .config import CoprocessorConfig
from .families import Family

_SCRATCH_SEED = 0x5EED  # offset so a scratch coprocessor never replays the RNG stream that built its decoder


def _embedding_name(decoder: nn.Module) -> str:
    emb = decoder.get_input_embeddings()
    for name, child in decoder.named_children():
        if child is emb:
            return name
    raise ValueError(f"Cannot find the input embedding among the children of {type(decoder).__name__}.")


def _no_embedding_copy(decoder: nn.Module, share_tensors: bool) -> nn.Module:
    emb = decoder.get_input_embeddings()
    memo = {id(emb): None}  # the copy gets no embedding at all
    if share_tensors:  # one copy of the weights in memory: the module tree is new, the tensors are the decoder's
        memo.update({id(t): t for t in itertools.chain(decoder.parameters(), decoder.buffers())})
    return copy.deepcopy(decoder, memo)


def copy_backbone(decoder: nn.Module, config: CoprocessorConfig) -> nn.Module:
    """The ``copy`` arm: a deep copy of the decoder (without its embedding matrix), every weight trainable. The
    decoder itself is never modified."""
    return _no_embedding_copy(decoder, share_tensors=False).requires_grad_(True)


def scratch_backbone(decoder: nn.Module, config: CoprocessorConfig) -> nn.Module:
    """The ``scratch`` arm: a freshly initialised model from the decoder's config (seeded by ``init_seed``)."""
    weight = next(decoder.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SCRATCH_SEED + config.init_seed)
        backbone = type(decoder)._from_config(copy.deepcopy(decoder.config))
    setattr(backbone, _embedding_name(decoder), None)
    return backbone.to(device=weight.device, dtype=weight.dtype).requires_grad_(True)


def lora_backbone(decoder: nn.Module, config: CoprocessorConfig) -> nn.Module:
    """The ``lora`` arm: the decoder's module tree over its own (frozen, shared) tensors, with PEFT LoRA layers of
    rank ``lora_rank`` injected into every linear layer; only the adapters train."""
    return inject_lora(_no_embedding_copy(decoder, share_tensors=True), config, next(decoder.parameters()))


def inject_lora(module: nn.Module, config: CoprocessorConfig, like: torch.Tensor, targets=None) -> nn.Module:
    """PEFT LoRA adapters (rank ``config.lora_rank``, seeded by ``init_seed``) on ``targets`` (default: every linear
    layer's name in ``module``), cast to ``like``'s device and dtype; everything but the adapters is frozen. Used by
    the ``lora`` arm and the LoRA-decoder control."""
    from peft import LoraConfig, inject_adapter_in_model

    if targets is None:
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, lora_dropout=0.0, target_modules=targets
    )
    with torch.random.fork_rng(devices=[like.device] if like.is_cuda else []):
        torch.manual_seed(config.init_seed)
        module = inject_adapter_in_model(lora, module)
    for name, p in module.named_parameters():
        if "lora_" in name:  # cast only the adapters: the shared tensors belong to the decoder
            p.data = p.data.to(device=like.device, dtype=like.dtype)
        p.requires_grad_("lora_" in name)
    return module


class Coprocessor(nn.Module):
    """Trainable module that maps a decoder kv-cache to ``n_latents`` latent embeddings.

    Args:
        base: the frozen causal LM whose architecture (and, for ``copy``/``lora``, weights) it reuses.
        config: the :class:`CoprocessorConfig`.
        family: the resolved :class:`~cacheaug.families.Family` of ``base``.
        init_scale: calibrate the read-out scale with one small forward pass (skipped when loading).
    """

    def __init__(self, base: nn.Module, config: CoprocessorConfig, family: Family, init_scale: bool = True):
        super().__init__()
        self.config = config
        self.family = family
        decoder = base.get_decoder()
        # an arm without a backbone ("pause", the control of Goyal et al. 2023): trainable context-free embeddings
        arm = get_arm(config.init)
        self.backbone = arm.backbone(decoder, config) if arm.backbone is not None else None
        if self.backbone is not None and config.readout == "pre_norm":
            self.backbone.norm = nn.Identity()  # the copy's final norm (every supported family names it `norm`)
        emb = base.get_input_embeddings()
        g = torch.Generator().manual_seed(config.init_seed)
        ids = torch.randint(emb.weight.shape[0], (config.n_latents,), generator=g).to(emb.weight.device)
        with torch.no_grad():
            soft = emb(ids)  # [N_L, D], already scaled like real inputs (Gemma multiplies by sqrt(D))
        self.soft_tokens = nn.Parameter(soft.detach().clone())
        self.latent_scale = nn.Parameter(
            torch.ones(1, dtype=soft.dtype, device=soft.device)
        )  # [1]: FSDP2 shards no scalars
        if config.echo_residual:  # latents start as copies of token p: the read-out's share grows from 0
            self.latent_scale.data.zero_()
        elif init_scale and self.backbone is not None:
            self._calibrate_scale()

    @torch.no_grad()
    def _calibrate_scale(self) -> None:
        h = self.backbone(inputs_embeds=self.soft_tokens[None], use_cache=False).last_hidden_state[0]
        rms = lambda x: x.float().pow(2).mean().sqrt()  # noqa: E731
        self.latent_scale.fill_((rms(self.soft_tokens) / rms(h).clamp_min(1e-6)).item())

    def forward(
        self,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        n_traces: int = 1,
        position_ids: torch.Tensor | None = None,
        attention_mask=None,
        echo: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents ``[B, K*N_L, D]`` for ``n_traces`` blocks of soft tokens read against ``prefix_kv``.

        ``prefix_kv`` holds one ``(keys, values)`` pair ``[B, H_kv, S, D_h]`` per layer (None: the masks carry the
        keys, cacheaug.windows). With ``position_ids``/``attention_mask`` left None (one trace, inference) the
        backbone uses its own default positions (S, S+1, ...) and causal mask, so the latents sit right after the
        prefix.
        ``echo`` ``[B, K, D]``: the input embedding of each trace's token p, required with ``echo_residual``.
        """
        x = self.soft_tokens.repeat(n_traces, 1).expand(batch_size, -1, -1)  # [B, K*N_L, D]
        if self.backbone is None:  # pause tokens: the same embeddings whatever the context
            return self._add_echo(x * self.latent_scale, echo, n_traces)
        if torch.is_autocast_enabled(x.device.type):  # fp32 master weights: compute like the decoder's K/V
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # a fresh cache object (kv.from_layers): the decoder's cache stays intact. None: the keys come with the masks
        cache = (
            {}
            if prefix_kv is None
            else {"use_cache": True, self.family.cache_kwarg: DynamicCache(ddp_cache_data=prefix_kv)}
        )
        out = self.backbone(
            inputs_embeds=x,
            position_ids=position_ids,
            attention_mask=attention_mask,
            **({"use_cache": False} | cache),
        )
        return self._add_echo(out.last_hidden_state * self.latent_scale, echo, n_traces)  # [B, K*N_L, D]

    def _add_echo(self, latents: torch.Tensor, echo: torch.Tensor | None, n_traces: int) -> torch.Tensor:
        if not self.config.echo_residual:
            return latents
        if echo is None or echo.shape[:2] != (latents.shape[0], n_traces):
            raise ValueError(
                "echo_residual needs the input embedding of each trace's last token ([B, K, D]); at "
                "inference pass `last_token` to compute_latents."
            )
        n_latents = self.config.n_latents
        return latents + echo[:, :, None].expand(-1, -1, n_latents, -1).reshape(latents.shape).to(latents.dtype)


# the built-in arms whose backbones live here (the registry in arms.py knows no implementation)
register_arm(Arm("copy", "a trainable copy of the decoder (the paper's default)", backbone=copy_backbone))
register_arm(
    Arm(
        "lora",
        "rank-r LoRA adapters over the decoder's frozen weights (shared in memory)",
        backbone=lora_backbone,
        shards=False,
    )
)
register_arm(Arm("scratch", "a random init of the decoder's architecture", backbone=scratch_backbone))
register_arm(Arm("pause", "control: N_L trainable context-free embeddings (pause tokens), no backbone"))
