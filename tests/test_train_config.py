"""TrainConfig in sections: the same flags, YAML keys and run_config.json as when it was flat."""

import argparse
import json

import pytest

from cacheaug.cli import build_parser, resolve_train_config
from cacheaug.config import CoprocessorConfig
from cacheaug.train_config import SECTIONS, OptimConfig, SpeedConfig, TrainConfig

# every option of `cacheaug train` while TrainConfig was one flat class (commit 459daab): none may go away
FLAT_OPTIONS = [
    "model", "data", "out_dir", "n_latents", "n_ahead", "n_traces", "init", "lora_rank", "position_scheme",
    "reread_last", "echo_residual", "readout", "offset_decay", "seq_len", "batch_size", "grad_accum", "heldout_pct",
    "adapt_pct", "heldout_sources", "insertion", "marker", "max_steps", "max_minutes", "lr", "soft_token_lr",
    "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "parallel", "device", "dtype", "attn_implementation",
    "compile_mlp", "compile_masks", "compile_step", "keep_logits", "trace_groups", "trace_chunk", "trace_windows",
    "trace_kernel", "rope_table", "compile_cache", "eval_every", "eval_sequences", "log_every", "save_every",
    "keep_last", "resume", "seed",
]  # fmt: skip


def test_every_flat_option_is_in_exactly_one_section_and_a_flag():
    names = [f.name for _, f in TrainConfig.flat_fields()]
    assert sorted(names) == sorted(FLAT_OPTIONS) and len(set(names)) == len(names)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train._actions if a.option_strings} - {"help", "config"}
    assert flags == set(FLAT_OPTIONS)
    cfg = TrainConfig()
    assert isinstance(cfg.coprocessor, CoprocessorConfig) and set(SECTIONS) <= set(vars(cfg))


def test_flat_options_go_to_their_sections_and_back():
    cfg = TrainConfig.from_flat(lr=3e-4, n_latents=32, seq_len=256, trace_kernel=True, out_dir="r", seed=5)
    assert cfg.optim.lr == cfg.lr == 3e-4 and isinstance(cfg.optim, OptimConfig)
    assert cfg.coprocessor.n_latents == 32 and cfg.coprocessor.init_seed == 5  # the seed seeds the coprocessor too
    assert cfg.dataset.seq_len == 256 and cfg.speed.trace_kernel and cfg.checkpoint.out_dir == "r"
    flat = cfg.to_dict()
    assert set(flat) == set(FLAT_OPTIONS) and flat["lr"] == 3e-4 and flat["data"] == ["default"]
    assert TrainConfig.from_flat(**flat) == cfg  # what run_config.json holds rebuilds the same config
    assert cfg.replace(lr=1e-3).optim.lr == 1e-3 and cfg.replace(lr=1e-3).coprocessor == cfg.coprocessor
    with pytest.raises(AttributeError):
        cfg.no_such_option
    with pytest.raises(TypeError, match="unknown training options"):
        TrainConfig.from_flat(learning_rate=1e-3)
    with pytest.raises(ValueError) as err:  # every problem at once, named as flags
        TrainConfig.from_flat(lr=-1, n_latents=0, trace_groups=3)
    assert all(s in str(err.value) for s in ("--lr must be positive", "--n-latents", "--trace-groups 3"))
    with pytest.raises(ValueError, match="--seq-len 8 is too short"):  # sections built directly are checked too
        TrainConfig(dataset=SECTIONS["dataset"](seq_len=8))
    assert OptimConfig(warmup_steps=10, max_steps=100, min_lr_ratio=1.0).lr_multiplier(90) == 1.0  # constant


def test_yaml_keys_flat_or_grouped_by_section_and_the_command_line_over_them(tmp_path):
    flat, grouped = tmp_path / "flat.yaml", tmp_path / "grouped.yaml"
    flat.write_text("lr: 3.0e-4\nn_latents: 8\nkeep_logits: true\ndata: [a, b]\nout_dir: runs/x\n")
    grouped.write_text(
        "optim: {lr: 3.0e-4}\ncoprocessor: {n_latents: 8}\nspeed:\n  keep_logits: true\n"
        "dataset: {data: [a, b]}\ncheckpoint: {out_dir: runs/x}\n"
    )
    a = resolve_train_config(argparse.Namespace(config=str(flat)))
    b = resolve_train_config(argparse.Namespace(config=str(grouped)))
    assert a == b and a.optim.lr == 3e-4 and a.coprocessor.n_latents == 8 and a.speed == SpeedConfig(keep_logits=True)
    assert a.dataset.data == ("a", "b")
    c = resolve_train_config(argparse.Namespace(config=str(grouped), lr=1e-3))
    assert c.optim.lr == 1e-3 and c.coprocessor.n_latents == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {learning_rate: 1}\n")
    with pytest.raises(SystemExit, match="unknown keys.*learning_rate"):
        resolve_train_config(argparse.Namespace(config=str(bad)))


def test_shipped_configs_and_an_old_run_config_still_load(tmp_path):
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        cfg = resolve_train_config(argparse.Namespace(config=str(path)))
        assert cfg.speed.compile_step == "graphs" and cfg.coprocessor.n_latents == 16, path
    old = {  # run_config.json's "train" as a flat TrainConfig wrote it (the keys of FLAT_OPTIONS, lists for tuples)
        "model": "gemma-3-270m", "data": ["default"], "out_dir": "runs/x", "n_latents": 16, "n_ahead": 16,
        "n_traces": 16, "init": "copy", "lora_rank": 64, "position_scheme": "shared", "reread_last": True,
        "echo_residual": True, "readout": "final_norm", "offset_decay": 1.0, "seq_len": 1024, "batch_size": 32,
        "grad_accum": 1, "heldout_pct": 1.0, "adapt_pct": 50.0, "heldout_sources": ["sotu"], "insertion": "random",
        "marker": " Answer:", "max_steps": 600, "max_minutes": 0.0, "lr": 0.0001, "soft_token_lr": 0.01,
        "weight_decay": 0.0, "warmup_steps": 60, "min_lr_ratio": 0.1, "grad_clip": 1.0, "parallel": "ddp",
        "device": None, "dtype": "auto", "attn_implementation": None, "compile_mlp": False, "compile_masks": False,
        "compile_step": "graphs", "keep_logits": True, "trace_groups": 1, "trace_chunk": 0, "trace_windows": False,
        "trace_kernel": False, "rope_table": False, "compile_cache": None, "eval_every": 0, "eval_sequences": 32,
        "log_every": 10, "save_every": 0, "keep_last": 3, "resume": True, "seed": 0,
    }  # fmt: skip
    cfg = TrainConfig.from_flat(**json.loads(json.dumps(old)))
    assert cfg.coprocessor.position_scheme == "shared" and cfg.dataset.heldout_sources == ("sotu",)
    assert cfg.to_dict() == old
