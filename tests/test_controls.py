"""The controls: pause tokens share the coprocessor's path; the LoRA-tuned decoder has its own."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cacheaug import CacheAugmentedLM, CoprocessorConfig, LoraDecoderLM, build_model
from cacheaug.testing import perturb_trainable, tiny_model

CFG = CoprocessorConfig(n_latents=2, n_ahead=4, n_traces=3, init="lora-decoder", lora_rank=4)


def _ids(seed=0):
    return torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_lora_decoder_starts_as_the_base_and_trains_only_adapters():
    base = tiny_model("qwen3")
    before = {n: t.clone() for n, t in base.state_dict().items()}
    model = build_model(base, CFG)
    assert isinstance(model, LoraDecoderLM)
    out = model(_ids(), return_base_losses=True)
    assert torch.equal(out.token_losses, out.base_token_losses)  # LoRA B = 0 at init
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        model(_ids(step)).loss.backward()
        assert all(p.grad is None for p in base.parameters())
        opt.step()
    assert all(torch.equal(t, before[n]) for n, t in base.state_dict().items())
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear
    after = model(_ids(), return_base_losses=True)
    assert not torch.equal(after.token_losses, after.base_token_losses)


def test_lora_decoder_losses_are_its_own_next_token_losses():
    model = build_model(tiny_model("llama"), CFG)
    perturb_trainable(model, scale=0.5)
    ids = _ids(1)
    out = model(ids, positions=torch.tensor([[0, 9, 19], [3, 4, 12]]))
    logits = model.coprocessor(input_ids=ids).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
    for b in range(2):
        for k, p in enumerate(out.positions[b].tolist()):
            assert torch.allclose(out.token_losses[b, k], nll[b, p : p + 4], atol=1e-5)


def test_lora_decoder_checkpoint_round_trip(tmp_path):
    base = tiny_model("gemma3")
    model = build_model(base, CFG)
    perturb_trainable(model, scale=0.5)
    model.save_pretrained(tmp_path)
    loaded = CacheAugmentedLM.from_pretrained(tmp_path, base=base)
    assert isinstance(loaded, LoraDecoderLM)
    ids, pos = _ids(2), torch.tensor([2, 10, 15])
    assert torch.equal(loaded(ids, positions=pos).token_losses, model(ids, positions=pos).token_losses)
    prompt = ids[:1, :6]
    assert torch.equal(
        loaded.generate(prompt, 5, augment=False), base.generate(prompt, max_new_tokens=5, do_sample=False)
    )


def test_pause_tokens_go_through_the_coprocessor_path():
    model = CacheAugmentedLM(tiny_model("gemma3"), CoprocessorConfig(n_latents=2, n_ahead=4, init="pause"))
    assert [n for n, _ in model.coprocessor.named_parameters()] == ["soft_tokens", "latent_scale"]


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    from cacheaug.evaluate import bootstrap_rel_change

    g = torch.Generator().manual_seed(0)
    base = 3.0 * 10 + torch.randn(40, 4, generator=g)  # 40 sequences x 10 points, 4 offsets
    aug = base - 10 * torch.tensor([0.1, 0.05, 0.0, -0.02]) + 0.3 * torch.randn(40, 4, generator=g)
    a = bootstrap_rel_change(aug.double(), base.double(), points=10, n_boot=500, seed=1)
    b = bootstrap_rel_change(aug.double(), base.double(), points=10, n_boot=500, seed=1)
    assert a == b
    for c, lo, hi in zip(a["change"], a["lo"], a["hi"]):
        assert lo <= c <= hi and hi - lo < 5
    assert a["change"][0] < -8 and a["change"][3] > 0  # exp(-0.1)-1 = -9.5%, exp(0.02)-1 = +2%


def _copy_and_pause_checkpoints(tmp_path, monkeypatch):
    """A tiny corpus (its tokenizer), a tiny Gemma 3 base and two perturbed arms on it saved as tmp_path/copy and
    tmp_path/pause: what the perplexity-report tests score."""
    from cacheaug.testing import tiny_corpus, tiny_tokenizer

    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    tok = tiny_tokenizer(tiny_corpus(tmp_path / "corpus", n_docs=80))
    base = tiny_model("gemma3")
    for init in ("copy", "pause"):
        m = CacheAugmentedLM(base, CoprocessorConfig(n_latents=2, n_ahead=3, init=init))
        perturb_trainable(m)
        m.save_pretrained(tmp_path / init)
    return base, tok


def test_eval_ppl_reports_each_checkpoint(tmp_path, monkeypatch):
    from cacheaug.evaluate import evaluate_ppl

    base, tok = _copy_and_pause_checkpoints(tmp_path, monkeypatch)
    rep = evaluate_ppl(
        [str(tmp_path / "copy"), str(tmp_path / "pause")],
        data=(str(tmp_path / "corpus"),),
        heldout_pct=30.0,
        seq_len=32,
        sequences=4,
        stride=4,
        offsets=(1, 2, 4),
        n_boot=50,
        base=base,
        tokenizer=tok,
        out=str(tmp_path / "r.json"),
    )
    runs = list(rep["runs"].values())
    assert [r["init"] for r in runs] == ["copy", "pause"] and all(len(r["change"]) == 3 for r in runs)
    assert runs[0]["base_ppl"] == runs[1]["base_ppl"]  # same frozen reference tokens
    assert (tmp_path / "r.json").is_file()
    # the two arms compared directly, paired on the same sequences: copy's perplexity relative to pause's
    (pair,) = rep["paired"]["heldout"].values()
    for j in range(3):
        direct = 100 * ((1 + runs[0]["change"][j] / 100) / (1 + runs[1]["change"][j] / 100) - 1)
        assert pair["change"][j] == pytest.approx(direct, rel=1e-6, abs=1e-6)
        assert pair["lo"][j] <= pair["change"][j] <= pair["hi"][j]
    assert list(rep["paired"]["heldout"]) == [f"{tmp_path / 'copy'} vs {tmp_path / 'pause'}"]


def test_reports_scored_apart_pair_as_one_report_pairs_them(tmp_path, monkeypatch, capsys):
    """`cacheaug eval pair`: two `eval ppl` reports of one checkpoint each (scored on different days or machines)
    give the pair a report with both gives; reports of other tokens or decoders are refused in one line."""
    import json

    from cacheaug.cli import main
    from cacheaug.evaluate import evaluate_ppl

    base, tok = _copy_and_pause_checkpoints(tmp_path, monkeypatch)
    common = dict(data=(str(tmp_path / "corpus"),), heldout_pct=30.0, seq_len=32, stride=4, offsets=(1, 2, 4))
    common.update(n_boot=50, base=base, tokenizer=tok)
    both = evaluate_ppl([str(tmp_path / "copy"), str(tmp_path / "pause")], sequences=4, **common)
    for init in ("copy", "pause"):
        evaluate_ppl([str(tmp_path / init)], sequences=4, out=str(tmp_path / f"{init}.json"), **common)
    main(
        [
            "eval",
            "pair",
            "--reports",
            str(tmp_path / "copy.json"),
            str(tmp_path / "pause.json"),
            "--out",
            str(tmp_path / "pair.json"),
        ]
    )
    pair = json.loads((tmp_path / "pair.json").read_text())
    assert pair["paired"]["heldout"] == both["paired"]["heldout"]  # the same pair, the same bootstrap
    assert "Paired on the same heldout sequences" in capsys.readouterr().out

    evaluate_ppl([str(tmp_path / "pause")], sequences=3, out=str(tmp_path / "other.json"), **common)
    with pytest.raises(SystemExit, match="scored other heldout tokens than") as err:
        main(["eval", "pair", "--reports", str(tmp_path / "copy.json"), str(tmp_path / "other.json")])
    assert "\n" not in str(err.value)
    changed = json.loads((tmp_path / "pause.json").read_text())  # the same tokens through another decoder
    pause_sums = json.loads((tmp_path / "pause.json").read_text())["loss_sums"]["heldout"]
    changed["loss_sums"]["heldout"]["frozen"] = [
        [v + 0.5 for v in row] for row in changed["loss_sums"]["heldout"]["frozen"]
    ]
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="different decoders"):
        main(["eval", "pair", "--reports", str(tmp_path / "copy.json"), str(tmp_path / "changed.json")])
    # a sibling decoder, worse by another amount on each sequence (0.5, 1.0, ... nats) for its frozen and its run
    # alike: --rebase pairs the changes against each report's own frozen decoder, sequence by sequence, as if scored
    # on one (a single mean gap would leave the per-sequence spread in the intervals)
    sums = changed["loss_sums"]["heldout"]
    sums["frozen"] = [[v + 0.5 * (i + 1) for v in row] for i, row in enumerate(pause_sums["frozen"])]
    sums["runs"] = {
        k: [[v + 0.5 * (i + 1) for v in row] for i, row in enumerate(r)] for k, r in pause_sums["runs"].items()
    }
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    pair_files = [str(tmp_path / "copy.json"), str(tmp_path / "changed.json")]
    main(["eval", "pair", "--reports", *pair_files, "--rebase", "--out", str(tmp_path / "rebased.json")])
    rebased = json.loads((tmp_path / "rebased.json").read_text())["paired"]["heldout"]
    for key, r in both["paired"]["heldout"].items():
        for k in ("change", "lo", "hi"):
            assert rebased[key][k] == pytest.approx(r[k], abs=1e-6)
    with pytest.raises(SystemExit, match="at least two"):
        main(["eval", "pair", "--reports", str(tmp_path / "copy.json")])
    (tmp_path / "notes.json").write_text("not json")
    with pytest.raises(SystemExit, match="not an `eval ppl` report"):
        main(["eval", "pair", "--reports", str(tmp_path / "copy.json"), str(tmp_path / "notes.json")])


def test_balanced_evaluation_takes_equal_shares_from_each_source(tmp_path, monkeypatch):
    """`eval ppl --balanced`: in-source sequences in equal shares per source (a small source gives what it has,
    the others make up the rest), each share from that source's held-out documents only."""
    from cacheaug.data import Splits
    from cacheaug.evaluate import balanced_sequences, heldout_sequences
    from cacheaug.testing import tiny_tokenizer

    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    big, small = ["alpha", "beta", "gamma"], ["delta", "omega"]
    texts = {"big": [], "small": []}
    for name, words, n_docs in (("big", big, 60), ("small", small, 12)):
        (tmp_path / name).mkdir()
        for i in range(n_docs):
            text = " ".join(words[(i + k) % len(words)] for k in range(40))
            texts[name].append(text)
            (tmp_path / name / f"{i}.txt").write_text(text)
    tok = tiny_tokenizer(texts["big"] + texts["small"])
    data, splits = (str(tmp_path / "big"), str(tmp_path / "small")), Splits(heldout_pct=50.0)
    ids = {name: {tok.convert_tokens_to_ids(w) for w in words} for name, words in (("big", big), ("small", small))}

    def source_of(seq):
        inside = [name for name, vocab in ids.items() if vocab & set(seq.tolist())]
        assert len(inside) == 1, inside  # a window of one source only
        return inside[0]

    seqs, counts = balanced_sequences(tok, data, splits, seq_len=16, n=6)
    assert counts == {str(tmp_path / "big"): 3, str(tmp_path / "small"): 3}
    assert [source_of(s) for s in seqs] == ["big"] * 3 + ["small"] * 3
    assert len([d for d in (tmp_path / "home" / "tokens").iterdir() if not d.name.startswith(".")]) == 1  # one pass
    plain = heldout_sequences(tok, data, splits, seq_len=16, n=6)
    assert sorted(map(source_of, plain)).count("small") < 3  # spread over the mix: the small source's share is small
    n_small = len(heldout_sequences(tok, (data[1],), splits, seq_len=16, n=1000))
    seqs, counts = balanced_sequences(tok, data, splits, seq_len=16, n=2 * n_small + 4)
    assert counts[data[1]] == n_small and counts[data[0]] == n_small + 4  # the big source makes up the rest
    assert len(seqs) == 2 * n_small + 4


def test_staleness_study_zero_delay_matches_the_training_pass(tmp_path, monkeypatch):
    from cacheaug.evaluate import evaluate_staleness, staleness_sums
    from cacheaug.testing import tiny_corpus, tiny_tokenizer

    model = CacheAugmentedLM(tiny_model("gemma3"), CoprocessorConfig(n_latents=2, n_ahead=3))
    perturb_trainable(model)
    seqs = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    sums, frozen, n = staleness_sums(model, seqs, [0, 4], n_points=3, n_ahead=3)
    positions = torch.linspace(max(40 // 8, 4), 40 - 1 - 3, 3).long()
    out = model(seqs, positions=positions, return_base_losses=True)
    assert torch.allclose(sums[0], out.token_losses.double().sum(1), atol=1e-4)
    assert torch.allclose(frozen, out.base_token_losses.double().sum(1), atol=1e-4)
    assert not torch.allclose(sums[4], sums[0])

    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    tok = tiny_tokenizer(tiny_corpus(tmp_path / "corpus", n_docs=80))
    model.save_pretrained(tmp_path / "ckpt")
    rep = evaluate_staleness(
        str(tmp_path / "ckpt"),
        delays=(0, 2),
        offsets=(1, 2),
        sequences=2,
        points=2,
        seq_len=32,
        data=(str(tmp_path / "corpus"),),
        heldout_pct=30.0,
        n_boot=20,
        base=model.base,
        tokenizer=tok,
    )
    assert set(rep["by_delay"]) == {"0", "2"} and len(rep["by_delay"]["2"]["change"]) == 2


def test_eval_commands_default_to_the_checkpoints_base_and_show_progress(tmp_path, capfd):
    """Issue 38.15 / 38.17: eval commands loaded gemma-3-270m whatever the checkpoint's base, and printed nothing
    for minutes."""
    from cacheaug.evaluate import offset_loss_sums
    from cacheaug.frontends import _base_of

    base = tiny_model("llama")
    base.config._name_or_path = str(tmp_path / "my-model")
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=2, n_ahead=2))
    model.save_pretrained(tmp_path / "ckpt")
    assert _base_of(None, [str(tmp_path / "ckpt")]) == str(tmp_path / "my-model")
    assert _base_of("other", [str(tmp_path / "ckpt")]) == "other"
    offset_loss_sums(model, torch.randint(3, 100, (8, 24)), stride=4, batch=2)
    assert "eval ppl" in capfd.readouterr().err
