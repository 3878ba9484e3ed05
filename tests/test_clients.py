"""Real clients against the real command line: the official `openai` SDK talking to `cacheaug serve` on a tiny model
(completions, chat with the model's chat template, both streaming modes, models, usage), and malformed input that
must get 422, never 500."""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from cacheaug.testing import ServeCLI, tiny_served_folders, tiny_tokenizer

WORDS = " ".join(f"w{i}" for i in range(120))
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`cacheaug serve` in a subprocess, on a tiny model folder whose tokenizer has a chat template."""
    root = tmp_path_factory.mktemp("served")
    tok = tiny_tokenizer([WORDS + " <user> <assistant> <system>"])
    tok.chat_template = TEMPLATE
    model, ckpt = tiny_served_folders(root, tok)
    with ServeCLI(["--model", model, "--coprocessor", ckpt, "--device", "cpu"], root / "serve.log") as url:
        yield url, str(model), tok


def test_openai_sdk(served):
    url, name, tok = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    served = Path(name).name  # a local folder is announced by its name, and answers to its path too
    assert [m.id for m in client.models.list()] == [served]
    assert client.models.retrieve(served).id == served and client.models.retrieve(name).id == served
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="w5", max_tokens=2)
    assert missing.value.code == "model_not_found" and "gpt-4" in missing.value.message

    out = client.completions.create(model=name, prompt="w5 w17 w40", max_tokens=6, extra_body={"augment": "sync"})
    prompt_tokens = len(tok("w5 w17 w40")["input_ids"])
    assert out.usage.prompt_tokens == prompt_tokens and 1 <= out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    text = out.choices[0].text
    chunks = list(
        client.completions.create(
            model=name, prompt="w5 w17 w40", max_tokens=6, stream=True, extra_body={"augment": "sync"}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text  # greedy: the same text streamed

    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=5)
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(
        tok(templated, add_special_tokens=False)["input_ids"]
    )  # one <bos>, templated
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=name, messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens

    with pytest.raises(openai.UnprocessableEntityError):  # not implemented: refused, never silently ignored
        client.completions.create(model=name, prompt="w1", max_tokens=2, n=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=name, prompt="w1", max_tokens=2, logprobs=3)


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "w1 w2", "temperature": NaN}',
        '{"prompt": "w1 w2", "top_p": Infinity}',
        '{"prompt": "w1 w2", "deadline_ms": NaN}',
        '{"prompt": "w1 \\ud800 w2"}',
        '{"prompt": "w1", "seed": 123456789012345678901234567890}',
        '{"prompt": "w1", "seed": 123456789012345678901234567890, "stream": true}',
        '{"prompt": "w1", "echo": true}',
        '{"prompt": "w1", "best_of": 3}',
        '{"prompt": "w1", "frobnicate": 1}',
        '{"prompt": "   "}',
        '{"prompt": ""}',
        "[1, 2]",
        '{"prompt": "w1"',
    ],
)
def test_malformed_completions_get_422(served, raw):
    url, _, _ = served
    with httpx.Client() as client:  # one keep-alive connection: a bad request must not break the next
        r = client.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"]
        ok = client.post(f"{url}/v1/completions", json={"prompt": "w1 w2", "max_tokens": 2})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        '{"messages": [{"role": "user", "content": "w1 \\ud800"}]}',
        '{"messages": [{"role": "robot", "content": "w1"}]}',
        '{"messages": []}',
        '{"messages": [{"role": "user", "content": "w1"}], "n": 3}',
    ],
)
def test_malformed_chat_gets_422(served, raw):
    url, _, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    json.dumps(r.json())  # a plain JSON body


def test_huge_body_gets_413_and_the_server_stays_responsive(served):
    url, _, _ = served
    t0 = time.monotonic()
    r = httpx.post(
        f"{url}/v1/completions",
        content=b'{"prompt": "' + b"w1 " * (2 << 20) + b'"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and time.monotonic() - t0 < 10

    def chunked():  # no Content-Length: the limit holds on the bytes as they arrive
        yield b'{"prompt": "'
        for _ in range(2 << 10):
            yield b"w1 " * 1024
        yield b'"}'

    r = httpx.post(f"{url}/v1/completions", content=chunked(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("option", [["--max-concurrent", "0"], ["--store-mib", "-1"], ["--max-queue", "-2"]])
def test_serve_refuses_bad_options_in_one_line(option):
    res = subprocess.run(
        [sys.executable, "-m", "cacheaug", "serve", *option], capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("cacheaug serve: " + option[0])


def test_sigterm_with_an_open_stream_exits_within_the_grace_period(tmp_path):
    """Issue 38.11: SIGTERM with open streams waited for them with no limit."""
    import signal

    tok = tiny_tokenizer([WORDS])
    model, ckpt = tiny_served_folders(tmp_path, tok)
    cli = ServeCLI(
        ["--model", model, "--coprocessor", ckpt, "--device", "cpu", "--shutdown-grace-s", "1"], tmp_path / "serve.log"
    )
    url = cli.__enter__()
    try:
        with httpx.stream(
            "POST", f"{url}/v1/completions", timeout=60, json={"prompt": "w5 w17", "max_tokens": 4096, "stream": True}
        ) as r:
            next(r.iter_lines())  # one chunk read; the reader then stalls and the request stays open
            t0 = time.monotonic()
            cli.proc.send_signal(signal.SIGTERM)
            cli.proc.wait(30)
        assert time.monotonic() - t0 < 15
    finally:
        if cli.proc.poll() is None:
            cli.proc.kill()
