"""Selective augmentation (cacheaug.gate): where the gate says no, everything is the frozen model's bit for bit; where
it says yes, the augmented model's; its decisions in the parallel pass equal those of the augment path; it is
fitted by `cacheaug train-gate`, saved in the checkpoint and used by eval synth / eval ppl / lm-eval / serving."""

import json

import pytest
import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.cli import main
from cacheaug.gate import Gate, GateConfig, fit, outcome
from cacheaug.testing import perturb_trainable, tiny_model

PROMPTS = torch.tensor([[5, 17, 33, 9, 40, 71, 12, 3, 55, 60], [8, 90, 14, 27, 61, 5, 44, 19, 100, 6]])


def _model(family: str = "gemma3", **kw) -> CacheAugmentedLM:
    model = CacheAugmentedLM(tiny_model(family), CoprocessorConfig(n_latents=2, n_ahead=3, n_traces=4, **kw))
    perturb_trainable(model, scale=0.5)
    return model


def _gate_on(model, rows: set[int], ids=PROMPTS) -> Gate:
    """A gate that fires exactly at the last token of ``ids``' rows in ``rows`` (of two rows)."""
    h = model.base.get_decoder()(input_ids=ids).last_hidden_state[:, -1]
    gate = Gate(GateConfig(hidden_size=h.shape[-1]))
    yes = torch.tensor([i in rows for i in range(len(ids))])
    with torch.no_grad():
        if yes.all() or not yes.any():
            gate.linear.bias.fill_(50.0 if yes.all() else -50.0)
        else:  # between the two states: +25 on the one, -25 on the other
            d = h[yes][0] - h[~yes][0]
            gate.linear.weight[0] = 50 * d / d.pow(2).sum()
            gate.linear.bias.fill_(-float(gate.linear.weight[0] @ (h[yes][0] + h[~yes][0]) / 2))
    model.gate = gate
    assert model.gate_fires(h).tolist() == yes.tolist()
    return gate


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_where_the_gate_says_no_it_is_the_frozen_model_and_yes_the_augmented(family):
    model = _model(family)
    frozen = model.base.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    augmented = model.generate(PROMPTS, max_new_tokens=6, use_gate=False)
    assert not torch.equal(frozen, augmented)  # the latents change the text here
    _gate_on(model, set())
    assert torch.equal(model.generate(PROMPTS, max_new_tokens=6), frozen)
    aug = model.augment(PROMPTS)
    base_out = model.base(input_ids=PROMPTS, logits_to_keep=1)
    assert not aug.inserted and aug.latents is None and aug.cache.get_seq_length() == PROMPTS.shape[1]
    assert torch.equal(aug.logits, base_out.logits[:, -1])
    _gate_on(model, {0, 1})
    assert torch.equal(model.generate(PROMPTS, max_new_tokens=6), augmented)
    assert model.augment(PROMPTS).inserted
    _gate_on(model, {1})  # rows decided apart: each as it would be alone
    mixed = model.generate(PROMPTS, max_new_tokens=6)
    assert torch.equal(mixed[0], frozen[0]) and torch.equal(mixed[1], augmented[1])
    with pytest.raises(ValueError, match="augments rows \\[1\\]"):
        model.augment(PROMPTS)
    assert model.augment(PROMPTS[1:]).inserted and not model.augment(PROMPTS[:1]).inserted
    # from a stored cache of the prompt (as serving and offline augmentation do): the same decision
    from transformers import DynamicCache

    for row, inserted in ((0, False), (1, True)):
        cache = DynamicCache()
        model.base(input_ids=PROMPTS[row : row + 1], **model.cache_kwargs(cache))
        assert model.augment(PROMPTS[row : row + 1], past_key_values=cache).inserted is inserted


def test_the_parallel_pass_reads_the_states_the_augment_path_reads():
    model = _model()
    ids = torch.randint(3, 120, (2, 30), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 4, 11, 25], [3, 9, 17, 26]])
    states = model.gate_states(ids, positions)
    for b in range(2):
        for k, p in enumerate(positions[b].tolist()):
            h = model.base.get_decoder()(input_ids=ids[b : b + 1, : p + 1]).last_hidden_state[0, -1]
            torch.testing.assert_close(states[b, k], h, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="train-gate"):
        model.gate_probs(ids, positions)  # no gate yet
    model.gate = Gate(GateConfig(hidden_size=states.shape[-1]))
    assert model.gate_probs(ids, positions).shape == (2, 4)


def test_fit_learns_where_augmenting_pays():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 12, generator=g) * 3 + 1
    deltas = torch.where(X[:, 2] > 1, -0.5, 2.0) + 0.05 * torch.randn(2000, generator=g)  # pays where x_2 > 1
    gate = fit(X[:1500], deltas[:1500])
    got = outcome(gate, X[1500:], deltas[1500:])
    # cost-sensitive: a wrong fire costs 2 nats here, a missed one 0.5, so it fires where it is sure
    assert got["precision"] > 0.97 and 0.8 * got["helped_share"] < got["fire_rate"] <= got["helped_share"]
    assert got["loss_change_gated"] < 0 < got["loss_change_always"]
    assert got["loss_change_gated"] < 0.8 * got["loss_change_oracle"]
    # a margin: positions gaining less than it are not worth firing at
    strict = fit(X[:1500], deltas[:1500], margin=1.0)
    assert outcome(strict, X[1500:], deltas[1500:])["fire_rate"] < 0.02


def test_the_gate_is_saved_loaded_and_exported(tmp_path):
    model = _model()
    gate = _gate_on(model, {1})
    model.save_pretrained(tmp_path / "ckpt")
    again = CacheAugmentedLM.from_pretrained(tmp_path / "ckpt", base=model.base)
    assert again.gate is not None and torch.equal(again.gate.linear.weight, gate.linear.weight)
    assert torch.equal(again.generate(PROMPTS, max_new_tokens=4), model.generate(PROMPTS, max_new_tokens=4))
    main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "shared")])
    assert CacheAugmentedLM.from_pretrained(tmp_path / "shared", base=model.base).gate is not None
    (tmp_path / "ckpt" / "gate.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="train-gate"):
        CacheAugmentedLM.from_pretrained(tmp_path / "ckpt", base=model.base)


def test_train_gate_then_every_evaluation_reports_the_gated_arm(tmp_path, monkeypatch, capsys):
    from test_synth import _tokenizer

    from cacheaug.synth_eval import read_heldout

    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    main(
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--families",
            "add",
            "--train-docs",
            "40",
            "--problems-per-doc",
            "6",
            "--heldout-per-level",
            "3",
            "--add-digits",
            "2",
            "3",
        ]
    )
    tok = _tokenizer(tmp_path / "s")
    base = tiny_model("gemma3")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=2, n_ahead=4, n_traces=4))
    perturb_trainable(model, scale=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    main(
        [
            "train-gate",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--model",
            str(tmp_path / "base"),
            "--data",
            str(tmp_path / "s" / "train"),
            "--seq-len",
            "40",
            "--sequences",
            "10",
            "--n-traces",
            "4",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "gate.json"),
        ]
    )
    printed = capsys.readouterr().out
    assert "gate saved in" in printed and "at_marker" in printed
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["validation"]["positions"] == 2 * 4 and 0 <= report["validation"]["fire_rate"] <= 1
    saved = json.loads((tmp_path / "ckpt" / "gate_config.json").read_text())
    assert saved["fit"]["sequences"] == 10 and saved["n_ahead"] == 4
    # eval synth: the coprocessor always on and with its gate, side by side, paired
    main(
        [
            "eval",
            "synth",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--model",
            str(tmp_path / "base"),
            "--heldout",
            str(tmp_path / "s" / "heldout.jsonl"),
            "--device",
            "cpu",
            "--check-generate",
            "6",
            "--out",
            str(tmp_path / "synth.json"),
        ]
    )
    synth = json.loads((tmp_path / "synth.json").read_text())
    gated = next(a for k, a in synth["arms"].items() if k.endswith("+ gate"))
    always = next(a for k, a in synth["arms"].items() if k not in ("frozen",) and not k.endswith("+ gate"))
    frozen = synth["arms"]["frozen"]
    n = len(read_heldout(tmp_path / "s" / "heldout.jsonl"))
    loaded = CacheAugmentedLM.from_pretrained(tmp_path / "ckpt", base=base)
    from cacheaug.synth_eval import build_rows

    rows, spans = build_rows(tok, read_heldout(tmp_path / "s" / "heldout.jsonl"))
    fires = {}
    for ids, row in zip(rows, spans):
        f = loaded.gate_fires(loaded.gate_states(ids[None], [p for _, p, _ in row]))[0]
        fires.update({i: bool(x) for (i, _, _), x in zip(row, f)})
    assert gated["hits"] == [always["hits"][i] if fires[i] else frozen["hits"][i] for i in range(n)]
    assert gated["gate_fire_rate"] == pytest.approx(100 * sum(fires.values()) / n)
    assert gated["generate_check"]["agree_with_parallel_pass"] == 100.0
    assert any(pair.endswith("+ gate") or "+ gate vs" in pair for pair in synth["paired"])


def test_eval_ppl_with_a_gate_that_never_fires_is_the_frozen_model(tmp_path):
    from cacheaug.evaluate import offset_loss_sums

    model = _model()
    model.gate = Gate(GateConfig(hidden_size=model.base.config.hidden_size))
    model.gate.linear.bias.data.fill_(-50.0)
    seqs = torch.randint(3, 120, (3, 40), generator=torch.Generator().manual_seed(1))
    aug, base, points, gated, fires = offset_loss_sums(model, seqs, stride=5, with_gate=True)
    assert torch.equal(gated, base) and fires.sum() == 0 and not torch.equal(aug, base)
    model.gate.linear.bias.data.fill_(50.0)
    aug, base, points, gated, fires = offset_loss_sums(model, seqs, stride=5, with_gate=True)
    assert torch.equal(gated, aug) and (fires == points).all()


def test_the_servers_gate_policy():
    """`augment: "gate"`: the frozen model's tokens where the gate says no (nothing submitted), sync's where it says
    yes; refused with a gate-less coprocessor."""
    from cacheaug.serving import Engine

    model = _model("llama")
    prompt = PROMPTS[0].tolist()
    engine = Engine(model, default_deadline_s=10, max_batch=1)
    try:
        with pytest.raises(ValueError, match="train-gate"):
            list(engine.stream(prompt, 4, policy="gate"))
        results = {}
        for fire in (False, True):
            _gate_on(model, {0, 1} if fire else set())
            info: dict = {}
            results[fire] = ([s.token for s in engine.stream(prompt, 6, policy="gate", info=info)], info)
        for policy in ("off", "sync"):
            results[policy] = [s.token for s in engine.stream(prompt, 6, policy=policy)]
    finally:
        engine.close()
    assert results[False][0] == results["off"] and results[False][1]["gate"] is False
    assert results[False][1]["outcome"] is None and "waiting_for_latents" not in results[False][1]["states"]
    assert results[True][0] == results["sync"] and results[True][1]["outcome"] == "augmented"
    assert results["off"] != results["sync"]


def test_lm_eval_with_a_gate(tmp_path):

    from cacheaug.lm_eval_model import CacheAugEvalLM
    from cacheaug.testing import tiny_tokenizer

    model = _model()
    tok = tiny_tokenizer([" ".join(f"w{i}" for i in range(100))])
    ctx = [2] + tok("w1 w2 w3 w4 w5", add_special_tokens=False)["input_ids"]
    conts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("w7 w8", "w9")]
    scores = {}
    for fire in (False, True):
        model.gate = Gate(GateConfig(hidden_size=model.base.config.hidden_size))
        model.gate.linear.bias.data.fill_(50.0 if fire else -50.0)
        model.save_pretrained(tmp_path / f"ckpt{fire}")
        lm = CacheAugEvalLM(coprocessor=str(tmp_path / f"ckpt{fire}"), base=model.base, tokenizer=tok)
        scores[fire] = [lp for lp, _ in lm._loglikelihood_tokens([(None, ctx, c) for c in conts], disable_tqdm=True)]
        ungated = CacheAugEvalLM(
            coprocessor=str(tmp_path / f"ckpt{fire}"), base=model.base, tokenizer=tok, gate="false"
        )
        scores[f"always{fire}"] = [
            lp for lp, _ in ungated._loglikelihood_tokens([(None, ctx, c) for c in conts], disable_tqdm=True)
        ]
    frozen = CacheAugEvalLM(coprocessor=str(tmp_path / "ckptFalse"), base=model.base, tokenizer=tok, augment=False)
    assert scores[False] == [
        lp for lp, _ in frozen._loglikelihood_tokens([(None, ctx, c) for c in conts], disable_tqdm=True)
    ]
    assert scores[True] == scores["alwaysTrue"] == scores["alwaysFalse"] != scores[False]
    model.gate = None
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="train-gate"):
        CacheAugEvalLM(coprocessor=str(tmp_path / "plain"), base=model.base, tokenizer=tok, gate="true")
