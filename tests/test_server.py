"""The real HTTP server on a tiny model: OpenAI endpoints, policies, faults, validation, concurrency."""

import gc
import json
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.serving import CacheStore, Engine
from cacheaug.serving.server import create_app
from cacheaug.testing import perturb_trainable, tiny_model, tiny_tokenizer

WORDS = " ".join(f"w{i}" for i in range(120))
PROMPT = "w5 w17 w40 w9 w33 w81 w5 w66"


class Server:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def stack(tmp_path):
    model = CacheAugmentedLM(tiny_model("llama"), CoprocessorConfig(n_latents=3, n_ahead=4))
    perturb_trainable(model, scale=1.0)
    tok = tiny_tokenizer([WORDS])
    engine = Engine(model, CacheStore(directory=tmp_path / "store", fingerprint="t"), async_grace_s=5.0)
    server = Server(create_app(engine, tok, max_concurrent=2, max_queue=4))
    yield model, tok, engine, server
    server.stop()
    engine.close()


def _library(model, tok, augment, n=8):
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    out = model.generate(ids, n, augment=augment, eos_token_id=[])[0, ids.shape[1] :]
    return tok.decode(out, skip_special_tokens=True)  # as the server gives text


def _live_tensor_bytes() -> int:
    """Bytes of all tensor storages alive in this process (each storage once)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            if isinstance(obj, torch._subclasses.FakeTensor):  # left by torch.compile tests: no real memory
                continue
            if torch._C._functorch.is_functorch_wrapped_tensor(obj):  # vmap wrappers (flex block masks): the
                continue  # storage is the wrapped tensor's, counted on its own
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _complete(url, **body):
    return httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, **body}, timeout=30)


def test_policies_over_http(stack):
    model, tok, engine, server = stack
    off = _complete(server.url, augment="off").json()
    sync = _complete(server.url, augment="sync").json()
    asyn = _complete(server.url, augment="async").json()
    assert off["choices"][0]["text"] == _library(model, tok, False)
    assert sync["choices"][0]["text"] == _library(model, tok, True) != off["choices"][0]["text"]
    assert asyn["choices"][0]["text"] == sync["choices"][0]["text"]  # latents arrived before the first token
    assert sync["augmentation"] == {"policy": "sync", "augmented": True, "inserted_after": 0}
    assert off["object"] == "text_completion" and off["usage"]["prompt_tokens"] == len(tok(PROMPT)["input_ids"])


def test_streaming_and_chat(stack):
    model, tok, engine, server = stack
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "stream": True}, timeout=30
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == _library(model, tok, True)
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=30,
        json={"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 4},
    ).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"


def test_faults_give_the_base_answer_within_the_deadline(stack):
    model, tok, engine, server = stack
    base_text = _library(model, tok, False)
    hang = threading.Event()
    model.compute_latents = lambda cache, length=None, last_token=None: hang.wait(20)
    t0 = time.monotonic()
    r = _complete(server.url, augment="sync", deadline_ms=300).json()
    assert r["choices"][0]["text"] == base_text and not r["augmentation"]["augmented"]
    assert time.monotonic() - t0 < 5
    hang.set()

    def boom(cache, length=None, last_token=None):
        raise RuntimeError("coprocessor crashed")

    model.compute_latents = boom
    with pytest.warns(UserWarning, match="coprocessor crashed"):
        r = _complete(server.url, augment="async").json()
    assert r["choices"][0]["text"] == base_text

    def killed(cache, length=None, last_token=None):  # what a killed worker looks like from inside its thread
        raise SystemExit("coprocessor killed")

    model.compute_latents = killed
    with pytest.warns(UserWarning, match="coprocessor killed"):
        r = _complete(server.url, augment="sync").json()
    assert r["choices"][0]["text"] == base_text and not r["augmentation"]["augmented"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # the server lives on
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'cacheaug_augmentations_total{outcome="failed"} 2.0' in metrics
    assert 'cacheaug_augmentations_total{outcome="late"} 1.0' in metrics


def test_offline_prefix_is_reused_and_persisted(stack, tmp_path):
    model, tok, engine, server = stack
    doc = "w5 w17 w40 w9"
    r = httpx.post(f"{server.url}/v1/augment", json={"prompt": doc}, timeout=30).json()
    assert r["tokens"] == len(tok(doc)["input_ids"]) == 5 and r["cache_id"] in engine.store  # <bos> + 4 words
    out = _complete(server.url, augment="sync").json()  # PROMPT starts with doc
    assert out["augmentation"]["augmented"] and engine.stats.store_hits == 1
    assert "cacheaug_store_hits 1.0" in httpx.get(f"{server.url}/metrics").text
    assert r["cache_id"] in CacheStore(directory=tmp_path / "store", fingerprint="t")  # survives a restart


def test_bad_requests_get_clear_4xx(stack):
    model, tok, engine, server = stack
    assert _complete(server.url, max_tokens=0).status_code == 422
    assert _complete(server.url, augment="sometimes").status_code == 422
    assert httpx.post(f"{server.url}/v1/completions", json={"max_tokens": 3}).status_code == 422
    long = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w1 " * 300, "max_tokens": 4})
    assert long.status_code == 400 and "exceeds the model's context" in long.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_concurrent_clients_and_overload(stack):
    model, tok, engine, server = stack
    expected = _library(model, tok, True)
    results, errors = [], []

    def client(policy="sync"):
        try:
            r = _complete(server.url, augment=policy)
            results.append(r.status_code if r.status_code != 200 else r.json()["choices"][0]["text"])
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    def round_of_clients():  # sync and async alike (async: the latents arrive within its grace, so same text)
        threads = [threading.Thread(target=client, args=("sync" if i % 2 else "async",)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return _live_tensor_bytes()

    round_of_clients()
    assert not errors
    ok = [r for r in results if r != 429]
    assert ok and all(r == expected for r in ok)  # every served answer is right; overload answers 429
    assert all(r == expected or r == 429 for r in results)
    # bounded memory: more rounds of concurrent requests leave no tensors behind (caches, latents, queues)
    after = [round_of_clients() for _ in range(3)]
    assert not errors and max(after) - after[0] <= 16 << 10, after  # a leaked cache per request adds ~56 KB a round


def test_off_is_the_frozen_model_even_after_an_augmented_prefix_is_stored(stack):
    """Issue 38.3: ``augment: "off"`` took the longest stored (augmented) prefix whatever the policy."""
    model, tok, engine, server = stack
    assert httpx.post(f"{server.url}/v1/augment", json={"prompt": "w5 w17 w40 w9"}, timeout=30).status_code == 200
    off = _complete(server.url, augment="off").json()
    assert off["choices"][0]["text"] == _library(model, tok, False)
    assert not off["augmentation"]["augmented"] and engine.stats.store_hits == 0


def test_tiny_temperatures_are_greedy_and_odd_fields_are_4xx(stack):
    """Issue 38.4 / 38.6 / 38.10: a temperature of 1e-45 overflowed logits / T (500); a lone surrogate in ``model``
    gave 500; an unknown route or method answered FastAPI's ``{"detail": ...}``."""
    model, tok, engine, server = stack
    greedy = _complete(server.url, augment="off").json()["choices"][0]["text"]
    for t in (1e-45, 5e-324, 1e-6):
        r = _complete(server.url, augment="off", temperature=t)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    bad = httpx.post(
        f"{server.url}/v1/completions",
        timeout=30,
        headers={"content-type": "application/json"},
        content=json.dumps({"prompt": PROMPT, "model": "\ud800"}).encode(),
    )  # ASCII-escaped surrogate
    assert bad.status_code == 422 and "Unicode" in bad.json()["error"]["message"]
    unknown = _complete(server.url, model="gpt-4")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert _complete(server.url, model="cacheaug").status_code == 200
    for r, code in (
        (httpx.get(f"{server.url}/nope"), 404),
        (httpx.get(f"{server.url}/v1/completions"), 405),
        (httpx.post(f"{server.url}/v1/completions", content=b"{not json"), 422),
    ):
        assert r.status_code == code and set(r.json()) == {"error"}, r.text


def test_a_stream_sends_its_finish_reason_once(stack):
    """Issue 38.7: a stream ending on end of text or a stop string sent ``finish_reason`` twice."""
    model, tok, engine, server = stack
    text = _library(model, tok, True)
    stop = text.split()[2]  # a word the stream reaches
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        timeout=30,
        json={"prompt": PROMPT, "max_tokens": 8, "stream": True, "stop": stop},
    ) as r:
        events = [
            json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"
        ]
    reasons = [e["choices"][0]["finish_reason"] for e in events]
    assert reasons.count("stop") == 1 and reasons[-1] == "stop" and set(reasons[:-1]) == {None}


def test_augment_endpoint_without_a_coprocessor_is_refused(tmp_path):
    """Issue 38.2: a server without a coprocessor ran a placeholder for /v1/augment and stored its latents."""
    model = CacheAugmentedLM.frozen(tiny_model("llama"))  # what `cacheaug serve` without --coprocessor builds
    assert model.coprocessor is None and not model.enabled
    model.enabled = True  # cannot turn on what is not there
    assert not model.enabled
    tok = tiny_tokenizer([WORDS])
    engine = Engine(model, CacheStore(directory=tmp_path / "store", fingerprint="t"))
    server = Server(create_app(engine, tok))
    try:
        r = httpx.post(f"{server.url}/v1/augment", json={"prompt": "w5 w17 w40 w9"}, timeout=30)
        assert r.status_code == 400 and "--coprocessor" in r.json()["error"]["message"]
        assert len(engine.store) == 0
        sync = _complete(server.url, augment="sync").json()
        assert sync["choices"][0]["text"] == tok.decode(
            model.generate(torch.tensor([tok(PROMPT)["input_ids"]]), 8, augment=False, eos_token_id=[])[0, -8:]
        )
    finally:
        server.stop()
        engine.close()


class _Bytes:
    """A tokenizer whose tokens are UTF-8 bytes (as byte-fallback vocabularies spell rare characters)."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(tokens, stops=(), eos_at=None):
    from cacheaug.serving.protocol import TextStream

    out, pieces = TextStream(_Bytes(), list(stops)), []
    for i, t in enumerate(tokens):
        piece, stopped = out.push(t, end=i == eos_at)
        pieces.append(piece)
        if stopped:
            return pieces, True
    return pieces + [out.flush()], False


def test_characters_spelled_as_byte_tokens_come_out_whole():
    """Issue 38.1: each piece kept the U+FFFD of an incomplete character and skipped the completed one."""
    text = "𓀀𓀁𓀂 ok 😀 é"
    pieces, _ = _stream(list(text.encode()))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    cut, _ = _stream(list("𓀀𓀁".encode())[:-1])  # ends inside a character: given out as decoded, at the end
    assert "".join(cut) == "𓀀\ufffd"


def test_a_stop_string_across_tokens_ends_the_text_right_before_it():
    """Issue 38.8: a stop string beginning inside one token and ending in the next left its head in the text."""
    pieces, stopped = _stream(list(b"hello world, bye"), stops=["o w"])
    assert stopped and "".join(pieces) == "hell"
    pieces, stopped = _stream(list(b"a stop-ish end"), stops=["stopper"])  # a head that never completes
    assert not stopped and "".join(pieces) == "a stop-ish end"


def test_stop_strings_are_bounded(stack):
    model, tok, engine, server = stack
    too_many = _complete(server.url, stop=[f"s{i}" for i in range(5)])
    assert too_many.status_code == 422
    # one line naming the field, not pydantic's names of the union's members ("stop.list[function-after[...")
    message = too_many.json()["error"]["message"]
    assert message.startswith("invalid request: stop: List should have at most 4 items") and "[" not in message
    assert " or Input should be a valid string" in message  # the union's other member: one string
    assert _complete(server.url, stop="x" * 257).status_code == 422
    assert _complete(server.url, stop=["w1", "w2", "w3", "w4"]).status_code == 200


def test_chat_content_parts_developer_role_and_checked_stream_options(stack):
    """Issue 38.10: the official SDK sends content as a list of parts and the `developer` role (both were 422);
    stream_options was an unchecked dict ({"include_usage": "no"} turned usage on)."""
    model, tok, engine, server = stack
    url = f"{server.url}/v1/chat/completions"

    def chat(**body):
        return httpx.post(url, timeout=30, json={"max_tokens": 4, **body})

    plain = chat(messages=[{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4"}]).json()
    parts = chat(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "w1 "}, {"type": "text", "text": "w2"}]},
            {"role": "user", "content": [{"type": "text", "text": "w3 w4"}]},
        ]
    ).json()
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert parts["usage"] == plain["usage"]
    msgs = [{"role": "user", "content": "w3"}]
    assert chat(messages=msgs, stream=True, stream_options={"include_usage": "no"}).status_code == 422
    assert chat(messages=msgs, stream=True, stream_options={"include_usage": True, "x": 1}).status_code == 422
    assert chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]).status_code == 422


def test_store_write_failures_are_a_clear_507_and_serving_goes_on(stack, tmp_path, monkeypatch):
    """Issue 38.5: a full disk or a read-only store made /v1/augment a bare 500; a store folder deleted while serving
    failed every later write."""
    import shutil

    from cacheaug import atomic

    model, tok, engine, server = stack
    shutil.rmtree(tmp_path / "store")  # deleted while serving: made again
    ok = httpx.post(f"{server.url}/v1/augment", json={"prompt": "w5 w17"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["cache_id"] in CacheStore(directory=tmp_path / "store", fingerprint="t")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "write_file", full)
    r = httpx.post(f"{server.url}/v1/augment", json={"prompt": "w9 w33 w81"}, timeout=30)
    assert r.status_code == 507 and "No space left on device" in r.json()["error"]["message"]
    assert len(engine.store) == 1  # nothing stored
    assert _complete(server.url, augment="sync").status_code == 200


def test_exactly_max_concurrent_plus_max_queue_requests_are_all_served(stack):
    """Issue 38.9: at exactly max_concurrent + max_queue requests one spurious 429 came in about one burst of ten
    (a waiter handed a freed slot still counted as waiting). Twelve bursts of 2 + 4 requests: every one served."""
    from concurrent.futures import ThreadPoolExecutor

    model, tok, engine, server = stack
    with ThreadPoolExecutor(6) as pool:
        for _ in range(12):
            codes = list(pool.map(lambda _: _complete(server.url, augment="off", max_tokens=3).status_code, range(6)))
            assert codes == [200] * 6


def test_a_client_that_leaves_while_queued_gets_no_prefill(stack, monkeypatch):
    """Issue 38.9: clients that left while queued still got a prefill and ~15 decoding steps each."""
    from concurrent.futures import ThreadPoolExecutor

    model, tok, engine, server = stack  # max_concurrent=2
    real = model.coprocessor.forward

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(model.coprocessor, "forward", slow)  # two sync requests hold both slots for 1.5 s
    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(_complete, server.url, augment="sync", deadline_ms=5000, max_tokens=2) for _ in range(2)]
        time.sleep(0.5)
        with pytest.raises(httpx.TimeoutException):  # queued behind them, the client gives up
            httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8}, timeout=0.3)
        assert [h.result().status_code for h in holders] == [200, 200]
    time.sleep(0.5)  # the left client's turn has come and gone
    assert engine.stats.requests == 2  # it never reached the engine
    assert _complete(server.url, augment="off").status_code == 200


def test_the_gate_policy_over_http(stack):
    """`augment: "gate"` without a gate: 400 naming `train-gate`; with a gate that never fires: the frozen model's
    text; with one that always fires: sync's."""
    from cacheaug.gate import Gate, GateConfig

    model, tok, engine, server = stack
    r = _complete(server.url, augment="gate")
    assert r.status_code == 400 and "train-gate" in r.json()["error"]["message"]
    model.gate = Gate(GateConfig(hidden_size=model.base.config.hidden_size))
    try:
        for bias, want in ((-50.0, _library(model, tok, False)), (50.0, _library(model, tok, True))):
            model.gate.linear.bias.data.fill_(bias)
            r = _complete(server.url, augment="gate", temperature=0)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    finally:
        model.gate = None
