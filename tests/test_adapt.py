"""`cacheaug adapt` runs on the training loop it shares with `cacheaug train` (cacheaug.loop): exact resume, an
interrupted step read again, the final checkpoint, the metrics log."""

import json

import torch
from safetensors.torch import load_file

import cacheaug.adapt as adapt_module
from cacheaug.adapt import AdaptConfig, adapt
from cacheaug.testing import tiny_model


def _adapt(tmp_path, corpus, name, **overrides):
    data, tok = corpus
    cfg = AdaptConfig(
        data=(data,),
        out_dir=str(tmp_path / name),
        seq_len=32,
        batch_size=2,
        max_steps=4,
        warmup_steps=1,
        log_every=1,
        save_every=0,
        device="cpu",
        lora_rank=4,
        gradient_checkpointing=False,
        **overrides,
    )
    torch.manual_seed(0)
    return adapt(cfg, base=tiny_model("gemma3"), tokenizer=tok, progress=False)


def test_adapt_resumes_exactly_and_an_interrupted_step_is_read_again(tmp_path, corpus, monkeypatch):
    straight = load_file(str(_adapt(tmp_path, corpus, "straight") / "model.safetensors"))
    rows = [json.loads(line) for line in (tmp_path / "straight" / "adapt_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 and r["tokens"] for r in rows)

    calls = {"n": 0}
    real = adapt_module._lm_loss

    def interrupt_third(*args, **kwargs):  # Ctrl-C during the third step's forward pass
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt_module, "_lm_loss", interrupt_third)
    _adapt(tmp_path, corpus, "cut")
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_000002" / "adapt_state.json").read_text())
    assert state["step"] == 2 and state["data"]["cursor"] == 2 * 2  # the third step's batch is read again
    monkeypatch.undo()
    resumed = load_file(str(_adapt(tmp_path, corpus, "cut") / "model.safetensors"))
    assert set(resumed) == set(straight) and all(torch.equal(resumed[k], straight[k]) for k in straight)
