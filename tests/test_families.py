"""Adding a model family is one registry entry (docs/architecture.md, "How to add a model family"): a family
registered here, from the test file, with no edit anywhere else, passes the exactness check, trains, evaluates,
saves, loads and generates."""

import pytest
import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.base import default_attn_implementation
from cacheaug.evaluate import heldout_losses, relative_ppl_change
from cacheaug.families import FAMILIES, TINY_COMMON, FamilySpec, register_family, resolve_family
from cacheaug.testing import max_trace_error, perturb_trainable, tiny_corpus, tiny_model, tiny_tokenizer
from cacheaug.train import TrainConfig, train


@pytest.fixture
def phi3():
    """Phi-3 (model_type "phi3": fused qkv and gate-up projections, one mask for every layer), not built in."""

    def config():
        from transformers import Phi3Config

        return Phi3Config(**{k: v for k, v in TINY_COMMON.items() if k != "head_dim"})

    assert "phi3" not in FAMILIES
    spec = register_family(FamilySpec("phi3", "phi3", dict_masks=False, tiny_config=config))
    yield spec
    FAMILIES.pop("phi3")


def test_a_family_registered_from_outside_is_exact_trains_and_evaluates(phi3, tmp_path, monkeypatch):
    base = tiny_model("phi3")
    assert resolve_family(base).model_type == "phi3"
    assert default_attn_implementation(torch.device("cpu"), "phi3") == "sdpa"
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=3, n_ahead=5, n_traces=4))
    perturb_trainable(model)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    worst, out = max_trace_error(model, ids, torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]]))
    assert worst <= 1e-4 and (out.token_losses - out.base_token_losses).abs().max() > 1e-2

    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    tok = tiny_tokenizer(tiny_corpus(tmp_path / "corpus", n_docs=60))
    cfg = TrainConfig.from_flat(
        data=(str(tmp_path / "corpus"),),
        out_dir=str(tmp_path / "run"),
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
    final = train(cfg, base=tiny_model("phi3"), tokenizer=tok, progress=False)
    loaded = CacheAugmentedLM.from_pretrained(final, base=tiny_model("phi3"))
    losses = heldout_losses(
        loaded, torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(1)), n_points=4
    )
    assert len(relative_ppl_change(losses)) == cfg.n_ahead
    prompt = torch.tensor([[2, 5, 9, 14, 20]])
    assert loaded.generate(prompt, 4, augment=True, eos_token_id=[]).shape == (1, 9)


def test_an_unregistered_family_is_refused_by_name():
    from transformers import AutoModelForCausalLM, Phi3Config

    base = AutoModelForCausalLM.from_config(Phi3Config(**{k: v for k, v in TINY_COMMON.items() if k != "head_dim"}))
    with pytest.raises(ValueError, match="model_type='phi3'.*register_family"):
        CacheAugmentedLM(base, CoprocessorConfig())
