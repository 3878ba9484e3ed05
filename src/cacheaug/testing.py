"""Test utilities: tiny random-init models of every supported family, and the independent slow path.

The slow path is what the training pass must equal: run :meth:`CacheAugmentedLM.augment` on the prefix
``ids[:, :p+1]``, then let the unmodified base model decode the ahead tokens from the augmented cache.
"""

from __future__ import annotations

import torch

from .families import FAMILIES as _REGISTRY
from .families import TINY_WINDOW as WINDOW  # noqa: F401  (tests import it from here)

FAMILIES = tuple(_REGISTRY)  # the built-in families (cacheaug.families.register_family adds more)


def tiny_config(family: str):
    """The family's 3-layer config, mixed full / sliding-window (window 8) layers where the family has them."""
    if family not in _REGISTRY:
        raise KeyError(f"unknown family {family!r}; choose from {tuple(_REGISTRY)}")
    return _REGISTRY[family].tiny_config()


def attn_for(family: str) -> str:
    """The attention the family computes exactly on the CPU: sdpa unless sdpa changes it (then eager)."""
    return "sdpa" if _REGISTRY[family].sdpa_exact else "eager"


def tiny_model(family: str = "gemma3", attn: str = "sdpa", seed: int = 0, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


def random_gemma3_270m(device="cpu", attn: str = "sdpa", dtype=None, seed: int = 0):
    """Gemma 3 270M's architecture at random weights (its 268,098,176 parameters: 18 layers, five sliding of window
    512 to one full, 4 query heads on 1 key head of 256, width 640, MLP 2048, vocabulary 262,144), in the dtype
    load_base_model picks (bf16 on a GPU): the real model's shapes and kernels for timing, nothing to stage."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    device = torch.device(device)
    config = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        sliding_window=512,
        query_pre_attn_scalar=256,
        tie_word_embeddings=True,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    )
    torch.manual_seed(seed)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(device).eval()


def perturb_trainable(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor off its initial value (e.g. LoRA's B = 0), so tests see a generic coprocessor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * p.detach().abs().mean().clamp_min(1e-2) * torch.randn(p.shape, generator=g).to(p))


def reference_losses(model, ids: torch.Tensor, p: int) -> torch.Tensor:
    """Per-offset losses ``[N_A]`` (float32) of trace p for one sequence ``ids`` ``[1, T]``: ``augment`` on
    ``ids[:, :p+1]``, then plain decoding of the ahead tokens by the unmodified base model."""
    from .evaluate import continuation_losses

    return continuation_losses(model, ids, p, model.config.n_ahead)


def trace_errors(model, ids: torch.Tensor, positions: torch.Tensor):
    """|training-pass loss - reference loss| ``[B, K, N_A]`` for every trace and offset, and the training output."""
    with torch.no_grad():
        out = model(ids, positions=positions, return_base_losses=True)
    ref = torch.stack(
        [
            torch.stack([reference_losses(model, ids[b : b + 1], p) for p in positions[b].tolist()])
            for b in range(ids.shape[0])
        ]
    )  # [B, K, N_A]
    return (out.token_losses - ref).abs(), out


def max_trace_error(model, ids: torch.Tensor, positions: torch.Tensor) -> tuple[float, "object"]:
    """Largest |training-pass loss - reference loss| over every trace and offset, and the training output."""
    err, out = trace_errors(model, ids, positions)
    return err.max().item(), out


def assert_compiled_pass_is_one_graph(model, ids: torch.Tensor, positions: torch.Tensor) -> None:
    """The training pass compiled whole (aot_eager: no C++ toolchain needed) is one graph, with the eager losses."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        eager = model(ids, positions=positions).token_losses.detach()
        model.compile_training(backend="aot_eager", fullgraph=True)
        compiled = model(ids, positions=positions)
        compiled.loss.backward()
        torch.testing.assert_close(compiled.token_losses, eager, rtol=1e-5, atol=1e-5)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


def assert_same_as_packed(model, ids: torch.Tensor, positions: torch.Tensor, option: str, off) -> None:
    """Losses, latents and gradients of ``model`` as set up against the same model with the speed option ``option``
    set to ``off`` (the packed layout of the trace passes), then restored."""
    model.zero_grad(set_to_none=True)
    tried = model(ids, positions=positions)
    tried.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    on = getattr(model, option)
    setattr(model, option, off)
    try:
        model.zero_grad(set_to_none=True)
        packed = model(ids, positions=positions)
        packed.loss.backward()
    finally:
        setattr(model, option, on)
    torch.testing.assert_close(tried.token_losses, packed.token_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tried.latents, packed.latents, rtol=1e-5, atol=1e-5)
    assert grads
    for name, p in model.named_parameters():
        if p.grad is not None:  # fp32 sums in another order: compare at the gradient's own scale
            assert (grads[name] - p.grad).abs().max() <= 1e-4 * p.grad.abs().max().clamp_min(1e-3), name


def generate_concurrently(engine, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """``engine.generate`` of every prompt at once, one thread each (as concurrent clients); the tokens of each."""
    import threading

    results: list = [None] * len(prompts)

    def client(i):
        results[i] = engine.generate(prompts[i], max_new_tokens, **kwargs)[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def tiny_tokenizer(texts: list[str], vocab_size: int = 128, add_bos: bool = True):
    """A word-level fast tokenizer over ``texts`` whose ids fit the tiny models (<pad>=0, <eos>=1, <bos>=2); it starts
    a text with <bos> as Gemma's does (``add_bos=False``: it never adds its bos_token, as SmolLM2's)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    counts = Counter(w for t in texts for w in t.split())
    words = [w for w, _ in counts.most_common(vocab_size - len(specials))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:  # as Gemma's: a text starts with <bos>
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_corpus(folder, n_docs: int = 60, seed: int = 0) -> list[str]:
    """Write ``n_docs`` random word documents as .txt and .jsonl files into ``folder``; returns the texts."""
    import json
    import random
    from pathlib import Path

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(150)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) for _ in range(n_docs)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = n_docs // 2
    for i, t in enumerate(texts[:half]):
        (folder / f"doc{i:03d}.txt").write_text(t)
    with open(folder / "rest.jsonl", "w") as f:
        for t in texts[half:]:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def tiny_served_folders(root, tokenizer, family: str = "llama"):
    """A tiny model folder (``root/model``, with ``tokenizer``) and a perturbed coprocessor checkpoint (``root/ckpt``)
    for ``cacheaug serve``; returns both paths."""
    from pathlib import Path

    from .config import CoprocessorConfig
    from .model import CacheAugmentedLM

    root = Path(root)
    base = tiny_model(family)
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=3, n_ahead=4))
    perturb_trainable(model, scale=1.0)
    model.save_pretrained(root / "ckpt")
    return root / "model", root / "ckpt"


class ServeCLI:
    """``python -m cacheaug serve ARGS`` in a subprocess on a free local port, as a context manager whose value is the
    base URL once ``/health`` answers; its stderr goes to ``log``."""

    def __init__(self, args, log, env: dict | None = None, timeout_s: float = 60.0):
        import os

        self.args, self.log, self.timeout_s = [str(a) for a in args], log, timeout_s
        self.env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}

    def __enter__(self) -> str:
        import socket
        import subprocess
        import sys
        import time
        from pathlib import Path

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cacheaug", "serve", *self.args, "--port", str(port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(Path(self.log).read_text()[-3000:])
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError(f"`cacheaug serve` did not answer /health within {self.timeout_s} s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)
