"""The trace kernel's registers, spills and shared memory on an H100/H200 (sm_90a), compiled ahead of time on any
machine: no GPU needed (docs/performance.md, "Session 21").

Triton compiles ``cacheaug.prefix_attention``'s kernel for the target at each tile setting and ptxas (bundled with
Triton) reports what a thread uses. At head size 256 the kernels hold 64-256 float32 accumulators a thread; what does
not fit the 255 registers spills to local memory, which the GPU then reads and writes in the inner loop. The spill
bytes are a cheap proxy for the kernel's speed while no GPU is at hand (the timing itself is
benchmarks/trace_attention.py's, on the GPU).

    python benchmarks/kernel_registers.py --out kernel_registers.json      # forward and backward at the defaults
    python benchmarks/kernel_registers.py --tiles 64,64,4,2 128,64,8,2 --backward-tiles 64,32,4,2 64,32,8,2
    git show REV:src/cacheaug/prefix_attention_kernels.py > /tmp/pa_rev.py   # another version of the kernels, compared
    python benchmarks/kernel_registers.py --module /tmp/pa_rev.py
    (revisions before the kernels had a file of their own, dc0d615 and older: src/cacheaug/prefix_attention.py)

The kernel is compiled as a launch specializes it (``--queries-per-trace``): Triton marks an integer argument that is
a multiple of 16 (and a pointer aligned to 16 bytes) divisible by 16 and turns one equal to 1 into a constant, and
only then can it vectorize the key and value loads and pipeline them over ``num_stages`` buffers. The arguments are
those of a real call (one sliding layer of Gemma 3 270M's shapes at K=128, run on the CPU up to the launch), so a
report matches what the GPU compiles; ``--no-specialize`` compiles without (what this script did before session 22:
loads not pipelined, ``num_stages`` without effect).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from cacheaug import prefix_attention as pa

POINTERS = {
    "SEQ": "*i64",
    "START": "*i64",
    "LO": "*i32",
    "HI": "*i32",
    "FULL": "*i32",
    "LSE": "*fp32",
    "DELTA": "*fp32",
    "OUT_LSE": "*fp32",
    "DKB": "*fp32",
    "DVB": "*fp32",
}  # the rest: *DTYPE
TENSORS = ("Q", "KB", "VB", "TK", "TV", "BIAS", "DO", "O", "OUT")
PASSES = {False: "forward", True: "backward", "block": "backward, block dK/dV"}


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` keeps the arguments and launches nothing."""

    def __init__(self):
        self.args = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args = args

        return launch


def runtime_specialization(
    queries_per_trace: int = 31, head_dim: int = 256, traces: int = 128, seq_len: int = 1024, window: int = 512
) -> dict:
    """{pass: {argument: "D" (divisible by 16) | 1 (the constant 1) | ""}} of the forward, the backward and the
    block's dK/dV kernel at a real call: one sliding layer of a row per trace (4 query heads on 1 key head), the
    library's own path (windows.trace_keys, windows.trace_attention, autograd) run on the CPU up to each launch."""
    import torch

    from cacheaug.families import SLIDING, Family
    from cacheaug.windows import trace_attention, trace_keys

    class Layer:  # what trace_attention reads from the attention module
        layer_idx = 0

    B, T, K, L, D = 2, seq_len, traces, queries_per_trace, head_dim
    g = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.randperm(T - 16, generator=g)[:K].sort().values for _ in range(B)])
    text_k, text_v = (torch.randn(B, 1, T, D, generator=g).bfloat16() for _ in range(2))
    family = Family("gemma3_text", (SLIDING,), window, True, "sdpa", None, "cache", None)
    keys = trace_keys([(text_k, text_v)], positions, L, family, 4, 1, kernel=True)[SLIDING]
    q = torch.randn(B * K, L, 4, D, generator=g).bfloat16().transpose(1, 2).requires_grad_()  # as the model's
    blk_k, blk_v = (
        torch.randn(B * K, L, 1, D, generator=g).bfloat16().transpose(1, 2).requires_grad_() for _ in range(2)
    )
    saved = pa._use_kernel, pa._prefix_attention_kernel, pa._block_grad_kernel
    fwd, blk = _Recorder(), _Recorder()
    try:
        pa._use_kernel = lambda q: True
        pa._prefix_attention_kernel, pa._block_grad_kernel = fwd, blk
        out = trace_attention(Layer(), q, blk_k, blk_v, keys)[0]
        forward_args, fwd.args = fwd.args, None
        out.float().sum().backward()
        backward_args = fwd.args
    finally:
        pa._use_kernel, pa._prefix_attention_kernel, pa._block_grad_kernel = saved

    def spec(kernel, args) -> dict:
        names = kernel.arg_names[: len(args)]  # the launch passes the constexprs by keyword, after these
        return {name: _specialize(arg) for name, arg in zip(names, args)}

    return {
        False: spec(pa._prefix_attention_kernel, forward_args),
        True: spec(pa._prefix_attention_kernel, backward_args),
        "block": spec(pa._block_grad_kernel, blk.args),
    }


def _specialize(arg) -> str | int:
    """What a launch makes of one argument: 1 (an integer equal to 1 becomes a constant), "D" (an integer that is a
    multiple of 16, a tensor whose address is) or "" (Triton's own function where this Triton has it)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:  # an older Triton: the same rule, written out
        if isinstance(arg, bool) or not isinstance(arg, int) and not hasattr(arg, "data_ptr"):
            return ""
        if isinstance(arg, int):
            return 1 if arg == 1 else ("D" if arg % 16 == 0 else "")
        return "D" if arg.data_ptr() % 16 == 0 else ""
    kind, key = native_specialize_impl(BaseBackend, arg, False, True, True)
    return 1 if kind == "constexpr" else key


def _ptxas_report(ptx: str, arch: str) -> dict:
    """Registers and spill bytes of one kernel, from the bundled ptxas that reads this PTX's version."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for tool in ("ptxas-blackwell", "ptxas"):
            if not (bin_dir / tool).exists():
                continue
            run = subprocess.run(
                [str(bin_dir / tool), f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True
            )
            text = run.stdout + run.stderr
            if run.returncode == 0:
                spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
                regs = re.search(r"Used (\d+) registers", text)
                return {
                    "registers": int(regs.group(1)),
                    "stack_bytes": int(spill.group(1)),
                    "spill_store_bytes": int(spill.group(2)),
                    "spill_load_bytes": int(spill.group(3)),
                    "ptxas": tool,
                }
    finally:
        os.unlink(f.name)
    raise SystemExit(
        f"kernel_registers: no ptxas in {bin_dir} reads this PTX (install a Triton with the NVIDIA backend)"
    )


def compile_report(
    tiles: str,
    backward: bool | str,
    head_dim: int,
    dtype: str = "bf16",
    arch: int = 90,
    module=pa,
    specialization: dict | None = None,
) -> dict:
    """Compile ``module``'s kernel for ``sm_{arch}a`` at ``tiles`` ("BLOCK_M,BLOCK_N,warps,stages") and report its
    resources; ``backward="block"``: the backward's second kernel, the block's dK/dV. ``specialization``
    ({argument: "D" | 1 | ""}, runtime_specialization's) compiles it as a launch with those arguments would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, warps, stages = (int(x) for x in tiles.split(","))
    block = backward == "block"
    kernel = module._block_grad_kernel if block else module._prefix_attention_kernel
    names = kernel.arg_names
    const = dict(
        D=head_dim,
        DP=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BACKWARD=backward,
        PREC="ieee" if dtype == "fp32" else "tf32",
        OFFS64=False,
    )
    signature, attrs = {}, {}
    specialization = specialization or {}
    for i, name in enumerate(names):
        if specialization.get(name) == 1 and name not in const:  # Triton makes an argument equal to 1 a constant
            const[name] = 1
        elif specialization.get(name) == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
        if name in const:
            signature[name] = "constexpr"
        elif block and name in ("DKB", "DVB"):  # written in the blocks' dtype
            signature[name] = "*" + dtype
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in TENSORS:
            signature[name] = "*" + dtype
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in const.items() if k in names},
        attrs=attrs,
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    return {
        "pass": PASSES[backward],
        "tiles": tiles,
        "head_dim": head_dim,
        "dtype": dtype,
        "arch": f"sm_{arch}a",
        "specialized": bool(specialization),
        "pipelined_loads": compiled.asm["ttgir"].count("async_copy_global_to_local"),
        "shared_bytes": compiled.metadata.shared,
        "fits_h200_shared": compiled.metadata.shared <= 232448,
        **(report := _ptxas_report(compiled.asm["ptx"], f"sm_{arch}a")),
        "programs_per_sm": programs_per_sm(compiled.metadata.shared, report["registers"], warps),
    }


def programs_per_sm(shared_bytes: int, registers: int, warps: int) -> int:
    """How many programs (thread blocks) of a kernel one H100/H200 SM holds at once: 228 KiB of shared memory (1 KiB
    of it reserved per block), 64K registers (allocated per warp in units of 256), at most 32 blocks."""
    by_shared = (233472 // (shared_bytes + 1024)) if shared_bytes else 32
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65536 // (regs_per_warp * warps)
    return min(by_shared, by_registers, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = ",".join(str(pa.CONFIG[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    wide = ",".join(str(pa.WIDE_CONFIG[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    bwd = ",".join(str(pa.BACKWARD_CONFIG[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    ap.add_argument("--tiles", nargs="*", default=[cfg, wide], help="forward settings (default: the library's)")
    ap.add_argument("--backward-tiles", nargs="*", default=[bwd], help="backward settings")
    blk = ",".join(str(pa.BLOCK_GRAD_CONFIG[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    ap.add_argument(
        "--block-tiles",
        nargs="*",
        default=[blk],
        help="settings of the backward's block dK/dV kernel (kernels that have one)",
    )
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--arch", type=int, default=90, help="90: H100 / H200")
    ap.add_argument(
        "--queries-per-trace",
        type=int,
        default=31,
        help="the real call whose arguments the kernel is specialized for: 31 (the decoder's rows at "
        "n_latents=16, n_ahead=16) or 16 (the coprocessor's)",
    )
    ap.add_argument(
        "--no-specialize",
        action="store_true",
        help="compile without the launch's specialization (no divisibility known: loads not pipelined)",
    )
    ap.add_argument(
        "--module",
        default=None,
        help="a file holding another version of cacheaug/prefix_attention_kernels.py (prefix_attention.py up to "
        "dc0d615), specialized by argument name, as the library's own call is",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    module = pa
    if args.module:
        import importlib.util

        spec = importlib.util.spec_from_file_location("prefix_attention_other", args.module)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    specs = {} if args.no_specialize else runtime_specialization(args.queries_per_trace, args.head_dim)
    rows = []
    block_tiles = args.block_tiles if hasattr(module, "_block_grad_kernel") else []
    for backward, settings in ((False, args.tiles), (True, args.backward_tiles), ("block", block_tiles)):
        for tiles in settings:
            try:
                rows.append(
                    compile_report(tiles, backward, args.head_dim, args.dtype, args.arch, module, specs.get(backward))
                )
            except Exception as err:  # a setting the compiler refuses (shared memory, layouts): say so, go on
                if isinstance(err, SystemExit):
                    raise
                rows.append({"pass": PASSES[backward], "tiles": tiles, "error": f"{type(err).__name__}: {err}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "module": args.module or "cacheaug.prefix_attention",
                    "python": sys.version.split()[0],
                    "triton": __import__("triton").__version__,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
