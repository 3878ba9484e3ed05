"""Adding an arm is one registry entry (docs/architecture.md, "How to add an arm"): an arm registered here, from the
test file, with no edit anywhere else, is validated, exact (training pass == augment + decoding), trains through
``cacheaug train``'s function, saves, loads by its name and evaluates; and no caller compares init strings."""

import re
from pathlib import Path

import pytest
import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig, build_model
from cacheaug.arms import ARMS, Arm, get_arm, register_arm
from cacheaug.cli import build_parser
from cacheaug.evaluate import heldout_losses, relative_ppl_change
from cacheaug.testing import max_trace_error, perturb_trainable, tiny_corpus, tiny_model, tiny_tokenizer
from cacheaug.train import TrainConfig, train


@pytest.fixture
def two_layer_arm():
    """A coprocessor whose backbone is the decoder's first two layers, trainable (not built in)."""

    def backbone(decoder, config):
        from cacheaug.coprocessor import copy_backbone

        copied = copy_backbone(decoder, config)
        copied.layers = copied.layers[:2]
        return copied

    assert "two-layer" not in ARMS
    arm = register_arm(Arm("two-layer", "the decoder's first two layers", backbone=backbone))
    yield arm
    ARMS.pop("two-layer")


def test_an_arm_registered_from_outside_is_exact_trains_and_evaluates(two_layer_arm, tmp_path, monkeypatch):
    cfg = CoprocessorConfig(n_latents=3, n_ahead=4, n_traces=4, init="two-layer")
    model = build_model(tiny_model("gemma3"), cfg)
    assert model.arm is two_layer_arm and len(model.coprocessor.backbone.layers) == 2
    perturb_trainable(model)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    worst, out = max_trace_error(model, ids, torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]]))
    assert worst <= 1e-4 and (out.token_losses - out.base_token_losses).abs().max() > 1e-2

    assert "two-layer" in build_parser().parse_args(["train", "--init", "two-layer"]).init  # the CLI's choices
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    tok = tiny_tokenizer(tiny_corpus(tmp_path / "corpus", n_docs=60))
    tc = TrainConfig.from_flat(
        data=(str(tmp_path / "corpus"),),
        out_dir=str(tmp_path / "run"),
        init="two-layer",
        seq_len=32,
        batch_size=2,
        n_latents=2,
        n_ahead=3,
        n_traces=4,
        max_steps=4,
        warmup_steps=1,
        eval_every=0,
        eval_sequences=2,
        log_every=1,
        save_every=0,
        heldout_pct=20.0,
    )
    final = train(tc, base=tiny_model("gemma3"), tokenizer=tok, progress=False)
    loaded = CacheAugmentedLM.from_pretrained(final, base=tiny_model("gemma3"))
    assert loaded.config.init == "two-layer" and len(loaded.coprocessor.backbone.layers) == 2
    losses = heldout_losses(loaded, torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(1)), 4)
    assert len(relative_ppl_change(losses)) == tc.n_ahead


def test_unknown_arms_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"`init` must be one of \('copy', 'lora'"):
        CoprocessorConfig(init="two-layer")
    assert not get_arm("lora-decoder").has_latents and get_arm("pause").backbone is None


def test_no_caller_compares_init_strings():
    """What differs between arms is read from the registry: no module outside arms.py dispatches on an init name."""
    src = Path(__file__).parent.parent / "src" / "cacheaug"
    pattern = re.compile(r"""init\s*(==|!=|in)\s*[("']|["'](pause|lora-decoder|copy|scratch)["']\s*(==|!=)""")
    offenders = [
        f"{p.name}:{i + 1}"
        for p in src.rglob("*.py")
        if p.name != "arms.py"
        for i, line in enumerate(p.read_text().splitlines())
        if pattern.search(line)
    ]
    assert not offenders, offenders
