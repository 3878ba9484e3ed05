"""Coprocessor checkpoints: a folder like a PEFT adapter, safetensors only.

    ckpt/
      coprocessor_config.json   CoprocessorConfig, cacheaug version, the base model's identity + fingerprint
      model.safetensors         the coprocessor's trainable tensors only (never the frozen base)
      gate_config.json, gate.safetensors   optional: the gate fitted by `cacheaug train-gate` (cacheaug.gate)

Files are written to a temporary name and renamed into place (config last), so a crash never leaves a
folder that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import atomic
from .arms import get_arm
from .config import CoprocessorConfig

CONFIG_NAME = "coprocessor_config.json"
WEIGHTS_NAME = "model.safetensors"
_SAMPLES_PER_TENSOR = 4096


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """A short hash identifying a model's weights, independent of its dtype (fp32 or bf16) and device.

    It hashes every parameter's name and shape and up to 4096 evenly spaced values rounded to bf16, so
    it takes milliseconds even for large models, and the same weights loaded in fp32 or bf16 agree.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        k = min(_SAMPLES_PER_TENSOR, flat.numel())
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)  # exact in int64
        sample = flat[idx].to(torch.bfloat16).cpu().view(torch.int16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _base_identity(base: nn.Module) -> dict:
    cfg = base.config
    return {
        "name_or_path": getattr(cfg, "_name_or_path", "") or getattr(base, "name_or_path", ""),
        "model_type": cfg.model_type,
        "architecture": type(base).__name__,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "fingerprint": fingerprint(base),
    }


def save_coprocessor(model: nn.Module, path: str | Path, tensors: dict | None = None) -> Path:
    from . import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous().cpu() for n, t in (tensors or model.trainable_state_dict()).items()}
    meta = {
        "cacheaug_version": __version__,
        "coprocessor": model.config.to_dict(),
        "base_model": _base_identity(model.base),
    }
    (path / CONFIG_NAME).unlink(missing_ok=True)  # the config marks a complete checkpoint: it goes last
    atomic.write_file(path / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic.write_file(path / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    if getattr(model, "gate", None) is not None:
        model.gate.save(path)
    return path


SHIPPED = {"gemma-3-270m-skills": "skills-gemma-3-270m"}  # short name -> folder under cacheaug/assets/


def shipped_checkpoint(name: str) -> Path | None:
    """The folder of a coprocessor shipped with cacheaug (``SHIPPED``), or None when ``name`` names none."""
    folder = SHIPPED.get(str(name))
    return None if folder is None else Path(__file__).parent / "assets" / folder


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a training run's ``out_dir`` (then its newest complete ``step_*`` checkpoint), or the
    short name of a coprocessor shipped with cacheaug (``gemma-3-270m-skills``)."""
    path = Path(path)
    if not path.exists() and shipped_checkpoint(str(path)) is not None:
        return shipped_checkpoint(str(path))
    if (path / CONFIG_NAME).is_file() or not path.is_dir():
        return path
    steps = sorted(p for p in path.glob("step_*") if (p / CONFIG_NAME).is_file())
    return steps[-1] if steps else path


def read_config(path: str | Path) -> dict:
    path = resolve_checkpoint(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a cacheaug coprocessor checkpoint: {CONFIG_NAME} is missing (an interrupted save, or "
            "the wrong folder)."
        )
    try:
        meta = json.loads(cfg_file.read_text())
        meta["coprocessor"], meta["base_model"]["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{cfg_file} is corrupt or not a cacheaug config ({err}).") from err
    return meta


def recorded_base(path: str | Path) -> str:
    """The base model a checkpoint was trained on, as recorded in it (its name or folder)."""
    name = read_config(resolve_checkpoint(path))["base_model"].get("name_or_path")
    if not name:
        raise ValueError(
            f"{path} does not record its base model's name: pass the base model it was trained on "
            "(--model; in Python, from_pretrained(path, base))"
        )
    return name


def load_coprocessor(cls, path: str | Path, base: nn.Module, *, check_base: bool, check_finite: bool):
    path = resolve_checkpoint(path)
    meta = read_config(path)
    config = CoprocessorConfig.from_dict(meta["coprocessor"])
    want = meta["base_model"]
    if check_base:
        got = fingerprint(base)
        if got != want["fingerprint"]:
            raise ValueError(
                f"The coprocessor in {path} was trained for base model {want.get('name_or_path')!r} "
                f"({want.get('architecture')}, fingerprint {want['fingerprint']}), but the given base model "
                f"{getattr(base.config, '_name_or_path', '')!r} ({type(base).__name__}) has fingerprint {got}. "
                f"Pass --model {want.get('name_or_path') or 'BASE'} (the base it was trained on); in Python, "
                "CacheAugmentedLM.from_pretrained(..., check_base=False) skips this check."
            )
    wants = get_arm(config.init).model_class  # the arm's own class (e.g. the LoRA-decoder control)
    if wants is not None and not issubclass(cls, wants):
        cls = wants
    model = cls(base, config, check_finite=check_finite, _calibrate=False)
    load_trainable(model, path)
    from .gate import Gate

    gate = Gate.load(path, getattr(base.config, "hidden_size", None))
    model.gate = None if gate is None else gate.to(model.device)
    return model


def load_trainable(model: nn.Module, path: str | Path) -> None:
    """Copy the tensors of ``path/model.safetensors`` into ``model``'s trainable parameters (strict)."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the checkpoint is incomplete.")
    try:
        state = load_file(str(weights), device=str(model.device))
    except Exception as err:  # safetensors raises its own error types on truncated files
        raise ValueError(f"{weights} is corrupt or truncated ({err}).") from err
    params = {n: p for n, p in model.coprocessor.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match a {model.config.init!r} coprocessor for this base model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(
                    f"{weights}: tensor {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}."
                )
            p.copy_(state[name])


def export_weights(src: str | Path, dst: str | Path, dtype: str = "float32") -> Path:
    """A weights-only copy of a checkpoint for sharing: its ``coprocessor_config.json`` and ``model.safetensors``
    (cast to ``dtype``: ``float32`` or ``bfloat16``, half the size), without the optimizer state that a training
    checkpoint carries (two thirds of its size). Loads like any checkpoint; it cannot resume training."""
    src, dst = resolve_checkpoint(src), Path(dst)
    meta = read_config(src)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    tensors = load_file(str(src / WEIGHTS_NAME))
    tensors = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in tensors.items()}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONFIG_NAME).unlink(missing_ok=True)
    atomic.write_file(dst / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic.write_file(dst / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    from .gate import Gate

    gate = Gate.load(src)
    if gate is not None:
        gate.save(dst)
    return dst
