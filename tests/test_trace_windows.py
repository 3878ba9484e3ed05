"""Trace windows (speed option): one trace per row, each layer gathering only the text keys the trace can see.

The windowed pass must compute exactly what the packed pass and inference (augment, then plain decoding) compute,
and must really read fewer keys."""

import pytest
import torch

from cacheaug import CoprocessorConfig, build_model, masks, windows
from cacheaug.arms import arm_names
from cacheaug.families import SLIDING, TINY_WINDOW
from cacheaug.speed import apply_speed_options, parse_variant
from cacheaug.testing import (
    FAMILIES,
    assert_compiled_pass_is_one_graph,
    assert_same_as_packed,
    attn_for,
    max_trace_error,
    perturb_trainable,
    tiny_model,
)

T, N_A, N_L = 40, 5, 3
POSITIONS = torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]])  # a repeated point; both extremes; some before the window
LEVERS = dict(position_scheme="overlap", reread_last=True, echo_residual=True)
WINDOWED = ["gemma3", "qwen2", "qwen3"]  # sdpa with one mask per layer type


def _padded(keys: int) -> int:
    return -(-keys // windows.KEY_PAD) * windows.KEY_PAD


def _model(family="gemma3", init="copy", groups=1, chunk=0, kernel=False, **levers):
    """A tiny model with trace windows (``kernel``: through cacheaug's kernel; tests/test_prefix_attention.py)."""
    model = build_model(
        tiny_model(family, "sdpa"),
        CoprocessorConfig(n_latents=N_L, n_ahead=N_A, n_traces=4, init=init, lora_rank=4, **levers),
    )
    perturb_trainable(model)
    apply_speed_options(model, trace_groups=groups, trace_chunk=chunk, trace_windows=True, trace_kernel=kernel)
    return model


def _spy_keys(monkeypatch):
    """(sliding, rows, folded queries, keys) of every windowed attention call."""
    seen, real = [], windows.trace_attention

    def spy(module, query, key, value, keys, *args, **kwargs):
        out = real(module, query, key, value, keys, *args, **kwargs)
        seen.append((module.sliding_window is not None, keys.mask.shape[0], keys.mask.shape[2], keys.mask.shape[-1]))
        return out

    monkeypatch.setattr(windows, "trace_attention", spy)
    return seen


@pytest.mark.parametrize("family", WINDOWED)
@pytest.mark.parametrize("chunk", [0, 2])
def test_windowed_pass_equals_inference_for_every_family(family, chunk, monkeypatch):
    model = _model(family, chunk=chunk)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    seen = _spy_keys(monkeypatch)
    worst, out = max_trace_error(model, ids, POSITIONS)
    assert worst <= 1e-4, f"windowed training pass differs from augment+decode by {worst}"
    assert (out.token_losses - out.base_token_losses).abs().max() > 1e-2  # the latents matter
    # every layer of both passes ran windowed, the query heads folded (2 per key head): a sliding layer one trace per
    # row against its W-1 text keys and its block, a full layer C traces per row against the text and their blocks
    heads, C = 4 // 2, max(chunk, 1)
    L_dec = N_L + N_A - 1
    expected = set()
    for sliding in {layer_type == SLIDING for layer_type in model.family.layer_types}:
        for L in (N_L, L_dec):
            rows = 1 if sliding else C
            keys = _padded((TINY_WINDOW - 1 if sliding else T) + rows * L)
            expected.add((sliding, 8 // rows, heads * rows * L, keys))
    assert set(seen) == expected, (set(seen), expected)


@pytest.mark.parametrize("init", [a for a in arm_names() if a != "lora-decoder"])
@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["default", "levers"])
def test_windowed_pass_for_every_arm_and_lever(init, levers, monkeypatch):
    model = _model(init=init, chunk=2, **levers)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(1))
    seen = _spy_keys(monkeypatch)
    worst, _ = max_trace_error(model, ids, POSITIONS)
    assert seen and worst <= 1e-4, (seen[:2], worst)
    assert_same_as_packed(model, ids, POSITIONS, "trace_windows", False)


def test_windows_within_trace_groups(monkeypatch):
    monkeypatch.setattr(masks, "KEY_ALIGN", 4)  # key lengths 20 and 36 of 40 at G=2
    model = _model(groups=2, chunk=2)  # 2 traces per group: the full layers run each group as one row
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 19, 20, 34], [5, 6, 22, 30]])
    seen = _spy_keys(monkeypatch)
    worst, _ = max_trace_error(model, ids, positions)
    full_keys = {keys for sliding, _, _, keys in seen if not sliding}
    # each group's full layers read only its text (20 and 36 keys), then the group's two blocks
    assert full_keys == {_padded(S + 2 * L) for S in (20, 36) for L in (N_L, N_L + N_A - 1)} and worst <= 1e-4
    assert_same_as_packed(model, ids, positions, "trace_windows", False)


def test_sdpa_calls_without_trace_keys_are_unchanged():
    """The installed wrapper hands every other sdpa call to the function registered before it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _model()
    wrapper = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert wrapper._cacheaug_trace_windows
    windows.install()  # idempotent: no wrapper around the wrapper
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is wrapper
    base = tiny_model("gemma3", "sdpa")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        wrapped = base(ids).logits
        eager = tiny_model("gemma3", "eager")
        eager.load_state_dict(base.state_dict())
        torch.testing.assert_close(wrapped, eager(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # slow tier: torch.compile
def test_compiled_windowed_pass_is_one_graph_equal_to_eager():
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    assert_compiled_pass_is_one_graph(_model(), ids, POSITIONS)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in WINDOWED])
def test_families_it_cannot_run_are_refused(family):
    model = build_model(tiny_model(family, attn_for(family)), CoprocessorConfig(n_latents=N_L, n_ahead=N_A, n_traces=4))
    with pytest.raises(ValueError, match="Use trace_chunk instead"):
        apply_speed_options(model, trace_windows=True)
    assert not model.trace_windows


def test_bad_combinations_are_refused():
    from cacheaug.train import TrainConfig

    with pytest.raises(ValueError, match="Use trace_chunk instead"):
        _model_eager = build_model(tiny_model("gemma3", "eager"), CoprocessorConfig(n_latents=N_L, n_traces=4))
        _model_eager.trace_windows = True
    with pytest.raises(ValueError, match="must divide the traces"):
        apply_speed_options(_model(), trace_chunk=3, trace_windows=True)
    assert parse_variant("sdpa+graphs+w+keeplogits")["trace_windows"] is True
    assert parse_variant("sdpa+w+c8") | {} == parse_variant("sdpa+c8+w")  # windows, full layers 8 traces per row
    assert parse_variant("sdpa+c8")["trace_windows"] is False
    with pytest.raises(ValueError, match="bad variant"):
        parse_variant("sdpa+w+w")
    assert TrainConfig.from_flat(n_traces=8, trace_chunk=4, trace_windows=True).trace_windows
    with pytest.raises(ValueError, match="--trace-chunk 3"):
        TrainConfig.from_flat(n_traces=8, trace_chunk=3, trace_windows=True)
