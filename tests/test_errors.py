"""Bad input gets a clear error, never a silent wrong answer."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.testing import tiny_model

CFG = CoprocessorConfig(n_latents=3, n_ahead=4, n_traces=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_latents": 0}, "n_latents"),
        ({"n_ahead": -1}, "n_ahead"),
        ({"n_traces": 1.5}, "n_traces"),
        ({"init": "clone"}, "init"),
        ({"lora_rank": 0}, "lora_rank"),
    ],
)
def test_config_out_of_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoprocessorConfig(**kwargs)


def test_sequence_too_short_for_traces():
    model = CacheAugmentedLM(tiny_model("llama"), CFG)
    with pytest.raises(ValueError, match="too short"):
        model(torch.randint(3, 128, (1, 7)))  # needs K + N_A = 8 tokens


@pytest.mark.parametrize("positions", [[-1, 3], [0, 28], [[1, 2]], [1.0, 2.0]])
def test_bad_positions(positions):
    model = CacheAugmentedLM(tiny_model("llama"), CFG)
    with pytest.raises(ValueError, match="positions|Insertion"):
        model(torch.randint(3, 128, (2, 32)), positions=torch.tensor(positions))


def test_bad_ids():
    model = CacheAugmentedLM(tiny_model("llama"), CFG)
    with pytest.raises(ValueError, match="integer"):
        model(torch.randn(1, 32))
    with pytest.raises(ValueError, match="meta"):
        model(torch.randint(3, 128, (1, 32), device="meta"))
    with pytest.raises(ValueError, match="empty"):
        model.augment(torch.zeros(1, 0, dtype=torch.long))


def test_dtype_mismatch_names_the_fix():
    model = CacheAugmentedLM(tiny_model("llama"), CFG)
    model.coprocessor.to(torch.bfloat16)
    with pytest.raises(ValueError, match="autocast"):
        model(torch.randint(3, 128, (1, 32)))


def test_non_finite_loss():
    model = CacheAugmentedLM(tiny_model("llama"), CFG)
    with torch.no_grad():
        model.coprocessor.soft_tokens.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="Non-finite"):
        model(torch.randint(3, 128, (1, 32)))


def test_prompt_beyond_context():
    model = CacheAugmentedLM(tiny_model("gemma3"), CFG)  # 256 positions
    with pytest.raises(ValueError, match="context"):
        model.augment(torch.randint(3, 128, (1, 254)))
    with pytest.raises(ValueError, match="context"):
        model(torch.randint(3, 128, (1, 255)))
    with pytest.raises(ValueError, match="context"):
        model.generate(torch.randint(3, 128, (1, 200)), max_new_tokens=60)


def test_foreign_cache_is_refused():
    model = CacheAugmentedLM(tiny_model("gemma3"), CFG)
    prompt = torch.randint(3, 128, (1, 10))
    other = tiny_model("llama")
    other.config.num_hidden_layers = 2
    cache = DynamicCache()
    AutoModelForCausalLM.from_config(other.config)(
        input_ids=prompt, use_cache=True, **{model.family.cache_kwarg: cache}
    )
    with pytest.raises(ValueError, match="layers"):
        model.augment(prompt, past_key_values=cache)
    own = DynamicCache()
    model.base(input_ids=prompt[:, :5], use_cache=True, **{model.family.cache_kwarg: own})
    with pytest.raises(ValueError, match="does not hold the prompt"):
        model.augment(prompt, past_key_values=own)


def test_unsupported_architecture_is_named():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        CacheAugmentedLM(gpt2, CFG)


def test_backend_without_custom_masks_is_refused():
    base = tiny_model("llama")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        CacheAugmentedLM(base, CFG)


def test_gemma2_softcap_is_never_silently_dropped():
    # transformers >= 5.2x refuses sdpa for Gemma-2 itself; 5.17 accepted it and dropped the soft-cap
    base = tiny_model("gemma2", "eager")
    base.config._attn_implementation = "sdpa"  # e.g. transformers 5.17, which allowed sdpa for Gemma-2
    with pytest.raises(ValueError, match="soft-capping"):
        CacheAugmentedLM(base, CFG)


def test_not_a_model():
    with pytest.raises(TypeError, match="causal LM"):
        CacheAugmentedLM("gemma-3-270m", CFG)


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    """Through the real command line: a bad checkpoint folder is one line on stderr, not a traceback."""
    import subprocess
    import sys

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "coprocessor_config.json").write_text("{not json")
    argv = [sys.executable, "-m", "cacheaug", "eval", "stale", "--checkpoint", str(tmp_path / "ckpt")]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    lines = plain.stderr.strip().splitlines()
    assert plain.returncode == 1 and len(lines) == 1 and "Traceback" not in plain.stderr, plain.stderr[-2000:]
    assert lines[0].startswith("cacheaug eval: error: ") and "corrupt" in lines[0] and "--debug" in lines[0]
    debug = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "corrupt" in debug.stderr


def test_every_subcommand_reads_its_options_from_a_dataclass(tmp_path):
    """Options, YAML (--config) and validation come from one dataclass per subcommand; bad values are one line."""
    from cacheaug.cli import main

    (tmp_path / "ppl.yaml").write_text("sequences: 0\nstride: 0\n")
    expected = r"^cacheaug eval ppl: --sequences must be at least 1, got 0; --stride must be at least 1, got 0$"
    with pytest.raises(SystemExit, match=expected):
        main(["eval", "ppl", "--checkpoint", "x", "--config", str(tmp_path / "ppl.yaml")])
    (tmp_path / "serve.yaml").write_text("bogus: 1\n")
    with pytest.raises(SystemExit, match="unknown keys .*bogus"):
        main(["serve", "--config", str(tmp_path / "serve.yaml")])
    for argv, match in (
        (["serve", "--port", "70000"], "cacheaug serve: --port must be in 0..65535"),
        (["eval", "insertion-cost", "--offsets", "0"], "--offsets must be at least 1"),
        (["eval", "stale", "--checkpoint", "x", "--delays", "-1"], "--delays must be at least 0"),
        (["eval", "synth", "--checkpoint", "x", "--heldout", str(tmp_path / "none.jsonl")], "no such file"),
        (["quickstart", "--steps", "0"], "cacheaug quickstart: --steps must be at least 1"),
    ):
        with pytest.raises(SystemExit, match=match):
            main(argv)


def _cli_error(argv, capsys) -> str:
    """The one line `cacheaug ARGV` exits with (in-process: the CLI's own error path)."""
    from cacheaug.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    text = str(exc.value.code) if exc.value.code not in (None, 0) else capsys.readouterr().err
    assert "Traceback" not in text
    return text


def test_user_errors_are_one_line_naming_the_fix(tmp_path, capsys, monkeypatch):
    """Issue 38.20: tracebacks for --device cuda without CUDA, a YAML syntax error, a wrongly typed YAML value,
    `--lr inf`, `serve --model ./nope`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "doc.txt").write_text("some text " * 50)
    data = ["--data", str(tmp_path / "doc.txt")]
    assert "no CUDA GPU" in _cli_error(["train", *data, "--device", "cuda", "--model", str(tmp_path)], capsys)
    assert "no CUDA GPU" in _cli_error(["serve", "--device", "cuda", "--model", str(tmp_path)], capsys)
    (tmp_path / "bad.yaml").write_text("lr: 1e-4\nn_latents: [1, 2\n")
    assert "not valid YAML (line 3" in _cli_error(["train", "--config", str(tmp_path / "bad.yaml")], capsys)
    (tmp_path / "typed.yaml").write_text("max_steps: ten\n")
    assert "key 'max_steps' must be of type int, got 'ten'" in _cli_error(
        ["train", "--config", str(tmp_path / "typed.yaml")], capsys
    )
    assert "--lr must be a finite number" in _cli_error(["train", *data, "--lr", "inf"], capsys)
    assert "is not a folder" in _cli_error(["serve", "--model", "./nope", "--device", "cpu"], capsys)
    # evaluations check their text sources before loading a model (eval ppl loaded Gemma first, then failed)
    missing = str(tmp_path / "no-such-corpus")
    for argv in (["eval", "ppl", "--checkpoint", "gemma-3-270m-skills"], ["eval", "insertion-cost"]):
        assert f"--data {missing}: no such file or folder" in _cli_error([*argv, "--data", missing], capsys)
    (tmp_path / "notes.log").write_text("text")
    assert "notes.log: not a data file; use .txt" in _cli_error(
        ["train", "--data", str(tmp_path / "notes.log")], capsys
    )


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; a config file's learning rate must still be a float."""
    from cacheaug.cli import build_parser, resolve_train_config

    (tmp_path / "c.yaml").write_text("lr: 1e-4\nwarmup_steps: '5'\ndata: [a, b]\n")
    cfg = resolve_train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")]))
    assert (cfg.lr, cfg.warmup_steps, cfg.data) == (1e-4, 5, ("a", "b"))


def test_eval_on_another_split_than_training_warns(tmp_path, capsys):
    """Issue 38.14: `eval ppl` accepted a split other than the checkpoint's and scored trained-on documents."""
    import json
    from types import SimpleNamespace

    from cacheaug.frontends import _warn_split_mismatch

    (tmp_path / "run" / "step_000002").mkdir(parents=True)
    (tmp_path / "run" / "run_config.json").write_text(
        json.dumps({"train": {"data": ["corpus"], "heldout_pct": 10.0, "adapt_pct": 0.0, "heldout_sources": []}})
    )
    same = SimpleNamespace(data=("corpus",), heldout_pct=10.0, adapt_pct=0.0, heldout_sources=())
    _warn_split_mismatch(same, [str(tmp_path / "run" / "step_000002")])
    assert capsys.readouterr().out == ""
    other = SimpleNamespace(data=("corpus",), heldout_pct=1.0, adapt_pct=0.0, heldout_sources=())
    _warn_split_mismatch(other, [str(tmp_path / "run" / "step_000002")])
    assert "--heldout-pct 1.0 (trained with 10.0)" in capsys.readouterr().out


def test_every_subcommand_has_a_help_page():
    """`cacheaug X --help` renders for every subcommand (argparse formats help strings with %: a bare % in one broke
    `train-gate --help`)."""
    import argparse

    from cacheaug.cli import build_parser

    def walk(parser, path):
        text = parser.format_help()
        assert "usage:" in text, path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])

    walk(build_parser(), ["cacheaug"])
