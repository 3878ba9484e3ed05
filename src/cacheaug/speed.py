"""Opt-in speed settings for training on a GPU (measured in benchmarks/train_throughput.py, docs/performance.md).

* ``compile_step``: :meth:`CacheAugmentedLM.compile_training`, ``torch.compile`` of the whole training pass
  (three passes, loss, and their backward) as one graph: input checks and position sampling run eagerly
  outside it, so nothing in it breaks the graph or syncs with the host. ``"graphs"`` adds CUDA graphs (mode
  ``reduce-overhead``): a step is then one graph replay instead of thousands of kernel launches.

* ``trace_groups`` G: draw the K insertion points stratified, K/G in each of G equal segments of the sequence, so
  that the coprocessor and decoder passes of each group read only the text keys before its segment's end
  (masks.py, "trace groups"): the same losses for the same points, two thirds of the trace attention work at
  G=2 (measured in docs/performance.md). It changes which points are drawn (evenly spread instead of independent),
  not what is computed for them.

* ``trace_chunk`` C: the trace passes run C traces per row, each row against its own copy of the text keys
  (model.py, ``_traces``), instead of all K traces of a sequence in one row after the text. Every trace query then
  meets T + C x L keys instead of T + K x L, of which all but its own block were masked: at K=128 most of the
  attention work. It costs K/C copies of the text keys per layer. Same masks, same losses (the equivalence tests
  cover it); it changes nothing about what is trained.

* ``trace_windows``: on sliding-window layers the trace passes run one trace per row against only the W-1 text keys
  before its insertion point, gathered per row (windows.py); full layers read the text, one trace per row or, with
  ``trace_chunk`` C, C traces per row; the query heads sharing a key head are folded into one row of queries. Same
  masks, same losses (the equivalence tests cover it); sdpa backbones with per-layer-type masks only (Gemma-3,
  Qwen-2/3).

* ``trace_kernel``: trace windows whose attention runs cacheaug's own kernel (prefix_attention.py): each row's text
  keys are read in place from the prefix cache instead of gathered into a copy, text tiles no query of the row may
  see are skipped, and backward computes no gradient for the text keys (which take none). Same results (the
  equivalence tests cover it; the Triton kernels are checked under Triton's interpreter on the CPU).

* ``rope_table``: the decoder's and the coprocessor's rotary embeddings look cos/sin up in a table of every
  position (cacheaug.rope) instead of computing them on every call: inside the compiled step inductor otherwise
  evaluates exact float32 cos and sin per element in every layer's rotary kernels (forward and backward). The table
  rows are the modules' own outputs, so the results are the same.

* :func:`compile_mlps`: ``torch.compile`` each MLP block of the frozen decoder and of the coprocessor. The MLPs
  hold no cache and no mask, so one graph per input shape serves every layer (three passes: three graphs) and
  nothing breaks the graph. Whole decoder layers are not compiled: they take the kv-cache object, and dynamo
  then guards on it per layer and recompiles 18 times per pass.
* ``compile_masks`` (``model.compile_block_masks``): build FlexAttention block masks with a compiled
  ``create_block_mask`` instead of materialising the dense rule.

Both change the decoder's modules in place (``nn.Module.compile``): results stay equal up to rounding, and
the decoder is still frozen and still the same weights.
"""

from __future__ import annotations

import lzma
import warnings
from pathlib import Path

import torch.nn as nn

from . import atomic, masks


def _decoders(model: nn.Module) -> list[nn.Module]:
    out = [model.base.get_decoder()]
    cop = getattr(model, "coprocessor", None)
    backbone = getattr(cop, "backbone", None) if cop is not None else None
    if backbone is None and cop is not None and hasattr(cop, "get_decoder"):  # the LoRA-decoder control
        backbone = cop.get_decoder()
    if backbone is not None:
        out.append(backbone)
    return out


def compile_mlps(model: nn.Module) -> int:
    """``torch.compile`` (static shapes) every MLP block of the decoder and the coprocessor; returns how many."""
    n = 0
    for decoder in _decoders(model):
        for layer in decoder.layers:
            mlp = getattr(layer, "mlp", None)
            if mlp is not None and getattr(mlp, "_compiled_call_impl", None) is None:
                mlp.compile(dynamic=False)
                n += 1
    return n


def allow_recompiles(limit: int = 64) -> None:
    """FlexAttention compiles one kernel per shape (prefix, coprocessor, decoder pass, evaluation batch, ...); past
    dynamo's default limit of 8 it would silently fall back to the dense eager path, slow and memory-hungry."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, limit)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 16 * limit)


COMPILE_STEP_MODES = {"off": None, "step": "default", "graphs": "reduce-overhead"}
_ATTN = {"flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}


def parse_variant(name: str) -> dict:
    """A speed variant as the throughput benchmark names it: 'flex', 'sdpa' or 'eager', optionally '+masks'
    (compiled block masks), one of '+mlp' (compiled MLPs), '+step' (the whole training pass compiled as one graph)
    or '+graphs' (that, replayed as CUDA graphs), '+keeplogits' (the loss's logits kept for backward), '+gN'
    (N trace groups), '+cN' (N traces per row), '+w' (trace windows), '+k' (trace windows through cacheaug's
    kernel) and '+r' (rotary tables)."""
    attn, *flags = name.split("+")
    groups = [f for f in flags if f[:1] == "g" and f[1:].isdigit() and int(f[1:]) >= 1]
    chunks = [f for f in flags if f[:1] == "c" and f[1:].isdigit() and int(f[1:]) >= 1]
    flags = [f for f in flags if f not in groups and f not in chunks]
    step = [f for f in flags if f in ("step", "graphs")]
    if (
        attn not in _ATTN
        or not set(flags) <= {"masks", "mlp", "step", "graphs", "keeplogits", "w", "k", "r"}
        or len(step) > 1
        or (step and "mlp" in flags)
        or len(groups) > 1
        or len(chunks) > 1
        or len(set(flags)) < len(flags)
    ):
        raise ValueError(
            f"bad variant {name!r}: use flex|sdpa|eager with optional +masks, and one of +mlp, +step, "
            "+graphs; optionally +keeplogits, +gN (N trace groups), +cN (N traces per row), +w "
            "(trace windows; with +cN: N traces per row on full layers), +k (trace windows through "
            "cacheaug's kernel) and +r (rotary tables)"
        )
    return {
        "attn": _ATTN[attn],
        "compile_masks": "masks" in flags,
        "compile_mlp": "mlp" in flags,
        "compile_step": step[0] if step else "off",
        "keep_logits": "keeplogits" in flags,
        "trace_groups": int(groups[0][1:]) if groups else 1,
        "trace_chunk": int(chunks[0][1:]) if chunks else 0,
        "trace_windows": "w" in flags or "k" in flags,
        "trace_kernel": "k" in flags,
        "rope_table": "r" in flags,
    }


def apply_speed_options(
    model: nn.Module,
    speed=None,
    *,
    compile_mlp: bool = False,
    compile_masks: bool = False,
    compile_step: str = "off",
    trace_groups: int = 1,
    trace_chunk: int = 0,
    trace_windows: bool = False,
    trace_kernel: bool = False,
    rope_table: bool = False,
) -> None:
    """Turn on the opt-in speed settings above (no-ops with the defaults): from ``speed`` (a training run's
    :class:`~cacheaug.train_config.SpeedConfig`, ``keep_logits`` included) or from the keyword arguments."""
    if speed is not None:
        model.recompute_loss = not speed.keep_logits
        compile_mlp, compile_masks, compile_step = speed.compile_mlp, speed.compile_masks, speed.compile_step
        trace_groups, trace_chunk, rope_table = speed.trace_groups, speed.trace_chunk, speed.rope_table
        trace_windows, trace_kernel = speed.trace_windows, speed.trace_kernel
    if compile_step not in COMPILE_STEP_MODES:
        raise ValueError(f"compile_step must be one of {sorted(COMPILE_STEP_MODES)}, got {compile_step!r}")
    if hasattr(model, "trace_groups"):
        masks.check_trace_groups(trace_groups, model.config.n_traces)
        model.trace_groups = trace_groups
    if hasattr(model, "trace_chunk"):
        per_pass = model.config.n_traces // max(1, trace_groups)
        if trace_chunk < 0 or (trace_chunk and per_pass % trace_chunk):
            raise ValueError(f"trace_chunk {trace_chunk} must divide the traces of each trace group ({per_pass})")
        model.trace_chunk = trace_chunk
    if trace_windows or trace_kernel:
        model.trace_windows = True  # refuses a family it cannot run
    if trace_kernel:
        model.trace_kernel = True
    if rope_table:
        from .rope import table_rotaries

        table_rotaries(_decoders(model))
    if compile_mlp or compile_masks:
        allow_recompiles()
    if compile_mlp:
        if compile_step != "off":
            raise ValueError("compile_mlp and compile_step both compile the MLPs: use one of them")
        compile_mlps(model)
    if compile_step != "off":
        model.compile_training(mode=COMPILE_STEP_MODES[compile_step])
    if hasattr(model, "compile_block_masks"):
        model.compile_block_masks = compile_masks


def load_compile_cache(path: str | Path) -> int:
    """Hot-load ``torch.compile`` artifacts saved by :func:`save_compile_cache` (inductor's FX-graph, AOT-autograd and
    autotuning caches), so that a fresh process or machine skips most of the compile; returns the bytes read (0 when
    the file does not exist yet). Artifacts of another torch version or GPU are ignored by torch (a cache miss). A
    path ending in ``.xz`` holds them compressed. A file that cannot be read as artifacts is only a cache: a warning,
    and everything compiles afresh (0 is returned)."""
    path = Path(path)
    if not path.is_file():
        return 0
    import torch.compiler

    data = path.read_bytes()
    try:
        info = torch.compiler.load_cache_artifacts(lzma.decompress(data) if path.suffix == ".xz" else data)
        if info is None:  # torch logs why (a checksum that does not match) and loads nothing
            raise ValueError("torch could not read it")
    except Exception as err:  # noqa: BLE001  a truncated copy, another format: compile as if it were absent
        warnings.warn(
            f"cacheaug: {path} does not hold torch.compile artifacts ({type(err).__name__}: {err}); "
            "compiling afresh (it is overwritten after the first step)",
            stacklevel=2,
        )
        return 0
    return len(data)


def save_compile_cache(path: str | Path) -> int:
    """Write every artifact this process's compiles produced to ``path`` (atomically); returns its size in bytes. A
    path ending in ``.xz`` is compressed (lzma): Triton kernels and generated code shrink about 13x (95 MB of a
    compiled training step of Gemma 3 270M -> 7.3 MB), small enough to carry to another machine in one piece."""
    import torch.compiler

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    path = Path(path)
    data = lzma.compress(saved[0], preset=3) if path.suffix == ".xz" else saved[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)
    return len(data)
