"""A frozen causal LM augmented by a trainable kv-cache coprocessor (arXiv 2412.17747).

Notable choices (where the paper is silent):

* Positions (default, ``position_scheme="shifted"``): after an insertion after token p the latents sit at
  p+1..p+N_L and the following real tokens continue at p+N_L+1.. . This is what plain HF decoding from the
  augmented cache does, so inference needs no position tricks and ``augment(...).cache`` is an ordinary
  ``DynamicCache``. The other schemes ("shared", "overlap") let the text keep its own positions; decoding then
  passes explicit ``position_ids`` (:meth:`CacheAugmentedLM.decode`, ``AugmentOutput.next_position``), and the
  masks still follow the order of the cache entries (as HF's own masks do).
* Loss: offset o = 1..N_A is the frozen decoder's cross-entropy on token p+o; the last latent predicts
  offset 1, ahead token p+o-1 (fed as input) predicts offset o. Only those rows go through the LM head.
* Training runs three passes: the frozen decoder over the text (no grad) gives
  the prefix K/V; the coprocessor reads it for all K traces at once; the frozen decoder reads
  ``[latents_k ; ahead tokens_k]`` for all K traces at once against the same prefix K/V. Masks: masks.py.
* Caches are built without a config, so sliding-window layers keep every token and the sliding window
  is applied by the mask (exactly equal to the model's own incremental decoding).
* Speed, same results: the prefix pass runs in two chunks with sdpa on sliding-window models (the first window
  unmasked, so sdpa's causal kernel skips the masked half); ``trace_groups`` > 1 (cacheaug.speed) draws the
  insertion points stratified and runs each group's passes against only the text keys it can see.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import DynamicCache

from . import windows
from .arms import Arm, get_arm
from .config import CoprocessorConfig
from .coprocessor import Coprocessor
from .families import resolve_family
from .inference import AugmentOutput, Inference
from .masks import groups_fitting, stratified_positions
from .training_pass import LOSS_CHUNK_ROWS, CacheAugmentedOutput, TrainingPass

__all__ = ["AugmentOutput", "CacheAugmentedLM", "CacheAugmentedOutput", "LOSS_CHUNK_ROWS", "build_model"]


class CacheAugmentedLM(TrainingPass, Inference, nn.Module):
    """Wraps an unmodified Hugging Face causal LM with a trainable kv-cache coprocessor.

    The base model's weights are frozen (``requires_grad=False``) and it is kept in eval mode; nothing else
    about it changes. Generation with ``augment=False``, with ``enabled = False`` or with a failing
    coprocessor is exactly the base model's.

    Args:
        base: a causal LM of a supported family (Gemma-2/3, Llama, Mistral, Qwen-2/3) loaded with
            attn_implementation ``sdpa``, ``eager`` or ``flex_attention``.
        config: the :class:`CoprocessorConfig` (defaults: N_L = N_A = K = 16, full-copy init).
        check_finite: raise on a non-finite training loss (costs one host sync per forward).

    >>> model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=16))      # doctest: +SKIP
    >>> out = model(input_ids); out.loss.backward()                          # doctest: +SKIP
    >>> ids = model.generate(prompt_ids, max_new_tokens=64)                  # doctest: +SKIP
    """

    tokenizer = None  # the base's tokenizer when from_pretrained loaded the base itself

    def __init__(
        self,
        base: nn.Module,
        config: CoprocessorConfig | None = None,
        *,
        check_finite: bool = True,
        _calibrate: bool = True,
        _with_coprocessor: bool = True,
    ):
        super().__init__()
        if not isinstance(base, nn.Module) or not hasattr(base, "get_decoder"):
            raise TypeError(f"`base` must be a Hugging Face causal LM (PreTrainedModel), got {type(base).__name__}.")
        self.family = resolve_family(base)
        self.config = config if config is not None else CoprocessorConfig()
        base.requires_grad_(False)
        base.eval()
        self.base = base
        self.coprocessor = self._build_trainable(_calibrate) if _with_coprocessor else None
        self.enabled = True
        self.check_finite = check_finite
        self.recompute_loss = True  # recompute each loss chunk's logits in backward (memory); False keeps them (speed)
        self.trace_groups = 1  # > 1: stratified insertion points, each group's passes read only its text (speed)
        self.trace_chunk = 0  # > 0: the trace passes run C traces per row against a copy of the text keys (speed)
        self._trace_windows = False  # one trace per row, each layer reading only the keys it can see (speed)
        self._trace_kernel = False  # trace windows through cacheaug's kernel: text keys read in place (speed)
        self.compile_block_masks = False  # FlexAttention block masks built by a compiled create_block_mask (speed)
        self._compiled_pass = None
        self._compile_mode = None
        self.gate = None  # a fitted cacheaug.gate.Gate (loaded with its checkpoint): augment only where it fires
        self.gate_threshold: float | None = None  # None: the gate's own threshold

    @classmethod
    def frozen(cls, base: nn.Module) -> "CacheAugmentedLM":
        """The frozen decoder alone: no coprocessor (``coprocessor is None``, ``enabled`` always False).

        Decoding and :meth:`generate` are exactly the base model's; ``augment``, computing latents, the training
        pass and saving refuse with a clear error. ``cacheaug serve`` without ``--coprocessor`` runs this."""
        return cls(base, CoprocessorConfig(), _calibrate=False, _with_coprocessor=False)

    @property
    def enabled(self) -> bool:
        """Whether augmentation runs (set False to decode the frozen model alone; always False without a
        coprocessor)."""
        return self._enabled and self.coprocessor is not None

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._enabled = bool(on)

    def _require_coprocessor(self, what: str) -> None:
        if self.coprocessor is None:
            raise ValueError(
                f"{what} needs a coprocessor, and this model is the frozen decoder alone (CacheAugmentedLM.frozen); "
                "load one with CacheAugmentedLM.from_pretrained(CHECKPOINT, base) or build one with build_model"
            )

    @property
    def trace_windows(self) -> bool:
        """Speed option (cacheaug.windows): the trace passes run one trace per row, each layer reading only the text
        keys the trace can see. Setting it True checks the family and installs the attention function."""
        return self._trace_windows

    @trace_windows.setter
    def trace_windows(self, on: bool) -> None:
        if on:
            windows.check_family(self.family)
            windows.install()
        self._trace_windows = bool(on)

    @property
    def trace_kernel(self) -> bool:
        """Speed option (cacheaug.prefix_attention): trace windows whose attention reads the text keys in place (no
        per-row copies), skips the text tiles a row cannot see and computes no gradient for the text keys. Setting it
        True turns on ``trace_windows`` too. Triton kernels on CUDA; a torch reference elsewhere (same results)."""
        return self._trace_kernel and self._trace_windows

    @trace_kernel.setter
    def trace_kernel(self, on: bool) -> None:
        if on:
            self.trace_windows = True
        self._trace_kernel = bool(on)

    def compile_training(self, **compile_kwargs) -> "CacheAugmentedLM":
        """``torch.compile`` the training pass (all three passes and the loss, forward and backward) as one graph.

        Input checks and position sampling stay eager, so the compiled region has no host sync and no graph
        break; a fixed batch shape compiles once (``dynamic=False`` by default). Results equal the eager pass
        up to rounding. Only gradient-enabled calls use it (evaluation under ``no_grad`` stays eager). Keyword
        arguments go to ``torch.compile``; ``mode="reduce-overhead"`` also replays the step as CUDA graphs (the
        step's outputs are then overwritten by the next step: read them before calling again).
        """
        compile_kwargs.setdefault("dynamic", False)
        self._compile_mode = compile_kwargs.get("mode")
        self._compiled_pass = torch.compile(self._train_pass, **compile_kwargs)
        return self

    def _build_trainable(self, calibrate: bool) -> nn.Module:
        wants = self.arm.model_class or CacheAugmentedLM
        if not isinstance(self, wants):
            raise ValueError(
                f"init={self.config.init!r} is built by {wants.__module__}.{wants.__name__}: use it (or "
                "cacheaug.build_model, which picks the class from the arm)."
            )
        return Coprocessor(self.base, self.config, self.family, init_scale=calibrate)

    @property
    def arm(self) -> Arm:
        """The registry entry of ``config.init`` (cacheaug.arms)."""
        return get_arm(self.config.init)

    @property
    def scoring_lm(self) -> nn.Module:
        """The causal LM that scores text after the cache (the frozen decoder; the LoRA-decoder control: its adapted
        copy)."""
        return self.base

    # ------------------------------------------------------------------ housekeeping
    def train(self, mode: bool = True) -> "CacheAugmentedLM":
        super().train(mode)
        self.base.eval()  # the decoder is frozen: never dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The coprocessor's trainable parameters (including the soft tokens and the read-out scale)."""
        self._require_coprocessor("training")
        return [p for p in self.coprocessor.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors of the trainable parameters. Under FSDP2 this gathers shards: call it on every rank."""
        self._require_coprocessor("saving")
        out = {}
        for name, p in self.coprocessor.named_parameters():
            if p.requires_grad:
                t = p.detach()
                out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
        return out

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    def cache_kwargs(self, cache: DynamicCache) -> dict:
        """Keyword arguments that make a call of the base model (or its decoder) read and extend ``cache``: the
        family's own name for the cache argument, and ``use_cache``."""
        return {self.family.cache_kwarg: cache, "use_cache": True}

    # ------------------------------------------------------------------ input checks
    def _check_ids(self, input_ids: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"`{what}` must be a LongTensor of token ids [batch, length], got {type(input_ids).__name__}."
            )
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"`{what}` must be an integer tensor [batch, length], got shape {tuple(input_ids.shape)} "
                f"and dtype {input_ids.dtype}."
            )
        if input_ids.device != self.device:
            raise ValueError(
                f"`{what}` is on {input_ids.device} but the model is on {self.device}; move it with .to({str(self.device)!r})."
            )
        if input_ids.shape[1] == 0:
            raise ValueError(f"`{what}` is empty: at least one token is needed.")
        return input_ids.long()

    def _check_context(self, last_position: int, what: str) -> None:
        limit = self.family.max_positions
        if limit is not None and last_position >= limit:
            raise ValueError(
                f"{what} needs position {last_position}, beyond the model's context of {limit} positions "
                f"(max_position_embeddings); the {self.config.n_latents} latents take positions too. Shorten the input."
            )

    def _check_dtypes(self) -> None:
        self._require_coprocessor("augmenting or the training pass")
        cop = getattr(self.coprocessor, "soft_tokens", None)
        if cop is None:  # the LoRA-decoder control: no latents to check
            return
        dec = self.base.get_input_embeddings().weight
        if cop.device != dec.device:
            raise ValueError(
                f"The coprocessor is on {cop.device} but the decoder on {dec.device}; call model.to(device)."
            )
        if cop.dtype != dec.dtype and not torch.is_autocast_enabled(dec.device.type):
            raise ValueError(
                f"The coprocessor is {cop.dtype} but the decoder {dec.dtype}. Either run under "
                f"torch.autocast({dec.device.type!r}, dtype={dec.dtype}) (fp32 master weights), or cast the "
                f"coprocessor with model.coprocessor.to({dec.dtype})."
            )

    def _positions(self, positions, batch: int, length: int, generator: torch.Generator | None):
        """Checked insertion points ``[B, K]`` on the model's device and the trace-group count the pass can use
        with them (``self.trace_groups`` if they are stratified accordingly, else 1)."""
        n_ahead = self.config.n_ahead
        n_valid = length - n_ahead  # p in [0, T-1-N_A]: every trace has N_A target tokens
        if positions is None:
            k = self.config.n_traces
            if n_valid < k:
                raise ValueError(
                    f"Sequences of {length} tokens are too short for n_traces={k} insertion points with "
                    f"n_ahead={n_ahead} target tokens each: need at least {k + n_ahead} tokens. "
                    "Use longer sequences, fewer traces or fewer ahead tokens."
                )
            positions = stratified_positions(batch, n_valid, k, self.trace_groups, generator)  # [B, K] distinct, sorted
            return positions.to(self.device), self.trace_groups
        positions = torch.as_tensor(positions)  # checked where it lives: CPU positions cost no device sync
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"`positions` must be integer insertion points, got dtype {positions.dtype}.")
        if positions.dim() == 1:
            positions = positions[None].expand(batch, -1)
        if positions.dim() != 2 or positions.shape[0] != batch or positions.shape[1] == 0:
            raise ValueError(
                f"`positions` must have shape [K] or [batch={batch}, K] with K >= 1, got {tuple(positions.shape)}."
            )
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi > n_valid - 1:
            raise ValueError(
                f"Insertion points must lie in [0, T-1-n_ahead] = [0, {n_valid - 1}] so that each trace has "
                f"n_ahead={n_ahead} target tokens in a sequence of T={length}; got values in [{lo}, {hi}]."
            )
        groups = groups_fitting(positions, length, n_ahead, self.trace_groups)
        return positions.long().contiguous().to(self.device, non_blocking=True), groups

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``coprocessor_config.json`` and ``model.safetensors`` (trainable weights only) to ``path``.

        ``tensors``: an already gathered :meth:`trainable_state_dict` (sharded training gathers on every rank
        and writes on one)."""
        from .checkpoint import save_coprocessor

        self._require_coprocessor("save_pretrained")
        return save_coprocessor(self, path, tensors)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: nn.Module | None = None,
        *,
        check_base: bool = True,
        check_finite: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "CacheAugmentedLM":
        """Load a coprocessor saved by :meth:`save_pretrained` (a folder, a training run's folder or a shipped
        coprocessor's short name such as ``"gemma-3-270m-skills"``) onto ``base``.

        The base model must be the one it was trained with (compared by a fingerprint of its weights);
        ``check_base=False`` skips that check. Without ``base``, the base model the checkpoint records is loaded
        (:func:`cacheaug.load_base_model` with ``device`` and ``dtype``) and its tokenizer is kept at
        ``model.tokenizer``.
        """
        from .checkpoint import load_coprocessor, recorded_base

        tokenizer = None
        if base is None:
            from .base import load_base_model

            base, tokenizer = load_base_model(recorded_base(path), device=device, dtype=dtype)
        elif device is not None or dtype is not None:
            raise ValueError("device and dtype choose how the recorded base model loads: move a given base yourself")
        model = load_coprocessor(cls, path, base, check_base=check_base, check_finite=check_finite)
        model.tokenizer = tokenizer
        return model


def build_model(base, config, **kwargs):
    """The model for ``config.init``'s arm (a coprocessor, pause tokens, the LoRA-decoder control, ...)."""
    return (get_arm(config.init).model_class or CacheAugmentedLM)(base, config, **kwargs)
