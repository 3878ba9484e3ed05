"""save_pretrained / from_pretrained: safetensors + JSON, trainable weights only, base identity checked."""

import json

import pytest
import torch
from safetensors import safe_open

from cacheaug import CacheAugmentedLM, CoprocessorConfig, fingerprint
from cacheaug.testing import perturb_trainable, tiny_model


@pytest.mark.parametrize("init", ["copy", "lora"])
def test_round_trip_gives_identical_augmented_logits(tmp_path, init):
    base = tiny_model("gemma3")
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=3, n_ahead=4, init=init, lora_rank=4))
    perturb_trainable(model)
    prompt = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model.augment(prompt).logits
    model.save_pretrained(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["coprocessor_config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.trainable_state_dict())
    assert not any("embed" in k or "lm_head" in k for k in keys)
    meta = json.loads((tmp_path / "coprocessor_config.json").read_text())
    assert meta["coprocessor"]["init"] == init and meta["base_model"]["fingerprint"] == fingerprint(base)

    loaded = CacheAugmentedLM.from_pretrained(tmp_path, base=base)
    assert loaded.config == model.config
    assert torch.equal(loaded.augment(prompt).logits, expected)


def test_fingerprint_ignores_dtype_but_not_weights():
    base = tiny_model("llama")
    assert fingerprint(base) == fingerprint(tiny_model("llama").to(torch.bfloat16))
    assert fingerprint(base) != fingerprint(tiny_model("llama", seed=1))


def test_loading_onto_another_base_is_refused(tmp_path):
    CacheAugmentedLM(tiny_model("llama"), CoprocessorConfig(n_latents=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fingerprint") as wrong:
        CacheAugmentedLM.from_pretrained(tmp_path, base=tiny_model("llama", seed=1))
    # issue 38.18: the fix a command-line user can apply (no command offers check_base=False)
    assert "Pass --model" in str(wrong.value) and "if you are sure" not in str(wrong.value)
    other_family = tiny_model("gemma3")
    with pytest.raises(ValueError, match="trained for base model"):
        CacheAugmentedLM.from_pretrained(tmp_path, base=other_family)
    with pytest.raises(ValueError, match="does not match"):  # forced past the check: weights still must fit
        CacheAugmentedLM.from_pretrained(tmp_path, base=tiny_model("qwen3"), check_base=False)


def test_incomplete_or_corrupt_checkpoints_are_refused(tmp_path):
    base = tiny_model("llama")
    CacheAugmentedLM(base, CoprocessorConfig(n_latents=2)).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CacheAugmentedLM.from_pretrained(tmp_path, base=base)
    (tmp_path / "coprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        CacheAugmentedLM.from_pretrained(tmp_path, base=base)
    with pytest.raises(FileNotFoundError, match="coprocessor_config.json"):
        CacheAugmentedLM.from_pretrained(tmp_path / "nowhere", base=base)


def test_newer_config_keys_warn(tmp_path):
    base = tiny_model("llama")
    CacheAugmentedLM(base, CoprocessorConfig(n_latents=2)).save_pretrained(tmp_path)
    path = tmp_path / "coprocessor_config.json"
    meta = json.loads(path.read_text())
    meta["coprocessor"]["future_option"] = 1
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="future_option"):
        CacheAugmentedLM.from_pretrained(tmp_path, base=base)


def test_a_run_folder_resolves_to_its_newest_checkpoint(tmp_path):
    from cacheaug.checkpoint import resolve_checkpoint
    from cacheaug.cli import _check_checkpoints

    for step in (100, 300, 200):
        (tmp_path / "run" / f"step_{step:06d}").mkdir(parents=True)
        (tmp_path / "run" / f"step_{step:06d}" / "coprocessor_config.json").write_text(
            '{"coprocessor": {}, "base_model": {"fingerprint": "f"}}'
        )
    (tmp_path / "run" / "step_000400").mkdir()  # an interrupted save: no config, never chosen
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "step_000300"
    assert resolve_checkpoint(tmp_path / "run" / "step_000100") == tmp_path / "run" / "step_000100"
    paths = [str(tmp_path / "run")]
    _check_checkpoints(paths)
    assert paths == [str(tmp_path / "run" / "step_000300")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="nor a training run folder"):
        _check_checkpoints([str(tmp_path / "empty")])


def test_weights_only_export_loads_and_is_smaller(tmp_path):
    """Issue 38.21: checkpoints carry the optimizer state (two thirds of their size); `cacheaug export` writes a
    weights-only copy, bf16 on request, that loads like any checkpoint."""
    from cacheaug.cli import main
    from cacheaug.testing import perturb_trainable

    base = tiny_model("llama")
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=3, n_ahead=4))
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "ckpt")
    main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path / "ckpt" / "model.safetensors"
    ).stat().st_size
    back = CacheAugmentedLM.from_pretrained(tmp_path / "bf16", base=base)
    for (name, a), b in zip(model.trainable_state_dict().items(), back.trainable_state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name


def test_the_shipped_coprocessor_is_a_small_checkpoint_that_refuses_another_base():
    """The coprocessor shipped with cacheaug (`gemma-3-270m-skills`) is an ordinary checkpoint folder under 50 MB with
    its gate and its README, found by its short name, and refused (by fingerprint) on any other decoder."""
    from cacheaug.checkpoint import SHIPPED, resolve_checkpoint, shipped_checkpoint

    (name,) = SHIPPED
    folder = resolve_checkpoint(name)
    assert folder == shipped_checkpoint(name) and (folder / "README.md").is_file()
    assert sum(f.stat().st_size for f in folder.iterdir()) < 50e6
    assert {"model.safetensors", "coprocessor_config.json", "gate.safetensors", "gate_config.json"} <= {
        f.name for f in folder.iterdir()
    }
    with pytest.raises(ValueError, match="fingerprint"):
        CacheAugmentedLM.from_pretrained(folder, base=tiny_model("gemma3"))


def test_from_pretrained_without_a_base_loads_the_recorded_one(tmp_path):
    """`CacheAugmentedLM.from_pretrained(path)`, as PEFT's AutoPeftModel does: the base model the checkpoint records
    is loaded (with its tokenizer, at `model.tokenizer`), and the result equals loading onto that base by hand."""
    from cacheaug import load_base_model
    from cacheaug.testing import tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer(["one two three four five six"]).save_pretrained(tmp_path / "base")
    base, tok = load_base_model(str(tmp_path / "base"), device="cpu")
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=2, n_ahead=3))
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert model.tokenizer is None  # built by hand: no tokenizer attached

    loaded = CacheAugmentedLM.from_pretrained(tmp_path / "ckpt", device="cpu")
    prompt = tok(["one two three four five"], return_tensors="pt").input_ids
    assert loaded.tokenizer is not None and loaded.tokenizer("one two").input_ids == tok("one two").input_ids
    assert torch.equal(loaded.augment(prompt).logits, model.augment(prompt).logits)
    with pytest.raises(ValueError, match="move a given base yourself"):
        CacheAugmentedLM.from_pretrained(tmp_path / "ckpt", base=base, device="cpu")
    # a checkpoint whose base has no name (a model built in memory) says what to pass
    CacheAugmentedLM(tiny_model("llama"), CoprocessorConfig(n_latents=2)).save_pretrained(tmp_path / "anon")
    with pytest.raises(ValueError, match="does not record its base model's name"):
        CacheAugmentedLM.from_pretrained(tmp_path / "anon")
