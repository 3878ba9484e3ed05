"""The one training loop, shared by ``cacheaug train`` (:class:`cacheaug.train.Trainer`) and ``cacheaug adapt``
(:class:`cacheaug.adapt.Adaptation`): steps to ``max_steps`` or a time budget, logging, evaluation and checkpoints
on schedule, Ctrl-C / SIGTERM (the step in flight is dropped, or finished if inside its optimizer update), then the
final checkpoint, written before the final evaluation so that an evaluation that fails loses nothing.

Also here: where a process runs among torchrun's (:class:`ParallelContext`) and the metrics log (:class:`MetricsLog`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


class MetricsLog:
    """JSONL metrics (always) and TensorBoard scalars (when tensorboard is installed and ``tensorboard``), rank 0
    only."""

    def __init__(self, out_dir: Path, enabled: bool, name: str = "metrics.jsonl", tensorboard: bool = True):
        self.enabled = enabled
        self.file = open(Path(out_dir) / name, "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.tb:
            self.tb.close()
            self.tb = None


@dataclass
class ParallelContext:
    """Where this process runs: its rank among ``world`` processes (torchrun), its device, and the collectives the
    trainer needs. One process: rank 0 of 1, and every collective is a no-op."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> "ParallelContext":
        """From torchrun's environment (initialising the process group: NCCL on GPUs, else gloo); else one process
        on ``device`` (default: CUDA when available)."""
        rank, world, local_rank = distributed_env()
        if world == 1:
            from .base import resolve_device

            return cls(0, 1, resolve_device(device))
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        dev = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return cls(rank, world, dev)

    def barrier(self) -> None:
        _barrier(self.world)

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. out of time)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor(float(flag), device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks (in place)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world
        return t

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


@dataclass(frozen=True)
class Schedule:
    """When the loop stops, logs, evaluates and saves (0: never, for the last three and the time budget)."""

    max_steps: int
    log_every: int
    eval_every: int = 0
    save_every: int = 0
    max_minutes: float = 0.0


class StepLoop:
    """A training run in parts, driven by :meth:`fit`. A subclass sets ``par`` (:class:`ParallelContext`), ``log``
    (:class:`MetricsLog`), ``data`` (with ``state_dict`` / ``load_state_dict``), ``opt``, ``step_count``,
    ``tokens_seen``, ``progress``, and implements :meth:`step` (one optimizer step; it marks ``_phase``
    ``"batches"`` after keeping ``_data_at_step_start``, then ``"update"`` around the optimizer update, then
    ``"between"``) and :meth:`save`; :meth:`evaluate_and_print`, :meth:`first_step` and :meth:`rates` are
    optional."""

    desc = "train"
    nonfinite_hint = "lower --lr"
    par: ParallelContext
    log: MetricsLog
    step_count: int
    tokens_seen: int
    opt: torch.optim.Optimizer
    progress: bool
    stopped_early: bool = False
    interrupted: bool = False
    _phase: str = "between"  # of a step: "batches" (read, forward, backward), "update", "between"

    def schedule(self) -> Schedule:
        raise NotImplementedError

    def step(self) -> torch.Tensor:
        """One optimizer step; its mean loss as a device tensor (no host sync)."""
        raise NotImplementedError

    def save(self) -> Path:
        """A checkpoint of the current step (every rank calls it)."""
        raise NotImplementedError

    def evaluate_and_print(self, bar) -> None:
        """The held-out evaluation, printed through ``bar.write`` (none by default)."""

    def first_step(self, seconds: float, bar) -> None:
        """Called once after the first step of this process (a compile, if any, happened in it)."""

    def rates(self, tokens_per_s: float) -> dict:
        """Extra throughput figures for the log and the progress bar (``{name: value}``)."""
        return {}

    def fit(self) -> Path:
        """Step to ``max_steps`` (or the time budget, or Ctrl-C/SIGTERM), logging, evaluating and saving on schedule;
        returns the final checkpoint, written before the final evaluation."""
        from tqdm.auto import tqdm

        sched, par = self.schedule(), self.par
        requested = []

        def on_signal(signum, frame):
            """Ctrl-C / SIGTERM: stop at once (the step in flight is dropped: its batches are read again on resume),
            except inside the optimizer update, which finishes first; then save."""
            requested.append(signal.Signals(signum).name)
            if self._phase != "update" or len(requested) > 1:
                raise KeyboardInterrupt

        handlers = {}
        # SIGINT too: a process started in the background inherits it ignored, and Ctrl-C must still stop it
        if par.world == 1 and threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=sched.max_steps,
            initial=self.step_count,
            desc=self.desc,
            unit="step",
            disable=not (self.progress and par.main),
        )
        running = torch.zeros((), device=par.device)
        t_last, tokens_last = time.perf_counter(), self.tokens_seen
        t_start, first = t_last, True
        try:
            while self.step_count < sched.max_steps:
                running += self.step()
                step = self.step_count
                bar.update(1)
                if first:
                    first = False
                    if par.device.type == "cuda":
                        torch.cuda.synchronize(par.device)
                    self.first_step(time.perf_counter() - t_start, bar)
                if step % sched.log_every == 0 or step == sched.max_steps:
                    par.mean(running)  # the logged loss is the global batch's, not rank 0's share
                    n = sched.log_every if step % sched.log_every == 0 else step % sched.log_every
                    loss = (running / n).item()
                    running.zero_()
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"Non-finite training loss at step {step}: {self.nonfinite_hint}.")
                    now = time.perf_counter()
                    tps = (self.tokens_seen - tokens_last) / (now - t_last)
                    t_last, tokens_last = now, self.tokens_seen
                    extra = self.rates(tps)
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        tok_s=f"{tps:,.0f}",
                        **{k.removesuffix("_per_s") + "_s": f"{v:,.{0 if v >= 10 else 2}f}" for k, v in extra.items()},
                    )
                    self.log.write(
                        step, loss=loss, tokens=self.tokens_seen, tokens_per_s=tps, **extra, lr=self.current_lr()
                    )
                if sched.eval_every and step % sched.eval_every == 0 and step < sched.max_steps:
                    self.evaluate_and_print(bar)
                if sched.save_every and step % sched.save_every == 0 and step < sched.max_steps:
                    self.save()
                if (
                    sched.max_minutes
                    and step % sched.log_every == 0
                    and step < sched.max_steps
                    and par.decide(time.perf_counter() - t_start > 60 * sched.max_minutes)
                ):
                    self.stopped_early = True
                    bar.write(
                        f"cacheaug: --max-minutes {sched.max_minutes} reached at step {step} of {sched.max_steps}"
                    )
                    break
                if requested and step < sched.max_steps:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.interrupted = True
            if self._phase == "update":  # stopped inside the optimizer update: weights and step count disagree
                self.log.close()
                raise SystemExit(
                    f"cacheaug: stopped inside the update of step {self.step_count + 1}; nothing saved "
                    "since the last checkpoint (resume with the same command)"
                ) from None
            if self._phase == "batches":  # the step in flight never happened: its batches are read again
                self.data.load_state_dict(self._data_at_step_start)
                self._phase = "between"
            bar.write(
                f"cacheaug: interrupted after step {self.step_count}; saving a checkpoint (resume with the same "
                "command)"
            )
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        final = self.save()  # before the final evaluation: an evaluation that fails (out of memory) loses no step
        try:
            if not self.interrupted:
                self.evaluate_and_print(bar)
        except Exception as err:
            raise RuntimeError(
                f"the final held-out evaluation failed ({type(err).__name__}: {str(err).splitlines()[0]}); the "
                f"checkpoint of step {self.step_count} is saved in {final}: score it apart with `cacheaug eval ppl "
                f"--checkpoint {final}`, or resume training from it"
            ) from err
        finally:
            self.log.close()
            self.par.close()
        return final

    def current_lr(self) -> float:
        return self.opt.param_groups[-1]["lr"]
