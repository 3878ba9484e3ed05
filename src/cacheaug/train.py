"""Training recipe: a frozen decoder, a coprocessor, text -> a trained coprocessor checkpoint.

``train(TrainConfig.from_flat(...)) -> Path`` runs :class:`Trainer`: setup (parallel context, model, data, optimizer,
resume), then the loop of :meth:`Trainer.step`, :meth:`Trainer.evaluate` and :meth:`Trainer.save`.
Single device by default; under ``torchrun`` it runs DDP over the coprocessor (the frozen decoder is
replicated and carries no gradient state). Checkpoints are folders ``out_dir/step_000500/`` holding the
coprocessor (``save_pretrained`` format) plus ``trainer_state.safetensors`` (optimizer moments, RNG states)
and ``trainer_state.json`` (step, schedule, data position); a folder is written under a temporary name and
renamed when complete, so an interrupted save never looks like a checkpoint. ``resume=True`` continues
from the newest complete one exactly: same batches, same insertion points, same optimizer state.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import atomic
from .checkpoint import fingerprint, load_trainable, read_config
from .config import _f  # noqa: F401  (adapt's options use it)
from .controls import build_model
from .evaluate import autocast_for, heldout_losses, relative_ppl_change
from .loop import MetricsLog, ParallelContext, Schedule, StepLoop, _barrier
from .masks import stratified_positions
from .model import CacheAugmentedLM
from .speed import allow_recompiles, apply_speed_options, load_compile_cache, save_compile_cache
from .train_config import CheckpointConfig, DataConfig, OptimConfig, SpeedConfig, TrainConfig  # noqa: F401

STATE_JSON, STATE_TENSORS, RUN_CONFIG = "trainer_state.json", "trainer_state.safetensors", "run_config.json"


# ------------------------------------------------------------------------------------------------ helpers
def lr_multiplier(step: int, cfg) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps`` (``cfg``: a TrainConfig, an
    OptimConfig, or any object with those four options, e.g. adapt's config)."""
    return OptimConfig.lr_multiplier(cfg, step)


def insertion_points(
    keys: list[int],
    cfg: TrainConfig,
    ids: torch.Tensor | None = None,
    marker_ids: list[int] | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """``[B, K]`` sorted distinct insertion points per sequence, a function of (seed, sequence key) only: the
    same on any number of ranks and after a resume. With ``marker_ids`` (``--insertion marker``) the points are
    the ends of the marker's occurrences in ``ids`` (a seeded choice of K if there are more; uniform points fill
    up when there are fewer); with ``--insertion answer`` every answer token's point after the marker is a candidate
    too, up to the line's end (``stop_ids``)."""
    from .synth import marker_positions

    rows = []
    n_valid = cfg.seq_len - cfg.n_ahead
    for b, key in enumerate(keys):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + key)
        if marker_ids:
            span = cfg.seq_len if cfg.insertion == "answer" else 0
            rows.append(marker_positions(ids[b], marker_ids, n_valid, cfg.n_traces, g, span, stop_ids))
        else:
            rows.append(stratified_positions(1, n_valid, cfg.n_traces, cfg.trace_groups, g)[0])  # G=1: plain uniform
    return torch.stack(rows)


def shard_coprocessor(model: CacheAugmentedLM, device: torch.device) -> None:
    """FSDP2: shard the coprocessor per decoder layer over all ranks (gradients reduce-scattered in fp32).
    The frozen decoder stays replicated: it holds no gradient or optimizer state, and re-gathering a sharded
    frozen model every micro-batch costs more than its memory."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    backbone = model.coprocessor.backbone
    for layer in backbone.layers if backbone is not None else []:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model.coprocessor, mesh=mesh, mp_policy=policy)


def make_optimizer(model: CacheAugmentedLM, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the coprocessor's trainable tensors: the soft tokens and read-out scale at ``soft_token_lr``, the
    weights at ``lr`` with ``weight_decay``."""
    cfg = getattr(optim, "optim", optim)  # (a whole TrainConfig is accepted too)
    soft, weights = [], []
    for name, p in model.coprocessor.named_parameters():
        if p.requires_grad:
            (soft if name in ("soft_tokens", "latent_scale") else weights).append(p)
    groups = [{"params": soft, "lr": cfg.soft_token_lr, "weight_decay": 0.0}]
    if weights:
        groups.append({"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    fused = model.device.type == "cuda"
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused)


def master_fp32(model: CacheAugmentedLM) -> None:
    """fp32 master copies of the trainable tensors only (LoRA's frozen tensors are the decoder's own)."""
    for p in model.trainable_parameters():
        p.data = p.data.float()


def complete_checkpoints(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("step_*") if p.is_dir() and (p / STATE_JSON).is_file())


def save_checkpoint(
    out_dir: Path,
    step: int,
    model,
    opt,
    data,
    extra: dict,
    keep_last: int,
    *,
    rank: int = 0,
    world: int = 1,
    sharded: bool = False,
) -> Path:
    """Write ``step_XXXXXX`` atomically. Every rank calls it: FSDP2 shards are gathered collectively, and with
    ``sharded`` optimizer states each rank writes its own ``trainer_state.rank<r>.safetensors``."""
    final = Path(out_dir) / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    weights = model.trainable_state_dict()  # collective under FSDP2
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, weights)
    _barrier(world)
    opt_state = opt.state_dict()
    if sharded or rank == 0:
        tensors = {
            f"opt.{i}.{k}": (v.to_local() if hasattr(v, "to_local") else v).detach().cpu().contiguous()
            for i, st in opt_state["state"].items()
            for k, v in st.items()
        }
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / (f"trainer_state.rank{rank}.safetensors" if sharded else STATE_TENSORS)))
    _barrier(world)
    if rank == 0:
        state = {
            "step": step,
            "param_groups": opt_state["param_groups"],
            "data": data.state_dict(),
            "world_size": world,
            "sharded_optimizer": sharded,
            **extra,
        }
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")  # last: marks the folder complete
        atomic.replace_dir(tmp, final)
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)
    return final


def load_trainer_state(path: Path, opt, data, *, rank: int = 0, world: int = 1) -> dict:
    """Optimizer moments, RNG and data position from a checkpoint (the weights go in with load_trainable)."""
    try:
        state = json.loads((path / STATE_JSON).read_text())
        state["step"], state["data"], state["param_groups"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path / STATE_JSON} is corrupt ({type(err).__name__}: {err}); delete {path} to resume "
            "from the checkpoint before it."
        ) from err
    for key, value in [
        ("step", state["step"]),
        ("tokens_seen", state.get("tokens_seen", 0)),
        *((f"data.{k}", v) for k, v in (state["data"] if isinstance(state["data"], dict) else {"": None}).items()),
    ]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"{path / STATE_JSON}: key {key!r} must be a non-negative integer, got {value!r}; delete "
                f"{path} to resume from the checkpoint before it."
            )
    sharded = state.get("sharded_optimizer", False)
    if sharded and state.get("world_size") != world:
        raise ValueError(
            f"{path} holds optimizer shards of {state.get('world_size')} ranks; resume it on as many "
            f"(this run has {world})."
        )
    try:
        tensors = load_file(str(path / (f"trainer_state.rank{rank}.safetensors" if sharded else STATE_TENSORS)))
    except Exception as err:
        raise ValueError(f"{path}: the trainer state is missing or corrupt ({err}).") from err
    params = [p for group in opt.param_groups for p in group["params"]]
    opt_state = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            p = params[int(idx)]
            if hasattr(p, "device_mesh") and value.dim() > 0:  # an FSDP2 shard: back to a DTensor
                from torch.distributed.tensor import DTensor

                value = DTensor.from_local(
                    value.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
            opt_state["state"].setdefault(int(idx), {})[name] = value
    opt.load_state_dict(opt_state)
    data.load_state_dict(state["data"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


# ------------------------------------------------------------------------------------------------ the recipe
class Trainer(StepLoop):
    """The training recipe in parts: construction sets up (parallel context, model with its speed options, data,
    optimizer, resume); :meth:`step` runs one optimizer step, :meth:`evaluate` the held-out evaluation,
    :meth:`save` a checkpoint; :meth:`fit` is the loop (logging, evaluation and checkpoints on schedule, the time
    budget, Ctrl-C/SIGTERM). ``base``/``tokenizer`` may be passed in (tests, notebooks); else ``cfg.model`` loads.

    >>> final = Trainer(TrainConfig.from_flat(max_steps=10)).fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        base=None,
        tokenizer=None,
        progress: bool = True,
        parallel: ParallelContext | None = None,
    ):
        self.cfg, self.progress = cfg, progress
        self.par = parallel or ParallelContext.from_env(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self._setup_model(base, tokenizer)
        self._setup_data()
        self._setup_optimizer()
        self.log = MetricsLog(self.out_dir, self.par.main)

    # ------------------------------------------------------------------------------------------------ setup
    def _setup_model(self, base, tokenizer) -> None:
        from .base import load_base_model

        cfg, par, speed = self.cfg, self.par, self.cfg.speed
        if base is None:
            dtype = None if speed.dtype == "auto" else getattr(torch, speed.dtype)
            base, tokenizer = load_base_model(
                cfg.model,
                device=par.device,
                dtype=dtype,
                attn_implementation=speed.attn_implementation,
                for_training=True,
            )
        self.base, self.tokenizer = base, tokenizer
        model = build_model(base, cfg.coprocessor, check_finite=False)  # finiteness checked at log time
        master_fp32(model)
        apply_speed_options(model, speed)
        if speed.compile_cache and par.main:
            loaded = load_compile_cache(speed.compile_cache)
            if loaded:
                print(f"cacheaug: loaded {loaded / 2**20:.1f} MiB of compile artifacts from {speed.compile_cache}")
        if base.config._attn_implementation == "flex_attention":
            allow_recompiles()
        if par.main and par.device.type == "cuda" and cfg.compile_step == "off" and cfg.max_steps >= 1000:
            print(
                "cacheaug: tip: --compile-step graphs runs each step as one compiled graph, several times faster "
                "on a GPU after a compile of a few minutes (docs/performance.md)"
            )
        self.model = model
        self.base_fingerprint = fingerprint(base)
        if par.main:
            atomic.write_text(
                self.out_dir / RUN_CONFIG,
                json.dumps(
                    {"train": cfg.to_dict(), "base_fingerprint": self.base_fingerprint, "world_size": par.world},
                    indent=2,
                )
                + "\n",
            )

    def _setup_data(self) -> None:
        from .data import PackedSequences, build_token_files, load_tokens, start_token

        cfg, par, tokenizer = self.cfg, self.par, self.tokenizer
        if par.main:
            token_dir = build_token_files(tokenizer, list(cfg.data), cfg.splits())
        if par.world > 1:
            par.barrier()
            token_dir = build_token_files(tokenizer, list(cfg.data), cfg.splits())  # cached: only reads the key
        if cfg.insertion != "random" and cfg.trace_groups > 1:
            raise ValueError(f"--insertion {cfg.insertion} places the points itself: use --trace-groups 1")
        self.marker_ids = (
            tokenizer(cfg.marker, add_special_tokens=False)["input_ids"] if cfg.insertion != "random" else None
        )
        from .synth import line_end_ids

        self.stop_ids = line_end_ids(tokenizer) if cfg.insertion == "answer" else frozenset()
        bos = start_token(tokenizer)
        self.data = PackedSequences(
            load_tokens(token_dir, "train"), cfg.seq_len, cfg.seed, par.rank, par.world, bos_id=bos
        )
        heldout_tokens = load_tokens(token_dir, "heldout")
        n_eval = min(cfg.eval_sequences, max(0, len(heldout_tokens) - 1) // cfg.seq_len)
        heldout = PackedSequences(heldout_tokens, cfg.seq_len, seed=0, bos_id=bos) if n_eval else None
        self.eval_seqs = heldout.spread(n_eval) if n_eval else None
        if n_eval == 0 and cfg.eval_every and par.main:
            from .evaluate import empty_split_message

            print(
                f"cacheaug: warning: no held-out evaluation in this run: {empty_split_message(token_dir, 'heldout', cfg.seq_len)}"
            )

    def _setup_optimizer(self) -> None:
        """Resume weights (before any sharding: full tensors into full parameters), spread over ranks, optimizer,
        then the optimizer moments, RNG and data position of the newest checkpoint."""
        cfg, par, model = self.cfg, self.par, self.model
        checkpoints = complete_checkpoints(self.out_dir) if cfg.resume else []
        if checkpoints:
            trained_on = read_config(checkpoints[-1])["base_model"]
            if trained_on["fingerprint"] != self.base_fingerprint:
                raise ValueError(
                    f"{checkpoints[-1]} was trained on base model {trained_on.get('name_or_path')!r} (fingerprint "
                    f"{trained_on['fingerprint']}), but this run's --model {cfg.model!r} has fingerprint "
                    f"{self.base_fingerprint}: resume with the same --model, or train into a new --out-dir."
                )
            saved = read_config(checkpoints[-1])["coprocessor"]
            changed = {
                k: (saved[k], v) for k, v in cfg.coprocessor_config().to_dict().items() if k in saved and saved[k] != v
            }
            if changed:
                said = ", ".join(f"--{k.replace('_', '-')} {new} (it holds {old})" for k, (old, new) in changed.items())
                raise ValueError(
                    f"--out-dir {cfg.out_dir} holds a run of another coprocessor, and the same command resumes it: "
                    f"this command says {said}. Train into another --out-dir to start afresh, or repeat the run's "
                    "options to resume it."
                )
            load_trainable(model, checkpoints[-1])
        self.sharded = par.world > 1 and cfg.parallel == "fsdp"
        self.ddp_model = model
        if self.sharded:
            shard_coprocessor(model, par.device)
        elif par.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_model = DistributedDataParallel(
                model, device_ids=[par.device] if par.device.type == "cuda" else None
            )
        self.opt = make_optimizer(model, cfg.optim)
        self.peak_lr = [g["lr"] for g in self.opt.param_groups]
        self.step_count, self.tokens_seen = 0, 0
        if checkpoints:
            state = load_trainer_state(checkpoints[-1], self.opt, self.data, rank=par.rank, world=par.world)
            self.step_count, self.tokens_seen = state["step"], state["tokens_seen"]
            if par.main:
                print(f"cacheaug: resumed from {checkpoints[-1]} at step {self.step_count}")
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * par.world
        self.stopped_early = False

    # ------------------------------------------------------------------------------------------------ parts
    def step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's mean loss as a device tensor
        (no host sync)."""
        cfg, par, model = self.cfg, self.par, self.model
        mult = cfg.optim.lr_multiplier(self.step_count)
        for g, p in zip(self.opt.param_groups, self.peak_lr):
            g["lr"] = p * mult
        total = torch.zeros((), device=par.device)
        self._data_at_step_start = self.data.state_dict()  # an interrupt inside the step rolls back to it
        self._phase = "batches"
        for micro in range(cfg.grad_accum):
            ids, keys = self.data.next_batch(cfg.batch_size)
            positions = insertion_points(keys, cfg, ids, self.marker_ids, self.stop_ids)  # on the CPU: no sync
            ids = ids.to(par.device, non_blocking=True)
            no_sync = par.world > 1 and micro < cfg.grad_accum - 1
            if self.sharded:
                model.coprocessor.set_requires_gradient_sync(not no_sync)
            with self.ddp_model.no_sync() if no_sync and not self.sharded else nullcontext(), autocast_for(model):
                out = self.ddp_model(ids, positions=positions)
            (out.loss / cfg.grad_accum).backward()
            total += out.loss.detach() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip)
        self._phase = "update"  # from here to the step count, an interrupt leaves weights and step count apart
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        self.tokens_seen += self.tokens_per_step
        self._phase = "between"
        return total

    def evaluate(self) -> list[float] | None:
        """Held-out per-offset perplexity change vs the frozen model (logged); None without held-out data or on a
        rank that does not take part."""
        if self.eval_seqs is None or not (self.par.main or self.sharded):  # a sharded coprocessor: every rank runs
            return None
        cfg = self.cfg
        losses = heldout_losses(self.model, self.eval_seqs, n_points=min(cfg.n_traces, cfg.seq_len - cfg.n_ahead))
        if not self.par.main:
            return None
        change = relative_ppl_change(losses)
        self.log.write(
            self.step_count,
            tokens=self.tokens_seen,
            eval_loss=sum(losses["augmented"]) / cfg.n_ahead,
            eval_base_loss=sum(losses["base"]) / cfg.n_ahead,
            eval_losses=losses["augmented"],
            eval_base_losses=losses["base"],
            eval_points=losses["n_points"],
            **{f"eval_rel_ppl_offset_{o + 1}": c for o, c in enumerate(change)},
        )
        return change

    def save(self) -> Path:
        """A checkpoint of the current step (every rank calls it)."""
        extra = {"tokens_seen": self.tokens_seen, "config": self.cfg.to_dict(), "stopped_early": self.stopped_early}
        return save_checkpoint(
            self.out_dir,
            self.step_count,
            self.model,
            self.opt,
            self.data,
            extra,
            self.cfg.keep_last,
            rank=self.par.rank,
            world=self.par.world,
            sharded=self.sharded,
        )

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        """Train to ``max_steps`` (or the time budget, or Ctrl-C/SIGTERM), evaluating and saving on schedule;
        returns the final checkpoint (:class:`cacheaug.loop.StepLoop`)."""
        self.model.train()
        return super().fit()

    def schedule(self) -> Schedule:
        cfg = self.cfg
        return Schedule(cfg.max_steps, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.max_minutes)

    def first_step(self, seconds: float, bar) -> None:  # the compile (if any) happened here: time it, keep artifacts
        cfg = self.cfg
        self.log.write(self.step_count, first_step_s=seconds)
        if cfg.compile_cache and self.par.main and cfg.compile_step != "off":
            size = save_compile_cache(cfg.compile_cache)
            bar.write(
                f"cacheaug: first step after {seconds:.1f} s; saved {size / 2**20:.1f} MiB of compile artifacts "
                f"to {cfg.compile_cache}"
            )

    def rates(self, tokens_per_s: float) -> dict:  # what the method learns from: traces, K per sequence of T tokens
        return {"traces_per_s": tokens_per_s * self.cfg.n_traces / self.cfg.seq_len}

    def evaluate_and_print(self, bar) -> None:
        change = self.evaluate()
        if change is not None:
            bar.write(
                f"step {self.step_count}: held-out ppl change by offset " + " ".join(f"{c:+.1f}%" for c in change[:8])
            )


def train(cfg: TrainConfig, *, base=None, tokenizer=None, progress: bool = True) -> Path:
    """Train a coprocessor as ``cfg`` says; returns the final checkpoint folder (:class:`Trainer`'s ``fit``).

    ``base``/``tokenizer`` may be passed in (tests, notebooks); else ``cfg.model`` is loaded.
    """
    if cfg.max_steps < cfg.warmup_steps:
        print(
            f"cacheaug: warning: --max-steps {cfg.max_steps} ends inside the {cfg.warmup_steps}-step warm-up: the "
            f"learning rate reaches only {100 * lr_multiplier(cfg.max_steps - 1, cfg):.0f}% of --lr; lower "
            "--warmup-steps for a short run"
        )
    return Trainer(cfg, base=base, tokenizer=tokenizer, progress=progress).fit()
