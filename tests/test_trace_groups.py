"""Trace groups (speed option): stratified insertion points, each group's passes read only its text prefix.

The grouped pass must compute exactly what the ungrouped pass and inference compute for the same points."""

import pytest
import torch

from cacheaug import CoprocessorConfig, build_model, masks
from cacheaug.masks import group_edges, group_key_lengths, groups_fitting, stratified_positions
from cacheaug.speed import apply_speed_options
from cacheaug.testing import assert_compiled_pass_is_one_graph, max_trace_error, perturb_trainable, tiny_model

T, N_A = 40, 5  # 35 valid insertion points


@pytest.fixture(autouse=True)
def _small_key_align(monkeypatch):
    monkeypatch.setattr(masks, "KEY_ALIGN", 4)  # 40-token tests: key lengths 20 and 36 of 40 at G=2


def _model(family="gemma3", attn="sdpa", init="copy", groups=2, n_traces=4, **levers):
    model = build_model(
        tiny_model(family, attn),
        CoprocessorConfig(n_latents=3, n_ahead=N_A, n_traces=n_traces, init=init, lora_rank=4, **levers),
    )
    perturb_trainable(model)
    apply_speed_options(model, trace_groups=groups)
    return model


def _spy_key_lengths(model):
    seen = []
    traces = model._traces

    def spy(ids, prefix_kv, positions):
        seen.append(prefix_kv[0][0].shape[2])
        return traces(ids, prefix_kv, positions)

    model._traces = spy
    return seen


def test_stratified_sampling():
    edges = group_edges(35, 4)
    assert edges == [0, 8, 17, 26, 35]
    g = torch.Generator().manual_seed(0)
    pos = stratified_positions(500, 35, 8, 4, g)  # [500, 8]
    assert pos.shape == (500, 8)
    assert (pos.diff(dim=1) > 0).all()  # sorted and distinct
    for grp, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        part = pos[:, 2 * grp : 2 * grp + 2]
        assert part.min() == lo and part.max() == hi - 1  # every point of the segment is drawn, none outside
    # one group is the plain uniform sampler the model always used
    a = stratified_positions(3, 35, 4, 1, torch.Generator().manual_seed(5))
    b = torch.rand(3, 35, generator=torch.Generator().manual_seed(5)).argsort(dim=1)[:, :4].sort(dim=1).values
    assert torch.equal(a, b)


def test_key_lengths_cover_each_group():
    assert group_key_lengths(T, N_A, 2) == [20, 36]
    assert group_key_lengths(T, N_A, 1) == [36]
    pos = stratified_positions(200, T - N_A, 4, 2, torch.Generator().manual_seed(1))
    assert groups_fitting(pos, T, N_A, 2) == 2
    assert groups_fitting(torch.tensor([[0, 25, 26, 30]]), T, N_A, 2) == 1  # slot 1 (group 0) reads key 25 >= 20
    assert groups_fitting(torch.tensor([[0, 1, 2]]), T, N_A, 2) == 1  # 3 traces do not split into 2 groups


LEVERS = dict(position_scheme="overlap", reread_last=True, echo_residual=True)


@pytest.mark.parametrize(
    "family,attn,init,levers",
    [
        ("gemma3", "sdpa", "copy", {}),
        ("gemma3", "eager", "copy", {}),
        ("llama", "sdpa", "copy", {}),
        ("gemma3", "sdpa", "pause", {}),
        ("gemma3", "sdpa", "copy", LEVERS),
    ],
)
def test_grouped_pass_equals_ungrouped_pass_and_inference(family, attn, init, levers):
    model = _model(family, attn, init, **levers)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 19, 20, 34], [5, 6, 22, 30]])  # both extremes of both segments
    seen = _spy_key_lengths(model)
    worst, out = max_trace_error(model, ids, positions)
    assert seen[0] == 20 and seen[1] == 36, seen  # the grouped pass ran: group 0 read 20 text keys, not 40
    assert worst <= 1e-4, f"grouped training pass differs from augment+decode by {worst}"

    model.zero_grad(set_to_none=True)
    grouped = model(ids, positions=positions)
    grouped.loss.backward()
    g_grouped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.trace_groups = 1
    model.zero_grad(set_to_none=True)
    seen.clear()
    plain = model(ids, positions=positions)
    plain.loss.backward()
    assert seen == [T]
    torch.testing.assert_close(grouped.token_losses, plain.token_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.latents, plain.latents, rtol=1e-5, atol=1e-5)
    assert g_grouped
    for name, p in model.named_parameters():
        if p.grad is not None:
            # fp32 sums in another order: compare at the gradient's own scale
            assert (g_grouped[name] - p.grad).abs().max() <= 1e-4 * p.grad.abs().max().clamp_min(1e-3), name


def test_points_outside_the_groups_run_the_ungrouped_pass():
    model = _model()
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(2))
    seen = _spy_key_lengths(model)
    worst, _ = max_trace_error(model, ids, torch.tensor([[0, 25, 26, 30]]))  # uniform points, not stratified
    assert seen[0] == T and worst <= 1e-4


def test_sampled_points_are_stratified_and_grouped():
    model = _model(groups=2)
    ids = torch.randint(3, 128, (3, T), generator=torch.Generator().manual_seed(3))
    seen = _spy_key_lengths(model)
    out = model(ids, generator=torch.Generator().manual_seed(4))
    assert seen == [20, 36]
    assert (out.positions[:, :2] < 17).all() and (out.positions[:, 2:] >= 17).all()


@pytest.mark.slow  # slow tier: torch.compile
def test_compiled_grouped_pass_is_one_graph_equal_to_eager():
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    assert_compiled_pass_is_one_graph(_model(), ids, torch.tensor([[0, 19, 20, 34], [5, 6, 22, 30]]))


def test_lora_decoder_control_draws_the_same_points():
    model = _model(init="lora-decoder")
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(5))
    out = model(ids, generator=torch.Generator().manual_seed(4))
    out.loss.backward()
    ref = _model(groups=2)(ids, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out.positions, ref.positions)


def test_bad_group_counts_are_refused():
    model = _model(groups=1)
    with pytest.raises(ValueError, match="must divide the number of traces"):
        apply_speed_options(model, trace_groups=3)
    with pytest.raises(ValueError, match="positive integer"):
        apply_speed_options(model, trace_groups=0)
    from cacheaug.train import TrainConfig

    with pytest.raises(ValueError, match="--trace-groups 3 must be a positive divisor"):
        TrainConfig.from_flat(trace_groups=3)


def test_trainer_insertion_points_are_stratified():
    from cacheaug.train import TrainConfig, insertion_points

    cfg = TrainConfig.from_flat(trace_groups=4, n_traces=8, seq_len=64, n_ahead=8)
    pos = insertion_points(list(range(50)), cfg)
    assert pos.shape == (50, 8) and (pos.diff(dim=1) > 0).all()
    assert groups_fitting(pos, 64, 8, 4) == 4
    assert torch.equal(pos, insertion_points(list(range(50)), cfg))  # a function of (seed, key): resumable


def test_trainer_with_trace_groups_and_kept_logits(tmp_path, monkeypatch):
    """The options reach the model: kept logits change nothing; trace groups train on stratified points."""
    import json

    from cacheaug.testing import tiny_corpus, tiny_tokenizer
    from cacheaug.train import TrainConfig, train

    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    tok = tiny_tokenizer(tiny_corpus(tmp_path / "corpus", n_docs=60))
    small = dict(
        data=(str(tmp_path / "corpus"),),
        seq_len=40,
        batch_size=2,
        n_latents=2,
        n_ahead=N_A,
        n_traces=4,
        max_steps=2,
        warmup_steps=1,
        eval_every=0,
        eval_sequences=2,
        log_every=1,
        save_every=0,
        heldout_pct=20.0,
    )
    from cacheaug.model import CacheAugmentedLM

    runs, traces, packed = {}, CacheAugmentedLM._traces, CacheAugmentedLM._traces_packed
    arms = {
        "plain": {},
        "kept": {"keep_logits": True},
        "grouped": {"trace_groups": 2},
        "chunked": {"trace_chunk": 1},
        "windowed": {"trace_windows": True},
        "kernel": {"trace_kernel": True},
    }
    from cacheaug import windows

    op_calls, op = [], windows.prefix_attention
    monkeypatch.setattr(windows, "prefix_attention", lambda *args: op_calls.append(1) or op(*args))
    for name, opts in arms.items():
        out = tmp_path / name
        seen = []
        op_calls.clear()

        def spy(self, ids, prefix_kv, positions, _seen=seen):
            _seen.append(prefix_kv[0][0].shape[2])
            return traces(self, ids, prefix_kv, positions)

        def spy_rows(self, ids, prefix_kv, positions, windowed=False, _seen=seen):
            _seen.append(("windowed", windowed) if windowed else ("traces per row", positions.shape[1]))
            return packed(self, ids, prefix_kv, positions, windowed)

        monkeypatch.setattr("cacheaug.model.CacheAugmentedLM._traces", spy)
        monkeypatch.setattr("cacheaug.model.CacheAugmentedLM._traces_packed", spy_rows)
        train(
            TrainConfig.from_flat(**small, **opts, out_dir=str(out)),
            base=tiny_model("gemma3"),
            tokenizer=tok,
            progress=False,
        )
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (
            [r["loss"] for r in rows if "loss" in r],
            [x for x in seen if isinstance(x, int)],
            {x[1] for x in seen if isinstance(x, tuple)},
            len(op_calls),
        )
    assert 1 in runs["chunked"][2] and 1 not in runs["plain"][2]  # the option reached the trainer's model
    assert runs["kept"][0] == pytest.approx(runs["plain"][0], abs=1e-5)
    assert runs["chunked"][0] == pytest.approx(runs["plain"][0], abs=1e-5)  # the same points, one trace per row
    assert True in runs["windowed"][2] and True not in runs["plain"][2]  # trace windows reached the trainer's model
    assert runs["windowed"][0] == pytest.approx(runs["plain"][0], abs=1e-5)
    assert runs["kernel"][3] > 0 and runs["windowed"][3] == 0  # --trace-kernel reached the model: the op ran
    assert runs["kernel"][0] == pytest.approx(runs["plain"][0], abs=1e-5)
    assert set(runs["plain"][1]) == {T}
    assert runs["grouped"][1][:2] == [20, 36]  # training steps ran grouped
    assert runs["grouped"][0] != pytest.approx(runs["plain"][0], abs=1e-5)  # other (stratified) points
