"""The parallel multi-trace training pass equals inference (augment, then plain decoding), trace by trace."""

import pytest
import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.testing import FAMILIES, WINDOW, attn_for, max_trace_error, perturb_trainable, tiny_model

T = 40
CASES = [(f, a) for f in FAMILIES for a in ("sdpa", "eager") if a != "sdpa" or attn_for(f) == "sdpa"]
# Row 1 repeats an insertion point on purpose; 0 and T-1-N_A are the extremes.
POSITIONS = torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]])


def _model(family, attn, init="copy", n_latents=3, n_ahead=5):
    base = tiny_model(family, attn)
    cfg = CoprocessorConfig(n_latents=n_latents, n_ahead=n_ahead, n_traces=4, init=init, lora_rank=4)
    model = CacheAugmentedLM(base, cfg)
    perturb_trainable(model)
    return model


def _check_all_traces(model, ids, positions):
    worst, out = max_trace_error(model, ids, positions)
    assert out.token_losses.shape == (*positions.shape, model.config.n_ahead)
    assert worst <= 1e-4, f"training pass differs from augment+decode by {worst}"
    return out


@pytest.mark.parametrize("family,attn", CASES)
def test_training_pass_equals_inference(family, attn):
    model = _model(family, attn)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    out = _check_all_traces(model, ids, POSITIONS)
    # the latents must matter, or the equality above would be vacuous
    assert (out.token_losses - out.base_token_losses).abs().max() > 1e-2


@pytest.mark.parametrize("init", ["copy", "lora", "scratch", "pause"])
def test_equivalence_for_every_init(init):
    model = _model("gemma3", "sdpa", init=init)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(1))
    _check_all_traces(model, ids, POSITIONS)


def test_equivalence_with_long_blocks_across_the_window():
    # N_L + N_A - 1 = 14 > window 8: later ahead tokens no longer see the latents on sliding layers
    model = _model("gemma3", "eager", n_latents=6, n_ahead=9)
    assert model.config.n_latents + model.config.n_ahead - 1 > WINDOW
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(2))
    _check_all_traces(model, ids, torch.tensor([[0, 5, 17, 30]]))


def test_base_losses_are_the_frozen_models_own():
    model = _model("qwen3", "sdpa")
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(3))
    out = model(ids, positions=POSITIONS, return_base_losses=True)
    logits = model.base(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
    for b in range(2):
        for k, p in enumerate(POSITIONS[b].tolist()):
            expected = nll[b, p : p + model.config.n_ahead]
            assert torch.allclose(out.base_token_losses[b, k], expected, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_trace_sees_exactly_its_prefix_and_targets(family):
    model = _model(family, "sdpa")
    n_ahead = model.config.n_ahead
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 128, (1, T), generator=g)
    p = 17
    base_out = model(ids, positions=[p]).token_losses[0, 0]

    later = ids.clone()
    later[0, p + n_ahead + 1 :] = torch.randint(3, 128, (T - p - n_ahead - 1,), generator=g)
    assert torch.equal(model(later, positions=[p]).token_losses[0, 0], base_out)

    for j in (0, p // 2, p):  # any token at or before the insertion point
        earlier = ids.clone()
        earlier[0, j] = (ids[0, j] + 1) % 125 + 3
        assert (model(earlier, positions=[p]).token_losses[0, 0] - base_out).abs().max() > 1e-4

    target = ids.clone()  # the last target token changes only the last offset's loss
    target[0, p + n_ahead] = (ids[0, p + n_ahead] + 1) % 125 + 3
    diff = (model(target, positions=[p]).token_losses[0, 0] - base_out).abs()
    assert diff[-1] > 1e-4 and diff[:-1].max() == 0
