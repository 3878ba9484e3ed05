"""Rotary tables (speed option ``rope_table``, cacheaug.rope): the rotary modules look cos/sin up in a table of every
position; the training pass must compute exactly what it computes without, and what inference computes."""

import copy

import pytest
import torch

from cacheaug import CoprocessorConfig, build_model
from cacheaug.rope import table_rotary
from cacheaug.speed import apply_speed_options, parse_variant
from cacheaug.testing import FAMILIES, attn_for, max_trace_error, perturb_trainable, tiny_model

T = 40
POSITIONS = torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]])


def _rotaries(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


@pytest.mark.parametrize("family", FAMILIES)
def test_tables_give_the_modules_own_values(family):
    base = tiny_model(family, attn_for(family))
    rotary = _rotaries(base)[0]
    plain = copy.deepcopy(rotary)
    assert table_rotary(rotary) and table_rotary(rotary)  # idempotent
    keys = [(t,) for t in rotary.layer_types] if family == "gemma3" else [()]
    pos = torch.tensor([[0, 5, 255, 17], [3, 3, 128, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(2, 4, 8, dtype=dtype)
        for key in keys:
            for got, want in zip(rotary(x, pos, *key), plain(x, pos, *key)):
                assert got.dtype == want.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_pass_with_tables_is_unchanged_and_equals_inference(family):
    model = build_model(
        tiny_model(family, attn_for(family)), CoprocessorConfig(n_latents=3, n_ahead=5, n_traces=4, lora_rank=4)
    )
    perturb_trainable(model)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(model)
    apply_speed_options(model, rope_table=True)
    assert all(hasattr(m, "_cacheaug_rope_tables") for m in _rotaries(model))
    assert len(_rotaries(model)) == 2  # the decoder's and the coprocessor's (a copy of the decoder)
    outs = []
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        out = m(ids, positions=POSITIONS)
        out.loss.backward()
        outs.append((out.token_losses.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    for name, grad in outs[0][1].items():
        assert torch.equal(grad, outs[1][1][name]), name
    worst, _ = max_trace_error(model, ids, POSITIONS)
    assert worst <= 1e-4, worst


@pytest.mark.slow  # slow tier: torch.compile
def test_compiled_pass_computes_no_cos_with_tables():
    """Compiled, the training pass with tables holds no cos/sin (the table lookups instead), and is one graph."""
    import torch._dynamo

    def count_trig(model):
        seen = []

        def backend(gm, example_inputs):
            seen.append(
                sum(
                    1
                    for n in gm.graph.nodes
                    if n.op in ("call_function", "call_method")
                    and getattr(n.target, "__name__", n.target) in ("cos", "sin")
                )
            )
            return gm.forward

        torch._dynamo.reset()
        ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
        try:
            model.compile_training(backend=backend, fullgraph=True)
            model(ids, positions=POSITIONS).loss.backward()  # (the compiled pass: gradients on)
        finally:
            model._compiled_pass = None
            torch._dynamo.reset()
        return seen

    model = build_model(tiny_model("gemma3", "sdpa"), CoprocessorConfig(n_latents=3, n_ahead=5, n_traces=4))
    assert sum(count_trig(model)) > 0  # the modules' own computation, traced into the graph
    apply_speed_options(model, rope_table=True)
    trig = count_trig(model)
    assert len(trig) == 1 and trig[0] == 0, trig


def test_input_dependent_rotaries_are_left_alone():
    base = tiny_model("llama", "sdpa")
    rotary = _rotaries(base)[0]
    rotary.rope_type = "dynamic"
    forward = rotary.forward
    assert not table_rotary(rotary)
    assert rotary.forward == forward and not hasattr(rotary, "_cacheaug_rope_tables")


def test_variant_and_config():
    from cacheaug.train import TrainConfig

    assert parse_variant("sdpa+graphs+keeplogits+k+r") == {
        **parse_variant("sdpa+graphs+keeplogits+k"),
        "rope_table": True,
    }
    assert parse_variant("sdpa")["rope_table"] is False
    assert TrainConfig.from_flat(rope_table=True).rope_table


def test_equal_tables_are_kept_once():
    """The coprocessor's copy of the decoder gets the decoder's tables themselves (one copy in memory); a rotary of
    other frequencies keeps its own, with its own values."""
    from cacheaug.rope import table_rotaries

    model = build_model(tiny_model("gemma3", "sdpa"), CoprocessorConfig(n_latents=3, n_ahead=5, n_traces=4))
    apply_speed_options(model, rope_table=True)
    dec, cop = _rotaries(model)
    assert dec is not cop and dec._cacheaug_rope_tables.keys() == cop._cacheaug_rope_tables.keys()
    for key, (cos, sin) in dec._cacheaug_rope_tables.items():
        assert cop._cacheaug_rope_tables[key][0] is cos and cop._cacheaug_rope_tables[key][1] is sin
    local, full = (dec._cacheaug_rope_tables[(t,)][0] for t in ("sliding_attention", "full_attention"))
    assert local is not full  # the layer types' frequencies differ: two tables

    first, second = (_rotaries(tiny_model("gemma3", "sdpa"))[0] for _ in range(2))
    with torch.no_grad():
        for buf in second.buffers():
            if buf.is_floating_point():
                buf.mul_(2)
    plain = copy.deepcopy(second)
    assert table_rotaries([first, second]) == 2
    for key, (cos, _) in second._cacheaug_rope_tables.items():
        assert cos is not first._cacheaug_rope_tables[key][0]
    pos, x = torch.tensor([[0, 5, 255, 17]]), torch.zeros(1, 4, 8)
    for got, want in zip(second(x, pos, "full_attention"), plain(x, pos, "full_attention")):
        assert torch.equal(got, want)
