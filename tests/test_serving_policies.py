"""Serving policies are strategy objects in a registry (cacheaug.serving.policies): the recipe of docs/architecture.md,
"a serving policy", holds. A policy written in a plugin file and registered with one line is accepted by the engine,
by the real `cacheaug serve --policy` command line (CACHEAUG_PLUGINS) and by the server's `augment` field, and it
decodes what the library says it should. Requests go through the documented states."""

import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest
import torch

from cacheaug.serving import Engine, policies
from cacheaug.serving.policies import Policy, get_policy, policy_names, register_policy
from cacheaug.testing import ServeCLI, tiny_served_folders, tiny_tokenizer

PROMPT = [2, 17, 40, 9, 33, 81, 5, 66]
PLUGIN = textwrap.dedent(policies.__doc__.split("one new file and one line::")[1].split("after which")[0])


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_policies.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = policy_names()
    import importlib

    importlib.import_module("my_policies")
    yield tmp_path
    for name in set(policy_names()) - set(before):
        del policies._POLICIES[name]
    sys.modules.pop("my_policies", None)


def _sync_after(model, tokens: list[int], n: int) -> list[int]:
    """What augmenting the prompt and then decoding ``tokens`` and ``n`` greedy tokens gives (the library alone)."""
    aug = model.augment(torch.tensor([PROMPT]))
    logits = model.base(input_ids=torch.tensor([tokens]), **model.cache_kwargs(aug.cache)).logits[:, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax(-1)))
        logits = model.base(input_ids=torch.tensor([[out[-1]]]), **model.cache_kwargs(aug.cache)).logits[:, -1]
    return out


def test_built_in_policies_are_registry_entries():
    assert policy_names()[:3] == ("off", "sync", "async")
    assert all(isinstance(get_policy(n), Policy) and get_policy(n).summary for n in policy_names())
    with pytest.raises(ValueError, match="unknown augmentation policy 'nope'; choose one of off, sync, async"):
        get_policy("nope")
    with pytest.raises(ValueError, match="a Policy instance with a name"):
        register_policy(Policy())


def test_requests_go_through_the_documented_states(model):
    engine = Engine(model, max_batch=1)
    try:
        for policy, states in [
            ("off", ["waiting", "prefilling", "decoding", "done"]),
            ("sync", ["waiting", "prefilling", "waiting_for_latents", "decoding", "done"]),
        ]:
            info: dict = {}
            list(engine.stream(PROMPT, 4, policy=policy, info=info))
            assert info["states"] == states, policy
        import threading

        cancel, info = threading.Event(), {}
        for i, _ in enumerate(engine.stream(PROMPT, 50, policy="off", cancel=cancel, info=info)):
            if i == 1:
                cancel.set()
        assert info["states"][-1] == "cancelled" and info["cancelled"]
        with pytest.raises(ValueError, match="unknown augmentation policy"):
            list(engine.stream(PROMPT, 4, policy="nope"))
    finally:
        engine.close()


def test_a_policy_from_a_plugin_file_decodes_what_the_library_says(model, plugin):
    engine = Engine(model, default_deadline_s=10, max_batch=1)
    try:
        info: dict = {}
        steps = list(engine.stream(PROMPT, 8, policy="after-two", info=info))
    finally:
        engine.close()
    tokens = [s.token for s in steps]
    plain = model.generate(torch.tensor([PROMPT]), 8, augment=False, eos_token_id=[])[0, len(PROMPT) :].tolist()
    assert tokens[:2] == plain[:2] and not steps[1].augmented  # chosen before the latents existed
    assert all(s.augmented and s.inserted_after == 2 for s in steps[2:])
    assert tokens[2:] == _sync_after(model, tokens[:2], 6)  # latents at their true place, two tokens replayed
    assert info["outcome"] == "augmented" and engine.stats.by_policy["after-two"] == 1
    assert info["states"] == ["waiting", "prefilling", "decoding", "waiting_for_latents", "decoding", "done"]


def test_the_plugin_policy_over_the_real_command_line(tmp_path, plugin):
    model, ckpt = tiny_served_folders(tmp_path, tiny_tokenizer([" ".join(f"w{i}" for i in range(120))]))
    args = ["--model", model, "--coprocessor", ckpt, "--device", "cpu", "--policy", "after-two"]
    env = {
        "CACHEAUG_PLUGINS": "my_policies",
        "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]),
    }
    with ServeCLI(args, tmp_path / "serve.log", env) as url:
        body = {"prompt": "w1 w2 w3 w4 w5", "max_tokens": 6}
        default = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()  # --policy after-two
        assert default["augmentation"] == {"policy": "after-two", "augmented": True, "inserted_after": 2}
        off = httpx.post(f"{url}/v1/completions", json={**body, "augment": "off"}, timeout=60).json()
        assert off["augmentation"]["policy"] == "off" and not off["augmentation"]["augmented"]
        bad = httpx.post(f"{url}/v1/completions", json={**body, "augment": "nope"}, timeout=60)
        assert bad.status_code == 422 and "after-two" in json.dumps(bad.json())
    # without the plugin the same command line is refused in one line
    out = subprocess.run(
        [sys.executable, "-m", "cacheaug", "serve", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": env["PYTHONPATH"]},
    )
    assert out.returncode != 0 and "invalid choice: 'after-two'" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_with_the_decoding_step_compiled_answers_the_same(tmp_path):
    """``cacheaug serve --compile-decode BACKEND`` compiles the batched decoding step (aot_eager here, on the CPU;
    inductor on a GPU) and answers exactly as the server without it, with coprocessor graphs too (run eagerly on the
    CPU); an unknown backend or stream priority is refused in one line."""
    model, ckpt = tiny_served_folders(tmp_path, tiny_tokenizer([" ".join(f"w{i}" for i in range(120))]))
    args = ["--model", model, "--coprocessor", ckpt, "--device", "cpu"]
    body = {"prompt": "w1 w2 w3 w4 w5", "max_tokens": 8}
    answers = []
    # the coprocessor stream's priority (a CUDA option, accepted and reported on the CPU) changes no answer either
    for extra in ([], ["--compile-decode", "aot_eager", "--coprocessor-priority", "high", "--coprocessor-graphs"]):
        with ServeCLI(args + extra, tmp_path / f"serve{len(extra)}.log") as url:
            answers.append(
                [
                    httpx.post(f"{url}/v1/completions", json={**body, "augment": policy}, timeout=120).json()[
                        "choices"
                    ][0]["text"]
                    for policy in ("off", "sync")
                ]
            )
            health = httpx.get(f"{url}/health", timeout=10).json()
            decoding = health["decoding"]
            assert decoding["static_batch"] and decoding["steps"] >= 14  # both answers decoded through the slab
            assert decoding["compiled"] == (extra[1] if extra else None)
            assert health["coprocessor_priority"] == (extra[3] if extra else "normal")
            assert health["coprocessor_graphs"] is bool(extra)
    assert answers[0] == answers[1] and all(answers[0])
    for flag in ("--compile-decode", "--coprocessor-priority"):
        out = subprocess.run(
            [sys.executable, "-m", "cacheaug", "serve", *args, flag, "nope"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode != 0 and "invalid choice: 'nope'" in out.stderr and "Traceback" not in out.stderr
