"""The mechanism test: the synthetic corpus, insertion at the answer marker, and its evaluation."""

import json
import random
import re

import pytest
import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.cli import main
from cacheaug.synth import FAMILIES, SynthConfig, generate_synth, is_heldout_instance, make_instance, marker_positions
from cacheaug.synth_eval import build_rows, generate_check, mcnemar, read_heldout, score_instances
from cacheaug.testing import perturb_trainable, tiny_model, tiny_tokenizer


def test_answers_are_right_and_sides_disjoint(tmp_path):
    rng = random.Random(0)
    for _ in range(200):
        (a, b), q, ans = make_instance("add", 3, rng)
        assert int(ans) == a + b and str(a) in q
        xs, q, ans = make_instance("sort", 5, rng)
        assert [int(x) for x in ans.split(", ")] == sorted(xs)
        ops, q, ans = make_instance("count", 10, rng)
        assert int(ans) == list(ops[:-1]).count(ops[-1])
    out = generate_synth(SynthConfig(out=str(tmp_path / "s"), train_docs=40, problems_per_doc=8, heldout_per_level=5))
    held = read_heldout(out / "heldout.jsonl")
    # 1-digit multiplication has 55 problems up to order, 3 of them on the held-out side: left out, and said so
    assert {r["family"] for r in held} == set(FAMILIES) and len(held) == 5 * 15
    assert list(json.loads((out / "meta.json").read_text())["heldout_left_out"]) == ["mul 1"]
    train_text = "".join(json.loads(x)["text"] for x in (out / "train" / "synth.jsonl").read_text().splitlines())
    train_lines = set(train_text.splitlines())
    assert len(train_lines) > 250
    assert not any(f"{r['question']} Answer: {r['answer']}" in train_lines for r in held)
    # same seed, same corpus
    again = generate_synth(SynthConfig(out=str(tmp_path / "t"), train_docs=40, problems_per_doc=8, heldout_per_level=5))
    assert (again / "heldout.jsonl").read_text() == (out / "heldout.jsonl").read_text()


def _twin_key(line: str) -> tuple:
    """What decides a problem's answer, read back from its text (independently of the generator's own key):
    operands up to order, a list's multiset, a count list's multiset and target, a word problem's numbers and
    operations without its names and things."""
    q = line.split(" Answer:")[0]
    nums = [int(x) for x in re.findall(r"\d+", q)]
    if m := re.match(r"(What is|Add|Compute|Multiply) \d+ (plus|and|\+|times|by|\*) \d+", q):
        return ("add" if m.group(2) in ("plus", "and", "+") else "mul", *sorted(nums))
    if q.startswith("Sort"):
        return ("sort", *sorted(nums))
    if q.startswith("In the list"):
        items = q[len("In the list ") : q.index(", how many")].split(", ")
        return ("count", *sorted(items), q.split("does ")[1].split(" appear")[0])
    ops = re.findall(r"gets (\d+) more|gives away (\d+)|buys (\d+) bags of (\d+)", q)
    return ("word", nums[0], *ops)


def test_no_heldout_problem_has_an_answer_equivalent_twin_in_training(tmp_path):
    """b+a for a+b, a permutation of a list, a reordered count list or the same word problem with other names: none
    of a held-out problem's twins occurs in training (keys read back from the text, not from the generator)."""
    out = generate_synth(
        SynthConfig(
            out=str(tmp_path / "s"),
            train_docs=1500,
            problems_per_doc=16,
            heldout_per_level=30,
            add_digits=(1, 2),
            sort_lengths=(2, 3),
            count_lengths=(3, 5),
            word_steps=(1,),
        )
    )
    train = {
        _twin_key(x)
        for d in (out / "train" / "synth.jsonl").read_text().splitlines()
        for x in json.loads(d)["text"].splitlines()
    }
    held = [_twin_key(f"{r['question']} Answer: {r['answer']}") for r in read_heldout(out / "heldout.jsonl")]
    assert len(held) == 8 * 30 and len(train) > 5000
    assert len(set(held)) == len(held)  # distinct held-out problems
    assert not set(held) & train
    # the keys do find twins: a and b swapped, a list permuted, names changed
    assert _twin_key("What is 12 plus 34? Answer: 46") == _twin_key("Add 34 and 12. Answer: 46")
    assert _twin_key("Sort 3, 1, 2 from smallest to largest.") == _twin_key("Sort 2, 3, 1 from smallest to largest.")
    assert _twin_key("Anna has 10 coins. Then Anna gets 3 more. How many coins does Anna have now?") == _twin_key(
        "Ben has 10 cards. Then Ben gets 3 more. How many cards does Ben have now?"
    )


def test_heldout_side_is_decided_by_operands():
    assert is_heldout_instance("add", (12, 34), 10) == is_heldout_instance("add", (12, 34), 10)
    share = sum(is_heldout_instance("add", (a, 7), 10) for a in range(1000)) / 1000
    assert 0.05 < share < 0.15


def test_marker_positions():
    ids = torch.tensor([5, 7, 8, 1, 7, 8, 2, 3, 7, 8, 4, 4])
    g = torch.Generator().manual_seed(0)
    assert marker_positions(ids, [7, 8], n_valid=12, k=3, generator=g).tolist() == [2, 5, 9]
    two = marker_positions(ids, [7, 8], n_valid=12, k=2, generator=g)
    assert set(two.tolist()) <= {2, 5, 9} and len(two) == 2
    filled = marker_positions(ids, [7, 8], n_valid=8, k=4, generator=g)  # 9 is too late: 2 markers + 2 others
    assert {2, 5} <= set(filled.tolist()) and len(set(filled.tolist())) == 4 and max(filled) < 8
    # --insertion answer: the marker's end and every answer token up to the one before the line's end (id 4 here)
    span = marker_positions(ids, [7, 8], n_valid=11, k=9, generator=g, span=5, stop_ids=frozenset({4}))
    assert set(span.tolist()) >= {2, 3, 4, 5, 6, 7, 8, 9} and len(set(span.tolist())) == 9  # + one uniform point
    only = marker_positions(ids, [7, 8], n_valid=11, k=3, generator=g, span=1, stop_ids=frozenset({4}))
    assert set(only.tolist()) == {2, 5, 9}  # a span of 1: the marker ends alone
    short = marker_positions(ids, [7, 8], n_valid=11, k=2, generator=g, span=5, stop_ids=frozenset({1, 2, 4}))
    assert set(short.tolist()) <= {2, 5, 9}  # every answer ends at once: the stops come right after the markers


def _tokenizer(folder):
    texts = [json.loads(x)["text"] for x in (folder / "train" / "synth.jsonl").read_text().splitlines()]
    return tiny_tokenizer(texts)


def test_exact_match_of_the_parallel_pass_equals_generate(tmp_path):
    out = generate_synth(
        SynthConfig(
            out=str(tmp_path / "s"), families=("add", "count"), train_docs=20, problems_per_doc=6, heldout_per_level=3
        )
    )
    tok = _tokenizer(out)
    held = read_heldout(out / "heldout.jsonl")
    base = tiny_model("gemma3")
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=2, n_ahead=2, n_traces=2))
    perturb_trainable(model)
    rows, spans = build_rows(tok, held, per_row=4)
    assert all(ids[p] == tok.convert_tokens_to_ids("Answer:") for ids, row in zip(rows, spans) for _, p, _ in row)
    scores = score_instances(model, tok, held, per_row=4)
    gen = generate_check(model, tok, held, n=len(held), per_row=4)
    assert len(gen) == len(held)
    assert all(scores["em"][i] == v for i, v in gen.items())
    # the frozen decoder's exact match through plain greedy decoding agrees as well
    model.enabled = False
    gen_base = generate_check(model, tok, held, n=len(held), per_row=4)
    assert all(scores["base_em"][i] == v for i, v in gen_base.items())


def test_mcnemar_exact():
    assert mcnemar([0] * 10, [1] * 10) == {"a_only": 0, "b_only": 10, "diff_points": 100.0, "p": 2 / 1024}
    same = mcnemar([1, 0, 1], [1, 0, 1])
    assert same["p"] == 1.0 and same["diff_points"] == 0
    t = mcnemar([1, 1, 0, 0, 1], [0, 1, 1, 1, 1])  # 1 vs 2 discordant: p = 2 * (1 + 3) / 8 > 1 -> 1
    assert (t["a_only"], t["b_only"], t["p"]) == (1, 2, 1.0)


def test_synth_train_and_eval_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    main(
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--families",
            "add",
            "sort",
            "--train-docs",
            "60",
            "--problems-per-doc",
            "6",
            "--heldout-per-level",
            "2",
            "--add-digits",
            "2",
            "3",
            "--sort-lengths",
            "3",
        ]
    )
    tok = _tokenizer(tmp_path / "s")
    tiny_model("gemma3").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    main(
        [
            "train",
            "--model",
            str(tmp_path / "base"),
            "--data",
            str(tmp_path / "s" / "train"),
            "--insertion",
            "marker",
            "--seq-len",
            "48",
            "--batch-size",
            "2",
            "--n-latents",
            "2",
            "--n-ahead",
            "4",
            "--n-traces",
            "4",
            "--max-steps",
            "2",
            "--warmup-steps",
            "1",
            "--eval-sequences",
            "1",
            "--heldout-pct",
            "10",
            "--device",
            "cpu",
            "--save-every",
            "1",
            "--out-dir",
            str(tmp_path / "copro"),
        ]
    )
    report_file = tmp_path / "synth.json"
    capsys.readouterr()
    # no --model: the base recorded in the first checkpoint
    main(
        [
            "eval",
            "synth",
            "--checkpoint",
            str(tmp_path / "copro" / "step_000001"),
            str(tmp_path / "copro"),
            "--heldout",
            str(tmp_path / "s" / "heldout.jsonl"),
            "--check-generate",
            "3",
            "--device",
            "cpu",
            "--out",
            str(report_file),
        ]
    )
    printed = capsys.readouterr().out
    assert "generate() on 3 answers" in printed and "exact McNemar" in printed
    report = json.loads(report_file.read_text())
    names = list(report["arms"])
    assert len(names) == 3 and all(len(a["hits"]) == report["instances"] for a in report["arms"].values())
    assert set(report["paired"]) == {f"{names[1]} vs frozen", f"{names[2]} vs frozen", f"{names[2]} vs {names[1]}"}
    for pair, t in report["paired"].items():  # the discordant counts are those of the per-instance hits
        b, a = (report["arms"][x]["hits"] for x in pair.split(" vs "))
        assert (t["a_only"], t["b_only"]) == (sum(x > y for x, y in zip(a, b)), sum(y > x for x, y in zip(a, b)))
        assert 100 * sum(a) / len(a) == report["arms"][pair.split(" vs ")[1]]["overall"]["em"]
    assert set(report["by_family"] if "by_family" in report else report["arms"]["frozen"]["by_family"]) == {
        "add",
        "sort",
    }
    arm = next(a for k, a in report["arms"].items() if k != "frozen")
    assert arm["generate_check"]["agree_with_parallel_pass"] == 100.0
    assert set(arm["by_family"]["add"]["by_level"]) == {"2", "3"}


def test_deliberating_before_every_answer_token_equals_generate(tmp_path):
    """``deliberate="every"``: the parallel pass with a trace at every answer position (offset 1 each) gives the exact
    match of generate() running the coprocessor before every token, with and without a gate deciding per step."""
    from cacheaug.gate import Gate, GateConfig

    out = generate_synth(
        SynthConfig(
            out=str(tmp_path / "s"),
            families=("add", "sort"),
            train_docs=20,
            problems_per_doc=6,
            heldout_per_level=2,
            add_digits=(2, 3),
            sort_lengths=(3,),
        )
    )
    tok = _tokenizer(out)
    held = read_heldout(out / "heldout.jsonl")
    model = CacheAugmentedLM(tiny_model("gemma3"), CoprocessorConfig(n_latents=2, n_ahead=2, n_traces=2))
    perturb_trainable(model, scale=0.3)
    every = score_instances(model, tok, held, per_row=3, deliberate="every")
    once = score_instances(model, tok, held, per_row=3)
    assert every["base_em"] == once["base_em"]  # the frozen decoder's answers do not depend on the mode
    assert every["em"] != once["em"] or every["loss"] != once["loss"]
    gen = generate_check(model, tok, held, n=len(held), per_row=3, deliberate="every")
    assert len(gen) == len(held) and all(every["em"][i] == v for i, v in gen.items())
    _every_token_is_the_pass_argmax(model, tok, held)
    h = model.base.get_decoder()(input_ids=torch.tensor([[2, 5, 9]])).last_hidden_state[0, -1]
    model.gate = Gate(GateConfig(hidden_size=h.shape[-1]))
    with torch.no_grad():
        model.gate.linear.weight[0] = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(3))
    gated = score_instances(model, tok, held, per_row=3, deliberate="every")
    assert 0 < sum(gated["gate_fire"]) < len(held)  # it fires at some answer tokens, not all
    gen = generate_check(model, tok, held, n=len(held), per_row=3, deliberate="every")
    assert all(gated["gated_em"][i] == v for i, v in gen.items())
    _every_token_is_the_pass_argmax(model, tok, held, gated=True)


def _every_token_is_the_pass_argmax(model, tok, held, gated=False):
    """The tokens generate(deliberate="every") chose, scored by the parallel pass with a trace before each: every one
    is that trace's top token (the gate's choice between augmented and frozen at each, with ``gated``)."""
    import dataclasses

    rows, spans = build_rows(tok, held, per_row=3)
    trained = model.config
    model.config = dataclasses.replace(trained, n_ahead=1)
    try:
        for ids, row in zip(rows, spans):
            for _, p, s in row:
                out = model.generate(ids[None, : p + 1], max_new_tokens=s, deliberate="every", eos_token_id=[])
                points = list(range(p, p + s))
                res = model.score_targets(torch.cat([out, out[:, -1:]], dim=1), positions=points)
                hits = res["hits"][0, :, 0]
                if gated:
                    fire = model.gate_fires(model.gate_states(out, points))[0]
                    hits = torch.where(fire, hits, res["base_hits"][0, :, 0])
                assert hits.all(), (p, s, hits)
    finally:
        model.config = trained


def test_train_with_answer_insertion_then_eval_deliberating_every_token(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    main(["data", "synth", "--out", str(tmp_path / "s"), "--families", "add", "--train-docs", "30",
          "--problems-per-doc", "6", "--heldout-per-level", "2", "--add-digits", "2", "3"])  # fmt: skip
    tok = _tokenizer(tmp_path / "s")
    tiny_model("gemma3").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")

    from cacheaug.train import TrainConfig, Trainer

    cfg = TrainConfig.from_flat(model=str(tmp_path / "base"), data=(str(tmp_path / "s" / "train"),), insertion="answer",
                      seq_len=48, batch_size=2, n_latents=2, n_ahead=4, n_traces=8, max_steps=1, warmup_steps=1,
                      eval_sequences=1, heldout_pct=10, device="cpu", out_dir=str(tmp_path / "copro"))  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    from cacheaug.train import insertion_points

    ids, keys = trainer.data.next_batch(2)
    points = insertion_points(keys, cfg, ids, trainer.marker_ids, trainer.stop_ids)
    at_markers = insertion_points(keys, cfg.replace(insertion="marker"), ids, trainer.marker_ids)
    marker = tok.convert_tokens_to_ids("Answer:")
    for row, pos, base in zip(ids, points, at_markers):  # the marker's ends, then the answer tokens after them
        ends = [i for i, t in enumerate(row.tolist()) if t == marker and i < cfg.seq_len - cfg.n_ahead]
        assert ends and len(ends) < cfg.n_traces and set(ends) <= set(base.tolist())  # marker: every end + fill
        # answer: the tiny tokenizer has no line break, so each answer runs on to the sequence's end: the points are
        # K of those after the first marker, never before it
        assert min(pos) >= ends[0] and max(pos) < cfg.seq_len - cfg.n_ahead and len(set(pos.tolist())) == cfg.n_traces
        assert not torch.equal(pos, base)
    trainer.fit()
    capsys.readouterr()
    main(["eval", "synth", "--checkpoint", str(tmp_path / "copro"), "--heldout", str(tmp_path / "s" / "heldout.jsonl"),
          "--deliberate", "every", "--check-generate", "4", "--device", "cpu", "--out", str(tmp_path / "r.json")])  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text())
    arm = next(a for k, a in report["arms"].items() if k != "frozen")
    assert report["deliberate"] == "every" and arm["generate_check"]["agree_with_parallel_pass"] == 100.0


def test_a_file_that_is_not_a_heldout_file_is_refused_in_one_line(tmp_path):
    """`eval synth --heldout` on a file of anything else: one line naming what is wrong, before any model loads
    (the shipped coprocessor names the real default model: loading it would take seconds)."""
    cases = {
        "text.txt": ("not JSON\n", "line 1 is not JSON"),
        "binary.dat": (b"\x00\xff\xfe\x80", "it is not text"),
        "partial.jsonl": (
            '{"family": "add", "level": 2, "question": "1+1?", "answer": "2"}\n{"family": "add"}\n',
            "line 2 lacks level, question, answer",
        ),
        "list.jsonl": ("[1, 2]\n", "line 1 lacks family, level, question, answer"),
        "empty.jsonl": ("\n\n", "it holds no problem"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        with pytest.raises(SystemExit) as exit_:  # the message is the exit's: Python prints it, exit status 1
            main(["eval", "synth", "--checkpoint", "gemma-3-270m-skills", "--heldout", str(path)])
        err = str(exit_.value.code)
        assert err.count("\n") == 0 and "Traceback" not in err, err
        assert f"{path} is not a held-out file of `cacheaug data synth`" in err and why in err, err
