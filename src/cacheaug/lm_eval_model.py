"""lm-evaluation-harness backend ``cacheaug``: the coprocessor runs once at the end of each context.

    lm_eval --model cacheaug --model_args pretrained=gemma-3-270m,coprocessor=ckpt/ \\
        --include_path $(cacheaug eval tasks) --tasks cacheaug_arc_easy,cacheaug_gsm8k_bpb

``coprocessor`` may be any cacheaug checkpoint: a coprocessor (latents are inserted between context and
continuation, as in the paper's benchmarks), the pause-token control (its context-free embeddings are
inserted the same way) or the LoRA-decoder control (the adapted decoder scores directly). Without one, or
with ``augment=False``, the frozen model itself is scored, so base and augmented numbers come from the same
code. Requests sharing a context (multiple choice) run the context and the coprocessor once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import kv
from .base import load_base_model
from .families import cache_kwarg
from .model import CacheAugmentedLM


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("cacheaug")
class CacheAugEvalLM(HFLM):
    """lm-eval's ``HFLM`` for a frozen decoder with a cacheaug coprocessor.

    Args (``--model_args``): ``pretrained`` (default ``gemma-3-270m``: the offline registry model; or an HF id /
    folder), ``coprocessor`` (a checkpoint folder), ``augment`` (default true), ``gate`` (default: the checkpoint's
    gate decides at each context's end when it has one; false: always augment), ``device``, ``dtype``
    (``float32``/``bfloat16``), ``max_length``. From Python, ``base=`` and ``tokenizer=`` take loaded objects.

    ``self.model`` is the frozen base model (HFLM's convention), ``self.augmented`` the
    :class:`CacheAugmentedLM` (None without a coprocessor). HFLM batches padded contexts through one forward;
    the coprocessor must run at the end of each context (its insertion point), so ``_loglikelihood_tokens`` is
    replaced: requests are grouped by context, and each context runs its prefill and the coprocessor once.
    """

    def __init__(
        self,
        pretrained: str = "gemma-3-270m",
        coprocessor: str | None = None,
        augment=True,
        gate=None,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        batch_size: int | str = 1,
        base=None,
        tokenizer=None,
        **kwargs,
    ):
        if base is None:
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(
                    f"device={device!r} but this machine has no CUDA GPU: pass --device cpu "
                    "(cacheaug eval harness picks the device the machine has when --device is not given)."
                )
            torch_dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype), None)
            if dtype not in (None, "auto") and not isinstance(torch_dtype, torch.dtype):
                raise ValueError(f"dtype={dtype!r} is not a torch dtype: use float32, bfloat16, float16 or auto.")
            base, tokenizer = load_base_model(pretrained, device=device, dtype=torch_dtype)
        if tokenizer is None:
            raise ValueError("CacheAugEvalLM(base=...) needs the base model's tokenizer too: pass tokenizer=...")
        max_length = int(max_length or min(getattr(base.config, "max_position_embeddings", 2048), 8192))
        # contexts run one at a time (the coprocessor runs at each context's end); `batch_size` sets how many
        # continuations of one context are scored in one batched pass ("auto": all of them)
        self.continuation_batch = None if str(batch_size).startswith("auto") else int(batch_size)
        if self.continuation_batch is not None and self.continuation_batch < 1:
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        kwargs.pop("max_batch_size", None)  # only for HFLM's "auto" search, which contexts run one at a time skip
        super().__init__(
            pretrained=base, tokenizer=tokenizer, max_length=max_length, batch_size=1, add_bos_token=True, **kwargs
        )
        self.augmented = CacheAugmentedLM.from_pretrained(coprocessor, base=base) if coprocessor else None
        self.augment = _flag(augment) and self.augmented is not None
        self.kind = self.augmented.config.init if self.augmented is not None else "frozen"
        self.latents = self.augment and self.augmented.arm.has_latents
        self.n_latents = self.augmented.config.n_inserted if self.latents else 0
        self.use_gate = None if gate is None or str(gate).lower() in ("", "none", "auto") else _flag(gate)
        if self.latents:
            self.augmented.gated(self.use_gate)  # gate=true without a gate: the error says how to fit one
        self.cache_kw = cache_kwarg(base)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """lm-eval passes ``batch_size``/``device`` from its command line beside ``--model_args``: the values in
        ``--model_args`` win instead of clashing."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def base(self):
        """The frozen decoder (HFLM's ``model``)."""
        return self.model

    # --------------------------------------------------------------------------------- lm-eval interface
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # an empty context is conditioned on <bos>, as Gemma needs
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens)[
            "input_ids"
        ]

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _scorer(self):
        """The causal LM that scores continuation tokens: the adapted decoder for the LoRA control, else the base."""
        return self.augmented.scoring_lm if self.augment else self.base

    @torch.no_grad()
    def _prefill(self, context: list[int]):
        """Cache, next-token logits and the next token's rotary position after the context (+ latents when
        augmenting)."""
        ids = torch.tensor([context], device=self.device)
        if self.latents:
            aug = self.augmented.augment(ids, use_gate=self.use_gate)  # where the gate says no: the frozen model's
            return aug.cache, aug.logits, aug.next_position
        cache = DynamicCache()
        out = self._scorer()(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        return cache, out.logits[:, -1], len(context)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        by_context: dict[tuple, list[int]] = {}
        for i, (_, ctx, _cont) in enumerate(requests):
            by_context.setdefault(tuple(ctx), []).append(i)
        results: list = [None] * len(requests)
        scorer = self._scorer()
        for ctx, idxs in tqdm(by_context.items(), desc="cacheaug loglikelihood", disable=disable_tqdm):
            longest = max(len(requests[i][2]) for i in idxs)
            keep = self.max_length - longest - self.n_latents
            if keep < 1:
                raise ValueError(f"A continuation of {longest} tokens does not fit max_length={self.max_length}.")
            context = list(ctx)[-keep:]
            cache, first, position = self._prefill(context)
            first_lp = F.log_softmax(first[0].float(), -1)  # [V]: predicts every continuation's first token
            step = self.continuation_batch or len(idxs)
            for start in range(0, len(idxs), step):
                chunk = idxs[start : start + step]
                conts = [requests[i][2] for i in chunk]
                rest = max(len(c) for c in conts) - 1
                if rest > 0:  # continuations right-padded (causal: padding never reaches a real token's logits)
                    pad = [c[:-1] + [c[0]] * (rest - len(c) + 1) for c in conts]
                    n = len(chunk)
                    c = kv.expand(cache, n)
                    pos = torch.arange(position, position + rest, device=self.device)[None].expand(n, -1)
                    out = scorer(
                        input_ids=torch.tensor(pad, device=self.device),
                        position_ids=pos,
                        use_cache=True,
                        **{self.cache_kw: c},
                    )
                    later = F.log_softmax(out.logits.float(), dim=-1)  # [n, rest, V]
                for j, (i, cont) in enumerate(zip(chunk, conts)):
                    logprobs = (
                        first_lp[None] if len(cont) == 1 else torch.cat([first_lp[None], later[j, : len(cont) - 1]])
                    )
                    target = torch.tensor(cont, device=self.device)
                    results[i] = (
                        logprobs.gather(1, target[:, None]).sum().item(),
                        bool((logprobs.argmax(-1) == target).all()),
                    )
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Whole-document log-likelihood by the scoring model (no latents: there is no single context end)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        scorer = self._scorer()
        for (string,) in tqdm([r.args for r in requests], desc="cacheaug rolling", disable=disable_tqdm):
            total = 0.0
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            for ctx, cont in windows:
                ids = torch.tensor([ctx + cont], device=self.device)
                logp = F.log_softmax(scorer(input_ids=ids).logits[0, -len(cont) - 1 : -1].float(), -1)
                total += logp.gather(1, torch.tensor(cont, device=self.device)[:, None]).sum().item()
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="cacheaug generate", disable=disable_tqdm):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else until
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = torch.tensor(
                [self.tok_encode(context)[-(self.max_length - max_new - self.n_latents) :]], device=self.device
            )
            if self.augmented is not None:
                gate = {"use_gate": self.use_gate} if self.latents else {}
                gen = self.augmented.generate(ids, max_new, augment=self.augment, **gate)
            else:
                gen = self.base.generate(ids, max_new_tokens=max_new, do_sample=False)
            text = self.tok_decode(gen[0, ids.shape[1] :].tolist())
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
