"""``cacheaug adapt``: fine-tune the decoder on a corpus first, so that a coprocessor trained after it is measured
on text its decoder already models ("adapt, then augment").

A coprocessor trained on a corpus the frozen decoder has never seen gains mostly by adapting the decoder to
that corpus through its cache; a LoRA-tuned decoder does the same better. With a domain corpus, adapt the
decoder first (this module), freeze the result, and train the coprocessor on top of it with the *other* part
of the corpus (``--adapt-pct``: documents split by hash, :class:`cacheaug.data.Splits`)::

    cacheaug adapt --data default --adapt-pct 50 --heldout-sources sotu --out-dir runs/adapted
    cacheaug train --model runs/adapted --data default --adapt-pct 50 --heldout-sources sotu --out-dir runs/copro
    cacheaug eval ppl --model runs/adapted --data default --adapt-pct 50 --heldout-sources sotu --checkpoint ...

``method="lora"`` trains PEFT LoRA adapters on every linear layer of the decoder and merges them into its
weights; ``method="full"`` trains every decoder weight except the (tied) embedding. The result is a plain
Hugging Face folder (``config.json``, ``model.safetensors``, the tokenizer) usable as ``--model`` everywhere.
Checkpoints (trainable tensors, optimizer moments, data position; safetensors) go to ``out_dir/checkpoints``
and a rerun of the same command resumes from the newest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

from . import atomic
from .loop import MetricsLog, ParallelContext, Schedule, StepLoop
from .train import _f, lr_multiplier

STATE = "adapt_state.json"


@dataclass(frozen=True)
class AdaptConfig:
    """Everything ``cacheaug adapt`` needs; every field is an option of the same name."""

    model: str = _f("gemma-3-270m", "the decoder to adapt: 'gemma-3-270m' (offline default) or an HF id / folder")
    data: tuple[str, ...] = _f(("default",), "text sources, as for `cacheaug train`")
    out_dir: str = _f("runs/adapted", "the adapted model (a Hugging Face folder) and its checkpoints")
    method: Literal["lora", "full"] = _f("lora", "LoRA adapters merged into the weights, or a full fine-tune")
    lora_rank: int = _f(64, "LoRA rank (method lora)")
    heldout_pct: float = _f(1.0, "percent of documents held out (by hash); use the same value for train and eval")
    adapt_pct: float = _f(
        50.0,
        "percent of the other documents this adapts on; the coprocessor trains on the rest "
        "(0: adapt on the whole training split)",
    )
    heldout_sources: tuple[str, ...] = _f((), "whole sources kept out (evaluated as unseen)")
    seq_len: int = _f(1024, "tokens per packed sequence")
    batch_size: int = _f(16, "sequences per step")
    max_steps: int = _f(500, "optimizer steps")
    lr: float = _f(3e-4, "peak AdamW learning rate (3e-4 suits LoRA; use about 2e-5 for method full)")
    warmup_steps: int = _f(50, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    grad_clip: float = _f(1.0, "global gradient-norm clip (0 = off)")
    log_every: int = _f(10, "steps between log lines")
    save_every: int = _f(200, "steps between checkpoints (0 = only at the end)")
    device: str | None = _f(None, "cuda / cpu (default: cuda if available)")
    seed: int = _f(0, "seed for the data order and the adapters")
    gradient_checkpointing: bool = _f(
        True,
        "recompute each layer's activations in backward (memory of one layer's "
        "activations instead of all: batch 16 x 1024 fits a 16 GB CPU machine)",
    )

    def __post_init__(self) -> None:
        problems = []
        for name in ("lora_rank", "seq_len", "batch_size", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append("--lr must be positive")
        if not self.data:
            problems.append("--data needs at least one source")
        if problems:
            raise ValueError("Invalid adapt options:\n  " + "\n  ".join(problems))

    def splits(self):
        from .data import Splits

        return Splits(self.heldout_pct, self.adapt_pct, tuple(self.heldout_sources))


def _trainable(model: nn.Module, cfg: AdaptConfig) -> nn.Module:
    """LoRA adapters on every linear layer of the decoder (PEFT), or every decoder weight but the embedding."""
    model.requires_grad_(False)
    if cfg.method == "full":
        emb = model.get_input_embeddings().weight
        for p in model.get_decoder().parameters():
            p.requires_grad_(p is not emb)
        return model
    from peft import LoraConfig, get_peft_model

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.get_decoder().named_modules() if isinstance(m, nn.Linear)})
    torch.manual_seed(cfg.seed)
    return get_peft_model(
        model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0, target_modules=targets)
    )


def _lm_loss(base: nn.Module, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Mean next-token cross-entropy over ``ids`` ``[B, T]``; the vocabulary logits exist ``chunk`` rows at a time
    (recomputed in backward)."""
    head = base.get_output_embeddings()
    h = base.get_decoder()(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, base.config.hidden_size)
    t = ids[:, 1:].reshape(-1)
    cap = getattr(base.config, "final_logit_softcapping", None)

    def ce(hh: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        logits = head(hh).float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return F.cross_entropy(logits, tt, reduction="sum")

    total = sum(
        torch.utils.checkpoint.checkpoint(ce, h[i : i + chunk], t[i : i + chunk], use_reentrant=False)
        for i in range(0, h.shape[0], chunk)
    )
    return total / t.numel()


class Adaptation(StepLoop):
    """``cacheaug adapt`` as parts of the shared loop (:class:`cacheaug.loop.StepLoop`): construction sets up (the
    decoder with its adapters, the adapt split, the optimizer, resume from ``out_dir/checkpoints``); :meth:`step`
    one optimizer step; :meth:`save` a checkpoint; :meth:`export` the adapted decoder as a Hugging Face folder."""

    desc = "adapt"

    def __init__(self, cfg: AdaptConfig, *, base=None, tokenizer=None, progress: bool = True):
        from .base import load_base_model, resolve_device
        from .data import PackedSequences, build_token_files, load_tokens, start_token

        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.par = ParallelContext(0, 1, resolve_device(cfg.device))
        if base is None:
            base, tokenizer = load_base_model(cfg.model, device=self.par.device, for_training=True)
        self.base, self.tokenizer = base, tokenizer
        self.model = _trainable(base, cfg)
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.params:  # fp32 master weights under bf16 autocast
            p.data = p.data.float()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        token_dir = build_token_files(tokenizer, list(cfg.data), cfg.splits())
        split = "adapt" if cfg.adapt_pct > 0 else "train"
        self.data = PackedSequences(load_tokens(token_dir, split), cfg.seq_len, cfg.seed, bos_id=start_token(tokenizer))
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.step_count, self.tokens_seen = 0, 0
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self._resume()
        self.log = MetricsLog(self.out, True, name="adapt_metrics.jsonl", tensorboard=False)

    def _resume(self) -> None:
        cfg = self.cfg
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if (p / STATE).is_file())
        if not done:
            return
        try:
            state = json.loads((done[-1] / STATE).read_text())
            tensors = load_file(str(done[-1] / "adapt_state.safetensors"))
        except Exception as err:
            raise ValueError(
                f"{done[-1]}: the adapt checkpoint is corrupt ({err}); delete it to resume from an earlier one."
            ) from err
        if state["config"]["model"] != cfg.model or state["config"]["method"] != cfg.method:
            raise ValueError(
                f"{done[-1]} adapts {state['config']['model']!r} with {state['config']['method']}, not "
                f"{cfg.model!r} with {cfg.method}: use another --out-dir."
            )
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(tensors[f"w.{n}"])
        self.opt.load_state_dict(
            {
                "state": {
                    i: {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
                    for i in range(len(self.params))
                },
                "param_groups": state["param_groups"],
            }
        )
        self.data.load_state_dict(state["data"])
        self.step_count = state["step"]
        self.tokens_seen = state.get("tokens_seen", self.step_count * self.tokens_per_step)
        print(f"cacheaug: resumed adaptation from {done[-1]} at step {self.step_count}")

    def schedule(self) -> Schedule:
        return Schedule(self.cfg.max_steps, self.cfg.log_every, save_every=self.cfg.save_every)

    def step(self) -> torch.Tensor:
        from .evaluate import autocast_for

        cfg = self.cfg
        self.opt.param_groups[0]["lr"] = cfg.lr * lr_multiplier(self.step_count, cfg)
        self._data_at_step_start = self.data.state_dict()  # an interrupt inside the step rolls back to it
        self._phase = "batches"
        ids, _ = self.data.next_batch(cfg.batch_size)
        with autocast_for(self.base):
            loss = _lm_loss(self.base, ids.to(self.par.device))  # PEFT injected its layers into base
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self._phase = "update"
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        self.tokens_seen += ids.numel()
        self._phase = "between"
        return loss.detach()

    def save(self) -> Path:
        tensors = {f"w.{n}": p.detach().cpu().contiguous() for n, p in zip(self.names, self.params)}
        sd = self.opt.state_dict()
        tensors.update(
            {f"opt.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
        )
        state = {
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            "data": self.data.state_dict(),
            "param_groups": sd["param_groups"],
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.cfg).items()},
        }

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / "adapt_state.safetensors"))
            (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")

        final = atomic.write_dir(self.ckpt_dir / f"step_{self.step_count:06d}", write)
        for old in sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def export(self) -> Path:
        """The adapted decoder as a plain Hugging Face folder in ``out_dir`` (and, for LoRA, its adapters in
        ``out_dir/adapter``)."""
        cfg, out, model = self.cfg, self.out, self.model
        if cfg.gradient_checkpointing:
            self.base.gradient_checkpointing_disable()
        if cfg.method == "lora":  # the adapters alone too (PEFT's format: 60 MB for Gemma 3 270M at rank 64, where the
            # merged model is 540): PeftModel.from_pretrained(base, out / "adapter").merge_and_unload() rebuilds it
            atomic.write_dir(out / "adapter", model.save_pretrained)
        merged = model.merge_and_unload() if cfg.method == "lora" else model
        dtype = merged.get_input_embeddings().weight.dtype
        for p in merged.parameters():
            p.data = p.data.to(dtype)
        merged.requires_grad_(False)
        staged = out / ".model.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        merged.save_pretrained(staged)
        self.tokenizer.save_pretrained(staged)
        atomic.move_into(staged, out)  # config.json last: marks it complete
        staged.rmdir()
        return out


def adapt(cfg: AdaptConfig, *, base=None, tokenizer=None, progress: bool = True) -> Path:
    """Fine-tune ``cfg.model`` on the adapt split of ``cfg.data``; returns the adapted model's folder."""
    run = Adaptation(cfg, base=base, tokenizer=tokenizer, progress=progress)
    run.model.train()
    run.fit()
    out = run.export()
    stopped = f" (step {run.step_count} of {cfg.max_steps})" if run.interrupted else ""
    print(f"cacheaug: adapted decoder{stopped} written to {out} (use it as --model {out})")
    return out
