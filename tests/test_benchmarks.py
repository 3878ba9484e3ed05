"""The benchmarks stay runnable (toy size on the CPU); their figures live in docs/performance.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # slow tier: a benchmark end to end
def test_train_throughput_runs_at_toy_size(tmp_path):
    out = tmp_path / "t.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_throughput.py"),
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--seq-len",
        "64",
        "--traces",
        "4",
        "--n-latents",
        "2",
        "--n-ahead",
        "3",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--compare-loop",
        "--batches",
        "3",
        "--profile",
        str(tmp_path / "p.txt"),
        "--out",
        str(out),
        "--cached-repeat",
        "--world",
        "2",
        "--parallel",
        "ddp",
        "fsdp",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    rows, (ddp, fsdp) = report["rows"][:-2], report["rows"][-2:]
    assert "error" not in ddp and "error" not in fsdp, (ddp.get("error"), fsdp.get("error"))
    assert [(r["config"], r["loop"]) for r in rows] == [
        ("copy:2", False),
        ("copy:2 profiled", False),
        ("copy:2 B=3", False),
        ("copy:2", True),
    ]
    assert all(r["first_step_s"] > 0 for r in rows)
    # the first step again, in a fresh process with empty compiler caches (sdpa compiles nothing: no artifacts)
    assert report["first_step_cold_s"] == rows[0]["first_step_s"] and report["first_step_cached_s"] > 0
    assert report["compile_cache_saved"] == report["compile_cache_bytes"] == 0
    # DDP over two CPU processes (gloo) at the same per-device batch: summed traces/s and the scaling over one
    assert (ddp["config"], ddp["world"], ddp["per_device_batch"]) == ("copy:2 ddp", 2, 2)
    assert abs(ddp["traces_per_s"] - 2 * 2 * 4 / ddp["seconds_per_step"]) <= 1
    assert abs(ddp["scaling_vs_one"] - ddp["traces_per_s"] / rows[0]["traces_per_s"]) <= 1e-3
    # ... and with the coprocessor sharded by FSDP2 (as `cacheaug train --parallel fsdp`)
    assert (fsdp["config"], fsdp["world"]) == ("copy:2 fsdp", 2)
    assert abs(fsdp["traces_per_s"] - 2 * 2 * 4 / fsdp["seconds_per_step"]) <= 1
    # the first step's loss: the same seed draws the same text, points and weights, so the profiled row repeats the
    # first, and the per-trace loop (K passes of one trace, losses / K summed) equals the parallel pass
    assert rows[1]["first_loss"] == rows[0]["first_loss"]
    assert abs(rows[3]["first_loss"] - rows[0]["first_loss"]) <= 1e-4 * abs(rows[0]["first_loss"])
    assert all(r["text_tokens_per_s"] > 0 and r["counted_gflop_per_step"] > 0 for r in rows)
    for r in rows:  # traces/s beside text tokens/s: K insertion points per sequence of 64 tokens
        assert abs(r["traces_per_s"] - r["text_tokens_per_s"] * 4 / 64) <= 0.05 * r["traces_per_s"] + 1
    assert "aten::mm" in (tmp_path / "p.txt").read_text()  # the profile table names the kernels
    # ... and the profiled row says where a step's time went, by kind (host time on the CPU)
    kinds = rows[1]["profile_ms_per_step"]
    assert kinds["matrix products"] > 0 and kinds["trace kernel"] == 0 and sum(kinds.values()) > 0
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--breakdown", str(tmp_path / "p.txt")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    table = json.loads(run.stdout)  # the table's top rows, the rest of its total below them
    assert table["matrix products"] > 0 and table["below the listed rows"] >= 0


def test_profile_kinds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tt", ROOT / "benchmarks" / "train_throughput.py")
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    assert tt.profile_kind("_prefix_attention_kernel") == "trace kernel"
    assert tt.profile_kind("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT") == "matrix products"
    assert tt.profile_kind("triton_red_fused__log_softmax__log_softmax_backward_3") == "loss (log-softmax)"
    assert tt.profile_kind("triton_poi_fused__unsafe_view_gelu_mul_57") == "fused element-wise (Triton)"
    assert tt.profile_kind("## Call CompiledFxGraph fjsed6u7") is None  # encloses kernels: not counted twice
    got = tt.profile_breakdown(
        [
            ("## Call CompiledFxGraph x", 900.0),
            ("_prefix_attention_kernel", 4000.0),
            ("nvjet_a", 2000.0),
            ("void at::native::copy", 1000.0),
        ],
        steps=2,
        total_us=8000.0,
    )
    assert got["trace kernel"] == 2.0 and got["matrix products"] == 1.0 and got["other"] == 0.5
    assert got["below the listed rows"] == 0.5
    # the block keys' gradient kernel is the trace kernel's too; runtime events are no device work
    assert tt.profile_kind("_block_grad_kernel") == "trace kernel"
    assert tt.profile_kind("Command Buffer Full") is None and tt.profile_kind("cudaGraphLaunch") is None
    got = tt.profile_breakdown(
        [("Command Buffer Full", 3e7), ("_prefix_attention_kernel", 4000.0), ("_block_grad_kernel", 1000.0)],
        steps=1,
        total_us=6000.0,
    )
    assert got["trace kernel"] == 5.0 and got["other"] == 0.0
    assert got["below the listed rows"] == 1.0  # the table's total (torch's) leaves the runtime events out


def test_counted_flops_follow_what_the_step_computes():
    """The LM head's logits are computed three times (forward, again in backward, the input gradient: 6 V D per
    target) when recomputed, twice (4 V D) when kept; the rest of the count does not change."""
    import importlib.util

    from cacheaug import CoprocessorConfig, build_model
    from cacheaug.testing import tiny_model

    spec = importlib.util.spec_from_file_location("tt", ROOT / "benchmarks" / "train_throughput.py")
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    model = build_model(tiny_model("gemma3"), CoprocessorConfig(n_latents=4, n_ahead=4, n_traces=2))
    V, D = model.base.get_input_embeddings().weight.shape
    assert model.recompute_loss
    recomputed = tt.step_flops(model, B=2, T=32, K=2)
    model.recompute_loss = False
    assert recomputed - tt.step_flops(model, B=2, T=32, K=2) == 2 * V * D * 2 * 2 * 4


def test_random_270m_is_gemma3_270ms_architecture():
    """The benchmarks' --model random-270m (cacheaug.testing.random_gemma3_270m): Gemma 3 270M's architecture at random
    weights (its published 268,098,176 parameters; five sliding layers to one full; its two rotary bases)."""
    import torch

    from cacheaug.testing import random_gemma3_270m

    with torch.device("meta"):
        model = random_gemma3_270m("meta")
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    cfg = model.config
    assert cfg.layer_types.count("full_attention") == 3 and cfg.layer_types[5] == "full_attention"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window) == (4, 1, 256, 512)
    assert {k: v["rope_theta"] for k, v in cfg.rope_parameters.items()} == {
        "sliding_attention": 1e4,
        "full_attention": 1e6,
    }


@pytest.mark.slow  # slow tier: a benchmark end to end
def test_serve_latency_runs_at_toy_size(tmp_path):
    out = tmp_path / "s.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "serve_latency.py"),
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--prompt-lens",
        "32",
        "--latents",
        "2",
        "--repeats",
        "1",
        "--tokens",
        "4",
        "--concurrency",
        "1",
        "3",
        "--coprocessor-priority",
        "high",
        "--coprocessor-graphs",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert json.loads(out.read_text())["coprocessor_priority"] == "high"
    assert json.loads(out.read_text())["coprocessor_graphs"] is True
    (row,) = json.loads(out.read_text())["rows"]
    # every single-prefix call went through the bucketed path (no GPU: run eagerly, no replay)
    assert row["coprocessor_graph_calls"] >= 2 and row["coprocessor_graph_buckets"] == [256]
    assert row["coprocessor_graph_replays"] == 0 and row["coprocessor_graphs_max_abs_diff"] <= 1e-4
    assert row["ttft_off_s"] > 0 and row["ttft_sync_s"] > 0 and "augment_vs_8_tokens" in row
    assert row["engine_step_s"] > 0 and row["hf_static_step_s"] > 0  # beside Hugging Face's static-cache generate
    # (the row's figures are rounded to 5 decimals: their ratio is close to, not equal to, the reported one)
    assert row["engine_vs_hf_static"] == pytest.approx(row["engine_step_s"] / row["hf_static_step_s"], rel=0.05)
    assert all(row[f"tokens_per_s_c{c}_{p}"] > 0 for c in (1, 3) for p in ("off", "async", "off_dynamic"))
    compiles = [row[f"compiles_c{c}_{p}"] for c in (1, 3) for p in ("off", "async")]
    assert compiles == sorted(compiles) and all(isinstance(n, int) and n >= 0 for n in compiles)
    assert row["engine_dynamic_step_s"] > 0 and row["cuda_graphs"] is False  # the slab, eager on the CPU
    assert row["static_agrees_tokens"] == 4  # fp32 on the CPU: the static and dynamic paths agree on every token
    # what the async insertions cost the loop: one figure per augmented request, at batch 1 and at each concurrency
    augmented = [o == "augmented" for o in row["async_outcomes"]]
    assert (row["async_insert_s"] is not None) == any(augmented) and (row["async_insert_s"] or 0) >= 0
    for c in (1, 3):  # counted from each request's own outcome, and again from its tokens' steps
        assert 0 <= row[f"augmented_c{c}_async"] <= c
        assert row[f"augmented_c{c}_async"] == row[f"augmented_steps_c{c}_async"]
        calls = row[f"insert_calls_c{c}_async"]  # requests whose latents were ready together share one
        assert (row[f"augmented_c{c}_async"] > 0) == (0 < calls <= row[f"augmented_c{c}_async"])
        assert (row[f"insert_s_c{c}_async"] is None) == (row[f"augmented_c{c}_async"] == 0)
        assert row[f"insert_total_s_c{c}_async"] >= (row[f"insert_s_c{c}_async"] or 0)
    assert row["augmented_c1_async"] + row["augmented_c3_async"] >= 1  # (all 4 on a CPU: the latents come in 2 tokens)


@pytest.mark.slow  # slow tier: a benchmark end to end
def test_coprocessor_process_runs_at_toy_size(tmp_path):
    out = tmp_path / "p.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "coprocessor_process.py"),
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--prompt-len",
        "32",
        "--latents",
        "2",
        "--repeats",
        "2",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    row = json.loads(out.read_text())
    assert row["in_process_s"] > 0 and row["separate_s"] > 0 and row["child_start_s"] > 0
    assert row["max_abs_diff"] <= 1e-5  # the child computes the same latents from the handed-over cache
    assert row["overhead_s"] == pytest.approx(row["separate_s"] - row["in_process_s"], abs=2e-6)
    # the same calls beside a thread that decoded meanwhile (steps timed alone and beside each)
    assert all(
        row[k] > 0
        for k in (
            "decode_step_s",
            "in_process_beside_decoding_s",
            "separate_beside_decoding_s",
            "decode_step_beside_in_process_s",
            "decode_step_beside_separate_s",
        )
    )


@pytest.mark.slow  # slow tier: a benchmark end to end
def test_trace_attention_runs_at_toy_size(tmp_path):
    """One layer's attention in every layout; the kernel rows (its torch reference on the CPU) per pass and setting,
    with their differences from the sdpa windows and the scale beside them; pick_tiles refuses a sweep without
    Triton rows."""
    out = tmp_path / "a.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "trace_attention.py"),
        "--device",
        "cpu",
        "--steps",
        "1",
        "--batch",
        "1",
        "--traces",
        "8",
        "--seq-len",
        "96",
        "--window",
        "32",
        "--block",
        "5",
        "--chunks",
        "4",
        "--kernel-tiles",
        "64,64,4,2",
        "32,32,4,1",
        "--kernel-backward-tiles",
        "64,32,4,2",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    kernel = [r for r in rows if r["layout"].startswith("kernel")]
    # sliding: one trace per row; full: one trace per row and chunks of 4; each 2 forward settings, 1 backward, and
    # forward + backward with the mask on every tile
    assert len(kernel) == 3 * 4 and sorted({r["pass"] for r in kernel}) == [
        "forward",
        "forward+backward",
        "forward+backward, mask on every tile",
    ]
    for r in kernel:
        for name in ("out", "dq", "dk_block", "dv_block"):
            assert r[f"max_abs_diff_{name}"] <= 1e-4 * max(1.0, r[f"max_abs_{name}"]) and r[f"max_abs_{name}"] > 0
        assert r["kernel"] == "torch reference" and r["ms"] > 0 and 0 < r["mean_text_keys_read"] <= 96
        # the columns every query sees: a sliding row's last query still sees W - L of its keys (32 - 5 here)
        assert 0 < r["mean_text_keys_unmasked"] <= r["mean_text_keys_read"]
        if r["layer"] == "sliding_attention":
            assert r["mean_text_keys_unmasked"] <= 32 - 5 + 1
    assert {r["layout"] for r in rows} >= {"chunk 4", "windows", "windows, chunk 4", "kernel", "kernel, chunk 4"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "pick_tiles.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "no Triton kernel rows" in run.stderr
    # --kernel-only: the kernel rows of one trace per row alone (no sdpa layout timed), the same differences
    cmd += ["--kernel-only"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    only = json.loads(out.read_text())["rows"]
    assert {r["layout"] for r in only} == {"kernel"} and len(only) == 2 * 3
    assert {r["pass"] for r in only} == {"forward", "forward+backward"}


def test_kernel_registers_compiles_for_the_gpu_without_one(tmp_path):
    """benchmarks/kernel_registers.py compiles the trace kernel for sm_90a on this CPU machine and reports what a
    thread uses (ptxas) for the forward and both backward kernels; a small head size does not spill."""
    out = tmp_path / "k.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "kernel_registers.py"),
        "--head-dim",
        "32",
        "--tiles",
        "16,16,4,1",
        "--backward-tiles",
        "16,16,4,1",
        "--block-tiles",
        "16,16,4,1",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pass"], r["tiles"]) for r in rows] == [
        ("forward", "16,16,4,1"),
        ("backward", "16,16,4,1"),
        ("backward, block dK/dV", "16,16,4,1"),
    ]
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["spill_store_bytes"] == 0 and 0 < r["shared_bytes"] <= 232448
        assert r["specialized"] is True


def test_kernel_registers_compiles_as_a_launch_specializes(tmp_path):
    """Compiled with a real call's arguments (multiples of 16 marked divisible, as a launch does), the key and value
    loads are pipelined over num_stages buffers; without (--no-specialize) they are not, whatever num_stages says."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kr", ROOT / "benchmarks" / "kernel_registers.py")
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    assert [kr._specialize(x) for x in (1, 16, 31)] == [1, "D", ""]  # Triton's rule (or its copy, older Tritons)
    specs = kr.runtime_specialization(queries_per_trace=31, head_dim=32, traces=16, seq_len=256, window=64)
    fwd, bwd = specs[False], specs[True]
    # the cache's sequence stride (head size 32) is a multiple of 16, the row's query count (4 x 31) is not; the
    # mask's last-dim stride is 1, which Triton makes a constant
    assert fwd["stk_s"] == "D" and fwd["M"] == "" and fwd["sb_n"] == 1 and fwd["TK"] == "D"
    # the queries, their gradients and the forward's output as the model lays them out: head and row strides of
    # multiples of the head size
    assert all(bwd[k] == "D" for k in ("sq_g", "sq_i", "sdo_g", "sdo_i", "so_g", "so_i"))
    assert specs["block"]["sq_i"] == "D" and specs["block"]["sdo_i"] == "D"
    on = kr.compile_report("16,16,4,2", False, 32, specialization=fwd)
    off = kr.compile_report("16,16,4,2", False, 32)
    assert on["pipelined_loads"] > 0 and off["pipelined_loads"] == 0 and on["specialized"] and not off["specialized"]
    # occupancy: 255 registers x 128 threads leave room for two blocks of 4 warps, one of 8; shared memory can bind
    assert kr.programs_per_sm(100 * 1024, 255, 4) == 2 and kr.programs_per_sm(100 * 1024, 255, 8) == 1
    assert kr.programs_per_sm(135 * 1024, 255, 4) == 1 and kr.programs_per_sm(0, 32, 1) == 32


def test_throughput_plot_reads_every_session(tmp_path):
    """experiments/plot_throughput.py keeps the one-GPU K=16/K=128 rows of every results/speedNN report (not the
    profiled, failed, multi-GPU or per-trace-loop rows) and prints the fastest of each session and K."""

    def report(path, batch, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"batch": batch, "rows": rows}))

    report(
        tmp_path / "speed3" / "a" / "k128.json",
        8,
        [
            {"variant": "v1", "config": "copy:16", "K": 128, "traces_per_s": 5000.0},
            {"variant": "v1", "config": "copy:16 profiled", "K": 128, "traces_per_s": 9999.0},
            {"variant": "v1", "config": "copy:16 B=16", "K": 128, "traces_per_s": 5500.0},
            {"variant": "v2", "error": "OutOfMemoryError"},
            {"variant": "v1", "config": "copy:16", "K": 128, "loop": True, "traces_per_s": 9999.0},
        ],
    )
    report(
        tmp_path / "speed12" / "k16.json",
        32,
        [
            {"variant": "v3", "config": "copy:16", "K": 16, "traces_per_s": 4000.0},
            {"variant": "v3", "config": "copy:16 ddp", "K": 16, "world": 2, "traces_per_s": 9999.0},
            {"variant": "v3", "config": "copy:16", "K": 64, "traces_per_s": 9999.0},
        ],
    )
    (tmp_path / "speed12" / "serve.json").write_text(json.dumps({"rows": [{"n_latents": 16}]}))  # another benchmark
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "k128.json").write_text(json.dumps({"rows": [{"K": 128, "traces_per_s": 9999.0}]}))
    out = tmp_path / "plot.png"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "plot_throughput.py"),
            "--results",
            str(tmp_path),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    best = [line.split() for line in run.stdout.splitlines() if line.startswith("K=")]
    assert [(b[0], b[2], b[3], b[6]) for b in best] == [("K=16", "12:", "4,000", "32"), ("K=128", "3:", "5,500", "16")]
    assert out.stat().st_size > 10_000 and "9,999" not in run.stdout
