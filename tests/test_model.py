"""Frozen decoder, gradients, generation and fallback, coprocessor inits."""

import warnings

import pytest
import torch
import torch.nn as nn

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.testing import perturb_trainable, tiny_model

CFG = CoprocessorConfig(n_latents=3, n_ahead=4, n_traces=4, lora_rank=4)


def _ids(b=2, t=32, seed=0):
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("init", ["copy", "lora", "scratch", "pause"])
def test_base_frozen_and_gradients_reach_only_the_coprocessor(init):
    base = tiny_model("gemma3")
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    model = CacheAugmentedLM(base, CoprocessorConfig(**{**CFG.to_dict(), "init": init}))
    perturb_trainable(model)  # LoRA's B = 0 would (correctly) give lora_A a zero first gradient
    model.train()
    assert not base.training and model.coprocessor.training
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for step in range(3):
        out = model(_ids(seed=step))
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            assert all(p.grad is None for p in base.parameters())
            grads = {n: p.grad for n, p in model.coprocessor.named_parameters() if p.requires_grad}
            assert grads and all(g is not None for g in grads.values())
            assert grads["soft_tokens"].abs().sum() > 0 and grads["latent_scale"].abs().sum() > 0
            nonzero = sum(bool(g.abs().sum() > 0) for g in grads.values())
            assert nonzero == len(grads), f"{len(grads) - nonzero} trainable tensors got zero gradient"
        opt.step()
    for n, t in base.state_dict().items():
        assert torch.equal(t, before[n]), f"base tensor {n} changed"


def test_lora_shares_base_weights_and_leaves_base_modules_alone():
    base = tiny_model("llama")
    model = CacheAugmentedLM(base, CoprocessorConfig(init="lora", lora_rank=4, n_latents=3, n_ahead=4))
    q_base = base.model.layers[0].self_attn.q_proj
    q_cop = model.coprocessor.backbone.layers[0].self_attn.q_proj
    assert type(q_base) is nn.Linear  # the decoder's module was not replaced
    assert q_cop.base_layer.weight is q_base.weight  # one copy of the weights in memory
    names = [n for n, p in model.coprocessor.named_parameters() if p.requires_grad]
    assert set(names) - {"soft_tokens", "latent_scale"} and all(
        "lora_" in n for n in names if n not in ("soft_tokens", "latent_scale")
    )


def test_coprocessor_has_no_embedding_or_head():
    base = tiny_model("gemma3")
    for init in ("copy", "scratch"):
        model = CacheAugmentedLM(base, CoprocessorConfig(init=init, n_latents=3))
        assert model.coprocessor.backbone.embed_tokens is None
        n_cop = sum(p.numel() for p in model.trainable_parameters())
        n_emb = base.get_input_embeddings().weight.numel()
        n_body = sum(p.numel() for p in base.parameters()) - n_emb
        assert n_cop == n_body + 3 * 64 + 1  # backbone + soft tokens + scale


def test_copy_and_scratch_differ_and_copy_matches_decoder():
    base = tiny_model("qwen2")
    copy = CacheAugmentedLM(base, CoprocessorConfig(init="copy"))
    scratch = CacheAugmentedLM(base, CoprocessorConfig(init="scratch"))
    w = base.model.layers[1].mlp.up_proj.weight
    assert torch.equal(copy.coprocessor.backbone.layers[1].mlp.up_proj.weight, w)
    assert copy.coprocessor.backbone.layers[1].mlp.up_proj.weight is not w
    assert not torch.allclose(scratch.coprocessor.backbone.layers[1].mlp.up_proj.weight, w)
    again = CacheAugmentedLM(base, CoprocessorConfig(init="scratch"))  # seeded: repeatable
    assert torch.equal(
        again.coprocessor.backbone.layers[1].mlp.up_proj.weight,
        scratch.coprocessor.backbone.layers[1].mlp.up_proj.weight,
    )


def test_sampled_positions_are_distinct_sorted_and_valid():
    model = CacheAugmentedLM(tiny_model("mistral"), CoprocessorConfig(n_latents=2, n_ahead=4, n_traces=6))
    out = model(_ids(b=3, t=20), generator=torch.Generator().manual_seed(0))
    pos = out.positions
    assert pos.shape == (3, 6)
    assert (pos[:, 1:] > pos[:, :-1]).all() and pos.min() >= 0 and pos.max() <= 20 - 1 - 4
    again = model(_ids(b=3, t=20), generator=torch.Generator().manual_seed(0)).positions
    assert torch.equal(pos, again)


@pytest.mark.parametrize("family,attn", [("gemma3", "sdpa"), ("gemma2", "eager"), ("qwen2", "sdpa")])
def test_generate_without_augmentation_is_base_generate(family, attn):
    base = tiny_model(family, attn)
    model = CacheAugmentedLM(base, CFG)
    prompt = _ids(b=2, t=9)
    expected = base.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, 12, augment=False), expected)
    model.enabled = False
    assert torch.equal(model.generate(prompt, 12), expected)


def test_the_frozen_decoder_alone_is_a_real_state():
    """CacheAugmentedLM.frozen: no coprocessor object at all (not a disabled placeholder); decoding is the base
    model's, and whatever needs a coprocessor says so in one line."""
    base = tiny_model("gemma3")
    model = CacheAugmentedLM.frozen(base)
    assert model.coprocessor is None and not model.enabled and list(model.parameters()) == list(base.parameters())
    prompt = _ids(b=2, t=9)
    assert torch.equal(model.generate(prompt, 6), base.generate(prompt, max_new_tokens=6, do_sample=False))
    for call in (
        lambda: model.augment(prompt),
        lambda: model(prompt),
        lambda: model.trainable_parameters(),
        lambda: model.save_pretrained("unused"),
    ):
        with pytest.raises(ValueError, match="frozen decoder alone"):
            call()


def test_failing_coprocessor_falls_back_to_base_generate():
    base = tiny_model("gemma3")
    model = CacheAugmentedLM(base, CFG)
    prompt = _ids(b=1, t=7)
    expected = base.generate(prompt, max_new_tokens=10, do_sample=False)

    def boom(*args, **kwargs):
        raise RuntimeError("coprocessor crashed")

    model.coprocessor.forward = boom
    with pytest.warns(UserWarning, match="coprocessor crashed"):
        got = model.generate(prompt, 10)
    assert torch.equal(got, expected)


def test_augmented_generate_decodes_from_the_augmented_cache():
    base = tiny_model("llama")
    model = CacheAugmentedLM(base, CFG)
    perturb_trainable(model, scale=1.0)
    prompt = _ids(b=1, t=6)
    got = model.generate(prompt, 8, eos_token_id=[])  # no early stop: compare all 8 steps
    aug = model.augment(prompt)
    assert aug.cache.get_seq_length() == 6 + 3 and aug.latents.shape == (1, 3, 64)
    tokens, logits = [], aug.logits
    for _ in range(8):
        tokens.append(logits.argmax(-1))
        logits = base(input_ids=tokens[-1][:, None], **{model.family.cache_kwarg: aug.cache}).logits[:, -1]
    assert torch.equal(got, torch.cat([prompt, torch.stack(tokens, 1)], 1))
    plain = base.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert not torch.equal(got, plain)  # the latents changed the continuation


def test_augment_reuses_a_given_prompt_cache_without_modifying_it():
    from transformers import DynamicCache

    base = tiny_model("qwen3")
    model = CacheAugmentedLM(base, CFG)
    perturb_trainable(model)
    prompt = _ids(b=2, t=11)
    cache = DynamicCache()
    base.get_decoder()(input_ids=prompt, use_cache=True, **{model.family.cache_kwarg: cache})
    got = model.augment(prompt, past_key_values=cache)
    assert cache.get_seq_length() == 11
    assert torch.allclose(got.logits, model.augment(prompt).logits, atol=1e-5)


def test_sampling_is_seeded():
    model = CacheAugmentedLM(tiny_model("gemma3"), CFG)
    prompt = _ids(b=2, t=5)
    a = model.generate(prompt, 6, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 11)


def test_no_warnings_in_the_training_pass():
    model = CacheAugmentedLM(tiny_model("gemma3"), CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(_ids()).loss.backward()


def test_pause_control_is_context_free():
    model = CacheAugmentedLM(tiny_model("gemma3"), CoprocessorConfig(init="pause", n_latents=3, n_ahead=4))
    assert model.coprocessor.backbone is None
    assert [n for n, _ in model.coprocessor.named_parameters()] == ["soft_tokens", "latent_scale"]
    a = model.augment(_ids(b=1, t=8, seed=0)).latents
    b = model.augment(_ids(b=1, t=13, seed=1)).latents
    assert torch.equal(a, b)
    copro = CacheAugmentedLM(tiny_model("gemma3"), CoprocessorConfig(n_latents=3, n_ahead=4))
    assert not torch.equal(
        copro.augment(_ids(b=1, t=8, seed=0)).latents, copro.augment(_ids(b=1, t=13, seed=1)).latents
    )


def test_stale_latents_are_those_of_the_shorter_prefix_inserted_later():
    model = CacheAugmentedLM(tiny_model("gemma3"), CFG)
    perturb_trainable(model)
    prompt = _ids(b=2, t=14)
    stale = model.augment(prompt, stale_by=4)
    assert torch.allclose(stale.latents, model.augment(prompt[:, :10]).latents, atol=1e-6)
    assert stale.cache.get_seq_length() == 14 + 3  # inserted after the whole prompt
    fresh = model.augment(prompt)
    assert torch.equal(model.augment(prompt, stale_by=0).logits, fresh.logits)
    assert not torch.allclose(stale.logits, fresh.logits)
    for bad in (-1, 14, 2.0):
        with pytest.raises(ValueError, match="stale_by"):
            model.augment(prompt, stale_by=bad)
