"""The levers the paper leaves open (position schemes, token p read again, echo-residual start, pre-norm read-out,
per-offset loss weights): the training pass equals inference for each, in every family, and every inference path
(generate, serving, lm-eval) decodes with the positions the training pass used."""

import pytest
import torch
import torch.nn.functional as F

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.testing import FAMILIES, attn_for, max_trace_error, perturb_trainable, tiny_model

T = 40
POSITIONS = torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]])
LEVERS = {
    "shared": dict(position_scheme="shared"),
    "overlap+reread": dict(position_scheme="overlap", reread_last=True),
    "shifted+reread+echo": dict(reread_last=True, echo_residual=True),
    "shared+reread+echo+pre_norm": dict(
        position_scheme="shared", reread_last=True, echo_residual=True, readout="pre_norm"
    ),
}


def _model(family="gemma3", attn="sdpa", init="copy", n_latents=3, n_ahead=5, perturb=True, **levers):
    cfg = CoprocessorConfig(n_latents=n_latents, n_ahead=n_ahead, n_traces=4, init=init, lora_rank=4, **levers)
    model = CacheAugmentedLM(tiny_model(family, attn), cfg)
    if perturb:
        perturb_trainable(model, scale=0.5)
    return model


def _ids(seed=0, batch=2):
    return torch.randint(3, 128, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lever", list(LEVERS))
def test_training_pass_equals_inference_for_every_lever(family, lever):
    attn = attn_for(family)
    model = _model(family, attn, **LEVERS[lever])
    worst, out = max_trace_error(model, _ids(), POSITIONS)
    assert worst <= 1e-4, f"{lever}: training pass differs from augment+decode by {worst}"
    assert (out.token_losses - out.base_token_losses).abs().max() > 1e-2  # the latents matter


@pytest.mark.parametrize("init", ["lora", "scratch", "pause"])
def test_levers_for_every_init(init):
    levers = dict(position_scheme="shared", reread_last=True, echo_residual=True)
    worst, _ = max_trace_error(_model(init=init, **levers), _ids(1), POSITIONS)
    assert worst <= 1e-4


def test_long_blocks_across_the_window_with_own_positions():
    # blocks longer than the window (8): sliding layers mask by the entries' order in the cache, not by position
    model = _model("gemma3", "eager", n_latents=6, n_ahead=9, position_scheme="shared", reread_last=True)
    worst, _ = max_trace_error(model, _ids(2, batch=1), torch.tensor([[0, 5, 17, 30]]))
    assert worst <= 1e-4


def test_position_schemes_change_the_losses():
    ids = _ids(3)
    losses = {}
    for scheme in ("shifted", "shared", "overlap"):
        model = _model("llama", position_scheme=scheme)  # same seeds: same weights, only positions differ
        losses[scheme] = model(ids, positions=POSITIONS).token_losses
    assert (losses["shifted"] - losses["shared"]).abs().max() > 1e-3
    assert (losses["shared"] - losses["overlap"]).abs().max() > 1e-3


def test_reread_predicts_offset_one_from_token_p():
    # with reread, offset 1 comes from token p fed again: one more cache entry, and a different prediction
    plain, reread = _model(reread_last=False), _model(reread_last=True)
    ids = _ids(4, batch=1)
    assert reread.augment(ids[:, :10]).cache.get_seq_length() == 10 + 3 + 1
    assert plain.augment(ids[:, :10]).cache.get_seq_length() == 10 + 3
    a, b = plain(ids, positions=[9]).token_losses, reread(ids, positions=[9]).token_losses
    assert (a - b).abs().max() > 1e-3


def test_next_position_follows_the_scheme():
    ids = _ids(5, batch=1)[:, :10]
    cases = {
        ("shifted", False): 13,
        ("shifted", True): 14,
        ("shared", False): 10,
        ("shared", True): 10,
        ("overlap", True): 10,
    }
    for (scheme, reread), expected in cases.items():
        aug = _model(position_scheme=scheme, reread_last=reread).augment(ids)
        assert aug.next_position == expected, (scheme, reread)


def test_untrained_echo_residual_inserts_copies_of_token_p():
    for init in ("copy", "pause"):
        model = _model(init=init, perturb=False, echo_residual=True)
        assert model.coprocessor.latent_scale.item() == 0
        ids = _ids(6)
        lat = model._latents(ids, model._prefix_pass(ids)[1], POSITIONS)
        emb = model.base.get_input_embeddings()(ids.gather(1, POSITIONS))  # [B, K, D]
        assert torch.equal(lat, emb[:, :, None].expand_as(lat))
        # and the same at inference, from the cache
        aug = model.augment(ids[:1, :8])
        assert torch.equal(aug.latents[0], model.base.get_input_embeddings()(ids[0, 7:8]).expand(3, -1))


def test_echo_residual_needs_the_last_token_at_inference():
    model = _model(echo_residual=True)
    aug = model.augment(_ids(7, batch=1)[:, :8])
    with pytest.raises(ValueError, match="last_token"):
        model.compute_latents(aug.cache, 8)


def test_pre_norm_readout_drops_the_final_norm():
    post, pre = _model(perturb=False), _model(perturb=False, readout="pre_norm")
    assert isinstance(pre.coprocessor.backbone.norm, torch.nn.Identity)
    assert not isinstance(post.coprocessor.backbone.norm, torch.nn.Identity)
    assert not isinstance(pre.base.get_decoder().norm, torch.nn.Identity)  # the decoder keeps its own
    ids = _ids(8)
    assert (post(ids, positions=POSITIONS).latents - pre(ids, positions=POSITIONS).latents).abs().max() > 1e-3


def test_offset_decay_weights_the_loss():
    ids = _ids(9)
    uniform, decayed = _model(), _model(offset_decay=0.5)
    a, b = uniform(ids, positions=POSITIONS), decayed(ids, positions=POSITIONS)
    assert torch.equal(a.token_losses, b.token_losses)  # the per-offset losses are the same
    assert torch.allclose(a.loss, a.token_losses.mean())
    w = 0.5 ** torch.arange(5.0)
    assert torch.allclose(b.loss, (b.token_losses * w / w.mean()).mean())


def test_checkpoints_keep_the_levers(tmp_path):
    model = _model(
        position_scheme="overlap", reread_last=True, echo_residual=True, readout="pre_norm", offset_decay=0.8
    )
    model.save_pretrained(tmp_path / "c")
    loaded = CacheAugmentedLM.from_pretrained(tmp_path / "c", base=model.base)
    assert loaded.config == model.config
    ids = _ids(10)
    assert torch.equal(loaded(ids, positions=POSITIONS).token_losses, model(ids, positions=POSITIONS).token_losses)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(position_scheme="middle"), "position_scheme"),
        (dict(readout="mean"), "readout"),
        (dict(offset_decay=0.0), "offset_decay"),
        (dict(offset_decay=1.5), "offset_decay"),
        (dict(reread_last=1), "reread_last"),
        (dict(init="pause", readout="pre_norm"), "backbone"),
        (dict(init="lora-decoder", position_scheme="shared"), "lora-decoder.* inserts no latents"),
    ],
)
def test_bad_lever_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        CoprocessorConfig(**bad)


def test_train_command_refuses_bad_levers_in_one_line(capsys):
    from cacheaug.cli import main

    with pytest.raises(SystemExit) as err:
        main(["train", "--init", "pause", "--readout", "pre_norm", "--max-steps", "1"])
    assert "backbone" in str(err.value) and "Traceback" not in str(err.value)


# ------------------------------------------------------------------------------- every inference path
LEVER_MODEL = dict(position_scheme="shared", reread_last=True, echo_residual=True)
PROMPT = [2, 17, 40, 9, 33, 81, 5, 66]


def _greedy_reference(model, prompt, n):
    """Augment, then greedy decoding by the base model with explicit positions (independent of generate)."""
    aug = model.augment(torch.tensor([prompt]))
    logits, cache, pos, out = aug.logits, aug.cache, aug.next_position, []
    for i in range(n):
        token = int(logits.argmax(-1))
        out.append(token)
        step = model.base(
            input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos + i]]), **model.cache_kwargs(cache)
        )
        logits = step.logits[:, -1]
    return out


def test_generate_and_serving_decode_with_the_schemes_positions(tmp_path):
    from cacheaug.serving import CacheStore, Engine

    model = _model("llama", **LEVER_MODEL)
    expected = _greedy_reference(model, PROMPT, 10)
    assert model.generate(torch.tensor([PROMPT]), 10, eos_token_id=[])[0, len(PROMPT) :].tolist() == expected
    for max_batch in (1, 4):  # unbatched steps and the step batcher
        engine = Engine(model, async_grace_s=5.0, max_batch=max_batch)
        try:
            assert engine.generate(PROMPT, 10, policy="sync")[0] == expected
            assert engine.generate(PROMPT, 10, policy="async")[0] == expected
            # a late insertion (after 3 tokens) replays them at their positions: as if augmented from the start
            cache, logits, _ = engine.prefill(PROMPT)
            latents = model.compute_latents(cache, len(PROMPT), torch.tensor([PROMPT[-1]]))
            replayed, logits = engine._insert_and_replay(cache, PROMPT, latents, expected[:3])
            assert int(logits.argmax(-1)) == expected[3]
        finally:
            engine.close()
    # an offline-augmented prefix continues at the text's own positions
    engine = Engine(model, store=CacheStore(directory=tmp_path / "store"))
    try:
        engine.augment_prefix(PROMPT[:5])
        assert engine.generate(PROMPT[:5], 6, policy="sync")[0] == _greedy_reference(model, PROMPT[:5], 6)
        assert engine.stats.store_hits == 1
    finally:
        engine.close()


def test_lm_eval_scores_with_the_schemes_positions(tmp_path):
    from cacheaug.lm_eval_model import CacheAugEvalLM
    from cacheaug.testing import tiny_tokenizer

    model = _model("gemma3", **LEVER_MODEL)
    model.save_pretrained(tmp_path / "ckpt")
    tok = tiny_tokenizer(" ".join(f"w{i}" for i in range(100)).split())
    lm = CacheAugEvalLM(coprocessor=str(tmp_path / "ckpt"), base=model.base, tokenizer=tok, batch_size=2)
    ctx = [2] + tok("w1 w2 w3 w4 w5", add_special_tokens=False)["input_ids"]
    conts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("w7 w8", "w9", "w10 w11 w12")]
    got = lm._loglikelihood_tokens([(None, ctx, c) for c in conts], disable_tqdm=True)
    for (lp, _), cont in zip(got, conts):
        aug = model.augment(torch.tensor([ctx]))
        logits = [aug.logits]
        if len(cont) > 1:
            pos = torch.arange(aug.next_position, aug.next_position + len(cont) - 1)[None]
            logits.append(
                model.base(
                    input_ids=torch.tensor([cont[:-1]]), position_ids=pos, **model.cache_kwargs(aug.cache)
                ).logits[0]
            )
        ref = F.log_softmax(torch.cat(logits).float(), -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert lp == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize(
    "family,lever",
    [("gemma3", "default"), ("qwen2", "default"), ("llama", "default"), *(("gemma3", lever) for lever in LEVERS)],
)
def test_insertions_of_several_prompts_in_one_call_equal_each_alone(family, lever):
    """``insert_latents_rows`` (serving: the requests whose latents arrived together) gives every row the cache and
    logits of its own ``insert_latents``, for prompts of different lengths around the sliding window, with and
    without replayed tokens, under every position scheme and lever."""
    from transformers import DynamicCache

    from cacheaug import kv

    levers = LEVERS.get(lever, {})
    model = CacheAugmentedLM(tiny_model(family), CoprocessorConfig(n_latents=3, n_ahead=4, n_traces=2, **levers))
    perturb_trainable(model, scale=1.0)
    caches, latents, lasts = [], [], []
    with torch.no_grad():
        for i, P in enumerate((5, 13, 9)):  # the tiny models' sliding window is 8
            ids = torch.randint(3, 128, (1, P), generator=torch.Generator().manual_seed(i))
            cache = DynamicCache()
            model.base.get_decoder()(input_ids=ids, **model.cache_kwargs(cache))
            caches.append(cache)
            latents.append(model.compute_latents(cache, last_token=ids[:, -1]))
            lasts.append(int(ids[0, -1]))
        for then in (None, torch.tensor([[7, 9], [11, 3], [40, 41]])):
            before = [[k.clone() for k, _ in kv.layers(c)] for c in caches]
            got_caches, got = model.insert_latents_rows(caches, torch.cat(latents), torch.tensor(lasts), then)
            for i, cache in enumerate(caches):
                assert all(torch.equal(k, b) for (k, _), b in zip(kv.layers(cache), before[i]))  # left unchanged
                alone = kv.fork(cache)
                want = model.insert_latents(
                    alone, latents[i], torch.tensor([lasts[i]]), None if then is None else then[i : i + 1]
                )
                torch.testing.assert_close(got[i : i + 1], want, rtol=1e-4, atol=1e-4)
                assert kv.length(got_caches[i]) == kv.length(alone)
                for (k1, v1), (k2, v2) in zip(kv.layers(got_caches[i]), kv.layers(alone)):
                    torch.testing.assert_close(k1, k2, rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 caches for 3 rows"):
        model.insert_latents_rows(caches[:2], torch.cat(latents), torch.tensor(lasts))


@pytest.mark.parametrize("lever", ["default", *LEVERS])
def test_insertion_with_replay_in_one_call_equals_insert_then_decode(lever):
    """``insert_latents(..., then=tokens)`` (a late insertion's replay, serving) gives the cache and logits of
    inserting the latents and then decoding the tokens, under every position scheme and lever."""
    from transformers import DynamicCache

    from cacheaug import kv

    levers = LEVERS.get(lever, {})
    model = CacheAugmentedLM(tiny_model(), CoprocessorConfig(n_latents=3, n_ahead=4, n_traces=2, **levers))
    perturb_trainable(model)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    tokens = torch.tensor([[7, 9, 11]])
    cache = DynamicCache()
    with torch.no_grad():
        model.base.get_decoder()(input_ids=ids, **model.cache_kwargs(cache))
        latents = model.compute_latents(cache, last_token=ids[:, -1])
        two = kv.fork(cache)
        model.insert_latents(two, latents, ids[:, -1])
        ref = model.decode(two, tokens, model.next_position(two.get_seq_length())).logits[:, -1]
        one = kv.fork(cache)
        got = model.insert_latents(one, latents, ids[:, -1], then=tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert one.get_seq_length() == two.get_seq_length() == 20 + model.config.n_inserted + 3
    for (k1, v1), (k2, v2) in zip(kv.layers(one), kv.layers(two)):
        torch.testing.assert_close(k1, k2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-4)
