"""Trace chunks (speed option): the trace passes run C traces per row against a copy of the text keys.

The chunked pass must compute exactly what the packed pass (all K traces in one row) and inference compute."""

import pytest
import torch

from cacheaug import CoprocessorConfig, build_model, masks
from cacheaug.arms import arm_names
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

T, N_A = 40, 5
POSITIONS = torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]])  # a repeated point; both extremes
LEVERS = dict(position_scheme="overlap", reread_last=True, echo_residual=True)
CASES = [(f, a) for f in FAMILIES for a in ("sdpa", "eager") if a != "sdpa" or attn_for(f) == "sdpa"]


def _model(family="gemma3", attn="sdpa", init="copy", chunk=2, groups=1, **levers):
    model = build_model(
        tiny_model(family, attn),
        CoprocessorConfig(n_latents=3, n_ahead=N_A, n_traces=4, init=init, lora_rank=4, **levers),
    )
    perturb_trainable(model)
    apply_speed_options(model, trace_groups=groups, trace_chunk=chunk)
    return model


def _spy_rows(model):
    """The (rows, traces per row) of every packed trace pass the model runs."""
    seen, packed = [], model._traces_packed

    def spy(ids, prefix_kv, positions):
        seen.append(tuple(positions.shape))
        return packed(ids, prefix_kv, positions)

    model._traces_packed = spy
    return seen


@pytest.mark.parametrize("family,attn", CASES)
@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_pass_equals_inference_for_every_family(family, attn, chunk):
    model = _model(family, attn, chunk=chunk)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    seen = _spy_rows(model)
    worst, out = max_trace_error(model, ids, POSITIONS)
    assert seen[0] == (2 * 4 // chunk, chunk), seen  # the chunked layout ran: B*K/C rows of C traces
    assert worst <= 1e-4, f"chunked training pass differs from augment+decode by {worst}"
    assert (out.token_losses - out.base_token_losses).abs().max() > 1e-2  # the latents matter


@pytest.mark.parametrize("init", [a for a in arm_names() if a != "lora-decoder"])
@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["default", "levers"])
def test_chunked_pass_for_every_arm_and_lever(init, levers):
    model = _model(init=init, **levers)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(1))
    seen = _spy_rows(model)
    worst, _ = max_trace_error(model, ids, POSITIONS)
    assert seen and seen[0] == (4, 2) and worst <= 1e-4, (seen, worst)
    assert_same_as_packed(model, ids, POSITIONS, "trace_chunk", 0)


def test_chunks_within_trace_groups(monkeypatch):
    monkeypatch.setattr(masks, "KEY_ALIGN", 4)  # key lengths 20 and 36 of 40 at G=2
    model = _model(groups=2, chunk=1)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 19, 20, 34], [5, 6, 22, 30]])
    seen = _spy_rows(model)
    worst, _ = max_trace_error(model, ids, positions)
    assert seen[:2] == [(4, 1), (4, 1)] and worst <= 1e-4  # two groups of 2 traces, one trace per row
    assert_same_as_packed(model, ids, positions, "trace_chunk", 0)


def test_other_trace_counts_run_packed():
    model = _model(chunk=2)
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(3))
    seen = _spy_rows(model)
    worst, _ = max_trace_error(model, ids, torch.tensor([[4, 9, 30]]))  # 3 traces: not a multiple of 2
    assert seen[0] == (1, 3) and worst <= 1e-4


@pytest.mark.slow  # slow tier: torch.compile
def test_compiled_chunked_pass_is_one_graph_equal_to_eager():
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    assert_compiled_pass_is_one_graph(_model(chunk=2), ids, POSITIONS)


def test_bad_chunks_are_refused():
    from cacheaug.train import TrainConfig

    model = _model(chunk=0)
    with pytest.raises(ValueError, match="must divide the traces"):
        apply_speed_options(model, trace_chunk=3)
    with pytest.raises(ValueError, match="must divide the traces"):
        apply_speed_options(model, trace_groups=2, trace_chunk=4)  # 2 traces per group
    assert parse_variant("sdpa+graphs+c8+keeplogits")["trace_chunk"] == 8
    assert parse_variant("sdpa")["trace_chunk"] == 0
    with pytest.raises(ValueError, match="bad variant"):
        parse_variant("sdpa+c2+c4")
    with pytest.raises(ValueError, match="--trace-chunk 3"):
        TrainConfig.from_flat(n_traces=8, trace_chunk=3)
