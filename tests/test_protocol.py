"""The fair protocol through the real command line on tiny models: adapt, then augment; held-out sources;
the insertion-cost diagnostic."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cacheaug.cli import main
from cacheaug.diagnostics import fixed_latents_model
from cacheaug.config import CoprocessorConfig
from cacheaug.testing import tiny_corpus, tiny_model, tiny_tokenizer

SPLIT = ["--heldout-sources", "{b}", "--adapt-pct", "50", "--heldout-pct", "20"]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    a = tiny_corpus(tmp_path / "a", n_docs=80)
    b = tiny_corpus(tmp_path / "b", n_docs=20, seed=3)
    tok = tiny_tokenizer(a + b)
    tiny_model("gemma3").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = ["--data", str(tmp_path / "a"), str(tmp_path / "b")]
    split = [s.format(b=tmp_path / "b") for s in SPLIT]
    return tmp_path, data + split


def test_adapt_then_augment_then_evaluate_with_unseen_sources(setup, capsys):
    tmp, common = setup
    adapt = ["adapt", "--model", str(tmp / "base"), *common, "--seq-len", "32", "--batch-size", "2", "--max-steps", "3",
             "--warmup-steps", "1", "--log-every", "1", "--save-every", "2", "--device", "cpu", "--out-dir", str(tmp / "adapted")]
    main(adapt)
    adapted, base = load_file(str(tmp / "adapted" / "model.safetensors")), load_file(str(tmp / "base" / "model.safetensors"))
    assert (tmp / "adapted" / "tokenizer.json").is_file() and set(adapted) == set(base)
    changed = [k for k in base if not torch.equal(adapted[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA merged into the linear layers only
    main(adapt)  # a rerun resumes from the last checkpoint: nothing left to do, the same weights
    assert "resumed adaptation" in capsys.readouterr().out
    again = load_file(str(tmp / "adapted" / "model.safetensors"))
    assert all(torch.equal(again[k], adapted[k]) for k in adapted)

    main(["train", "--model", str(tmp / "adapted"), *common, "--seq-len", "32", "--batch-size", "2", "--n-latents", "2",
          "--n-ahead", "3", "--n-traces", "4", "--max-steps", "2", "--warmup-steps", "1", "--eval-sequences", "2",
          "--device", "cpu", "--out-dir", str(tmp / "copro")])
    ckpt = tmp / "copro" / "step_000002"
    out = tmp / "ppl.json"
    main(["eval", "ppl", "--model", str(tmp / "adapted"), "--checkpoint", str(ckpt), *common, "--seq-len", "32",
          "--sequences", "3", "--stride", "4", "--offsets", "1", "2", "--bootstrap", "20", "--device", "cpu",
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["sequences"]) == {"heldout", "unseen"}
    ins, uns = report["heldout"][str(ckpt)], report["unseen"][str(ckpt)]
    assert len(ins["change"]) == len(uns["change"]) == 2 and ins["base_ppl"] != uns["base_ppl"]
    printed = capsys.readouterr().out
    assert "in-source held-out" in printed and "unseen sources" in printed


def test_insertion_cost_command(setup):
    tmp, common = setup
    out = tmp / "cost.json"
    main(["eval", "insertion-cost", "--model", str(tmp / "base"), *common, "--latents", "1", "3", "--seq-len", "32",
          "--sequences", "2", "--points", "3", "--offsets", "1", "2", "--bootstrap", "20", "--device", "cpu",
          "--position-schemes", "shifted", "shared", "--reread", "off", "on", "--out", str(out)])
    report = json.loads(out.read_text())
    for split in ("heldout", "unseen"):
        for kind in ("echo", "pause", "coprocessor"):
            for name in (kind, f"{kind}@shared", f"{kind}@shifted+reread", f"{kind}@shared+reread"):
                assert len(report["results"][split][name]["3"]["change"]) == 2
    # inserting more copies of token p's embedding costs more at offset 1 than one does (on the same points)
    echo = report["results"]["heldout"]["echo"]
    assert echo["3"]["change"][0] != echo["1"]["change"][0]


def test_echo_latents_are_token_p_embeddings(gemma3):
    model = fixed_latents_model(gemma3, "echo", 3, 2)
    ids = torch.randint(3, 128, (2, 20))
    positions = torch.tensor([[4, 9], [2, 11]])
    lat = model._latents(ids, model._prefix_pass(ids)[1], positions)
    emb = gemma3.get_input_embeddings()(ids.gather(1, positions))
    assert lat.shape == (2, 2, 3, 64) and torch.equal(lat[:, :, 2], emb) and torch.equal(lat[:, :, 0], emb)
