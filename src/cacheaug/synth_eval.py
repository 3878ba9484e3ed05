"""``cacheaug eval synth``: held-out problems of :mod:`cacheaug.synth` scored for every checkpoint and the frozen
decoder.

:func:`evaluate_synth` (``cacheaug eval synth``) scores held-out instances for every checkpoint and the frozen
decoder: the loss on the answer tokens and exact match of the greedy answer. Both come from one parallel
pass with the insertion point right after the marker (:meth:`CacheAugmentedLM.score_targets`); greedy
decoding reproduces an answer iff the model's top token is the right one at every answer token, so exact
match needs no decoding loop, and ``check_generate`` confirms it on some instances through ``generate`` (the
``augment`` path serving uses).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from .arms import get_arm
from .synth import MARKER, line


def read_heldout(path: str | Path) -> list[dict]:
    """The problems of a held-out file (JSON lines of ``cacheaug data synth``); a file of anything else is refused in
    one line naming the first line that is not a problem."""
    what = f"{path} is not a held-out file of `cacheaug data synth` (JSON lines with family, level, question, answer)"
    try:
        lines = Path(path).read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{what}: it is not text") from None
    rows = []
    for n, x in enumerate(lines, 1):
        if not x.strip():
            continue
        try:
            r = json.loads(x)
        except json.JSONDecodeError:
            raise ValueError(f"{what}: line {n} is not JSON") from None
        missing = [k for k in ("family", "level", "question", "answer") if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{what}: line {n} lacks {', '.join(missing)}")
        rows.append(r)
    if not rows:
        raise ValueError(f"{what}: it holds no problem")
    return rows


def build_rows(tokenizer, instances: list[dict], per_row: int = 8):
    """Token rows ``[bos] line_1 .. line_n`` of one family each, with every line's insertion point (the marker's
    last token) and answer span (the tokens after it, through the line's end). Returns ``(rows, spans)``: a list of
    1-D id tensors and, per row, a list of ``(instance index, p, span length)``."""
    marker = tokenizer(MARKER, add_special_tokens=False)["input_ids"]
    from .data import start_token

    start = start_token(tokenizer)
    bos = [start] if start is not None else []
    by_family: dict[str, list[int]] = {}
    for i, r in enumerate(instances):
        by_family.setdefault(r["family"], []).append(i)
    rows, spans = [], []
    for idx in by_family.values():
        for start in range(0, len(idx), per_row):
            ids, row_spans = list(bos), []
            for i in idx[start : start + per_row]:
                toks = tokenizer(line(instances[i]["question"], instances[i]["answer"]), add_special_tokens=False)[
                    "input_ids"
                ]
                ends = [
                    j + len(marker) - 1
                    for j in range(len(toks) - len(marker) + 1)
                    if toks[j : j + len(marker)] == marker
                ]
                if not ends or ends[-1] == len(toks) - 1:
                    raise ValueError(
                        f"The marker {MARKER!r} does not tokenise the same inside {instances[i]['question']!r}"
                    )
                p = len(ids) + ends[-1]
                row_spans.append((i, p, len(toks) - 1 - ends[-1]))
                ids += toks
            rows.append(torch.tensor(ids))
            spans.append(row_spans)
    return rows, spans


@torch.no_grad()
def score_instances(
    model, tokenizer, instances: list[dict], per_row: int = 8, progress: bool = False, deliberate: str = "once"
) -> dict:
    """Per instance (lists in ``instances`` order): mean answer-token loss and exact match, for ``model`` and for the
    frozen decoder, plus per-offset losses ``[n, N]`` (NaN beyond an answer's length). With a gate (``model.gate``)
    also the gated ones (``gated_em``, ``gated_loss``: the augmented scores where it fires, the frozen ones elsewhere)
    and how often it fired (``gate_fire``: 0-1 per instance).

    ``deliberate="every"``: the coprocessor runs before every answer token (``generate(..., deliberate="every")``),
    scored in one pass with a trace at each answer position, offset 1 each (per-offset losses then hold the
    offset-1 loss of each answer token)."""
    from .evaluate import autocast_for

    if deliberate not in ("once", "every"):
        raise ValueError(f"deliberate must be 'once' or 'every', got {deliberate!r}")
    every = deliberate == "every"
    rows, spans = build_rows(tokenizer, instances, per_row)
    longest = max(s for row in spans for _, _, s in row)
    n_ahead = 1 if every else longest
    trained_ahead = model.config.n_ahead
    model.config = dataclasses.replace(model.config, n_ahead=n_ahead)  # only sets which targets are scored
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    n = len(instances)
    gated = model.gated()
    keys = ("loss", "em", "base_loss", "base_em") + (("gate_fire", "gated_em", "gated_loss") if gated else ())
    out = {k: [math.nan] * n for k in keys}
    offsets = {k: torch.full((n, longest), math.nan, dtype=torch.float64) for k in ("loss", "base_loss")}
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    with autocast_for(model):
        for ids, row_spans in tqdm(
            list(zip(rows, spans)), desc="eval synth", unit="row", leave=False, disable=not progress
        ):
            ids = torch.cat([ids, torch.full((longest,), pad)])[None].to(model.device)  # room for the last answer
            # (instance, first trace, traces, answer tokens): one trace per answer, or one per answer token
            points, where = [], []
            for i, p, s in row_spans:
                where.append((i, len(points), s if every else 1, s))
                points += list(range(p, p + s)) if every else [p]
            res = model.score_targets(ids, positions=points)
            fire = model.gate_fires(model.gate_states(ids, points))[0] if gated else None
            for i, k, m, s in where:
                scores = {}
                for name in ("", "base_"):
                    if every:  # the offset-1 score of each answer token's own trace
                        losses = res[f"{name}losses"][0, k : k + m, 0]
                        hits = res[f"{name}hits"][0, k : k + m, 0]
                    else:
                        losses, hits = res[f"{name}losses"][0, k, :s], res[f"{name}hits"][0, k, :s]
                    scores[name] = (losses.double().cpu(), hits.cpu())
                    out[f"{name}loss"][i] = scores[name][0].mean().item()
                    out[f"{name}em"][i] = float(scores[name][1].all())
                    offsets[f"{name}loss"][i, :s] = scores[name][0]
                if gated:
                    f = fire[k : k + m].cpu()
                    if not every:
                        f = f.expand(s)
                    out["gate_fire"][i] = f.double().mean().item()
                    out["gated_loss"][i] = torch.where(f, scores[""][0], scores["base_"][0]).mean().item()
                    out["gated_em"][i] = float(torch.where(f, scores[""][1], scores["base_"][1]).all())
    model.train(was_training)
    model.config = dataclasses.replace(model.config, n_ahead=trained_ahead)
    out["offset_loss"], out["base_offset_loss"] = offsets["loss"], offsets["base_loss"]
    out["answer_tokens"] = longest
    return out


@torch.no_grad()
def generate_check(
    model,
    tokenizer,
    instances: list[dict],
    n: int,
    per_row: int = 8,
    use_gate: bool | None = None,
    deliberate: str = "once",
) -> dict[int, float]:
    """Exact match through ``model.generate`` (greedy; the coprocessor runs once, after the marker: the path serving
    uses; with a gate, only where it fires, unless ``use_gate=False``) for about ``n`` instances spread over the set,
    each in the same row context as :func:`score_instances`. Returns ``{instance index: 1.0 or 0.0}``."""
    from .evaluate import autocast_for

    rows, spans = build_rows(tokenizer, instances, per_row)
    picked = [(ids, span) for ids, row in zip(rows, spans) for span in row]
    picked = picked[:: max(1, len(picked) // n)][:n]
    em = {}
    with autocast_for(model):
        for ids, (i, p, s) in picked:
            prompt = ids[None, : p + 1].to(model.device)
            gate = {} if use_gate is None else {"use_gate": use_gate}  # (the controls' generate has no gate)
            if deliberate != "once":
                gate["deliberate"] = deliberate
            got = model.generate(prompt, max_new_tokens=s, **gate)[0, p + 1 :].cpu()
            em[i] = float(torch.equal(got, ids[p + 1 : p + 1 + s]))
    return em


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n (in percent)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = 100 * (mid - half) / (1 + z * z / n), 100 * (mid + half) / (1 + z * z / n)
    return (max(0.0, lo), min(100.0, hi))  # (k = 0 or n gives the bound itself, up to rounding: never -0.0)


def mcnemar(a: list[float], b: list[float]) -> dict:
    """Exact McNemar test of two arms' hits on the same items: ``b_only`` / ``a_only`` discordant counts, the
    difference in exact match (points) and the two-sided binomial p-value."""
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n if n else 1.0
    return {
        "a_only": a_only,
        "b_only": b_only,
        "diff_points": 100 * (sum(b) - sum(a)) / max(len(a), 1),
        "p": min(1.0, 2 * tail),
    }


def summarise(instances: list[dict], em: list[float], loss: list[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Exact match (percent, Wilson 95%) and mean answer-token loss (bootstrap 95%) overall, by family and level."""

    def stats(idx: list[int]) -> dict:
        e = [em[i] for i in idx]
        lo, hi = wilson(sum(e), len(e))
        x = torch.tensor([loss[i] for i in idx], dtype=torch.float64)
        boot = x[torch.randint(len(x), (n_boot, len(x)), generator=torch.Generator().manual_seed(seed))].mean(1)
        q = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64))
        return {
            "n": len(idx),
            "em": 100 * sum(e) / len(e),
            "em_lo": lo,
            "em_hi": hi,
            "loss": x.mean().item(),
            "loss_lo": q[0].item(),
            "loss_hi": q[1].item(),
        }

    report = {"overall": stats(list(range(len(instances)))), "by_family": {}}
    for family in dict.fromkeys(r["family"] for r in instances):
        idx = [i for i, r in enumerate(instances) if r["family"] == family]
        fam = stats(idx)
        fam["by_level"] = {
            str(lv): stats([i for i in idx if instances[i]["level"] == lv])
            for lv in sorted({instances[i]["level"] for i in idx})
        }
        report["by_family"][family] = fam
    return report


def evaluate_synth(
    checkpoints: list[str],
    heldout: str,
    *,
    model_name: str | None = None,
    per_row: int = 8,
    check_generate: int = 0,
    device: str | None = None,
    out: str | None = None,
    base=None,
    tokenizer=None,
    progress: bool = True,
    deliberate: str = "once",
) -> dict:
    """``cacheaug eval synth``: answer loss and exact match on held-out instances for the frozen decoder and each
    checkpoint (coprocessors and controls), by family and difficulty, each arm's per-instance hits and exact
    McNemar tests between arms on the same instances. ``model_name`` defaults to the first checkpoint's base.
    ``deliberate="every"``: coprocessors run before every answer token (:func:`score_instances`)."""
    from .base import load_base_model
    from .model import CacheAugmentedLM

    instances = read_heldout(heldout)
    if base is None:
        base, tokenizer = load_base_model(model_name or base_model_of(checkpoints), device=device)
    report = {
        "heldout": str(heldout),
        "instances": len(instances),
        "per_row": per_row,
        "deliberate": deliberate,
        "arms": {},
    }
    hits = {}
    for ckpt in checkpoints:
        model = CacheAugmentedLM.from_pretrained(ckpt, base=base)
        how = deliberate if model.arm.has_latents else "once"  # (a control without latents deliberates nowhere)
        scores = score_instances(model, tokenizer, instances, per_row, progress=progress, deliberate=how)
        if how == "once" and scores["answer_tokens"] > model.config.n_ahead:
            print(
                f"cacheaug: warning: {ckpt} was trained with --n-ahead {model.config.n_ahead}, but answers here "
                f"take up to {scores['answer_tokens']} tokens: its latents never saw an answer's tail"
            )
        if "frozen" not in report["arms"]:
            report["arms"]["frozen"] = summarise(instances, scores["base_em"], scores["base_loss"])
            report["arms"]["frozen"]["offset_loss"] = _offset_means(scores["base_offset_loss"])
            report["arms"]["frozen"]["hits"] = hits["frozen"] = [int(x) for x in scores["base_em"]]
        arm = summarise(instances, scores["em"], scores["loss"])
        name = _arm_name(ckpt, model.config, report["arms"])
        arm.update(
            checkpoint=str(ckpt),
            init=model.config.init,
            n_latents=model.config.n_latents,
            n_ahead=model.config.n_ahead,
            offset_loss=_offset_means(scores["offset_loss"]),
            hits=[int(x) for x in scores["em"]],
        )
        hits[name] = arm["hits"]
        if check_generate:
            gen = generate_check(
                model,
                tokenizer,
                instances,
                check_generate,
                per_row,
                use_gate=False if model.gated() else None,
                deliberate=how,
            )
            arm["generate_check"] = {
                "n": len(gen),
                "em_generate": 100 * sum(gen.values()) / len(gen),
                "agree_with_parallel_pass": 100 * sum(v == scores["em"][i] for i, v in gen.items()) / len(gen),
            }
        report["arms"][name] = arm
        if "gate_fire" in scores:  # the same coprocessor, inserted only where its gate fires
            fire, pick = scores["gate_fire"], scores["gated_em"]
            gated = summarise(instances, pick, scores["gated_loss"])
            gated.update(
                checkpoint=str(ckpt),
                init=model.config.init,
                n_latents=model.config.n_latents,
                gate=True,
                gate_threshold=model.gate_threshold
                if model.gate_threshold is not None
                else model.gate.config.threshold,
                gate_fire_rate=100 * sum(fire) / len(fire),
                gate_fire_by_family={
                    f: 100 * sum(fire[i] for i in ix) / len(ix) for f, ix in _by_family(instances).items()
                },
                hits=[int(x) for x in pick],
            )
            if check_generate:
                gen = generate_check(model, tokenizer, instances, check_generate, per_row, deliberate=how)
                gated["generate_check"] = {
                    "n": len(gen),
                    "em_generate": 100 * sum(gen.values()) / len(gen),
                    "agree_with_parallel_pass": 100 * sum(v == pick[i] for i, v in gen.items()) / len(gen),
                }
            hits[f"{name} + gate"] = gated["hits"]
            report["arms"][f"{name} + gate"] = gated
        del model
    names = list(hits)
    report["paired"] = {f"{b} vs {a}": mcnemar(hits[a], hits[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    _print_synth(report)
    if out:
        from . import atomic

        atomic.write_file(Path(out), lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    return report


def _by_family(instances: list[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(instances):
        out.setdefault(r["family"], []).append(i)
    return out


def base_model_of(checkpoints: list[str]) -> str:
    """The base model the first checkpoint was trained on (its recorded name or folder), for ``--model``'s default."""
    from .checkpoint import recorded_base

    if not checkpoints:
        raise ValueError("no checkpoint: pass --model (the base model to evaluate)")
    return recorded_base(checkpoints[0])


def _offset_means(offset_loss: torch.Tensor) -> list[float]:
    return [x for x in torch.nanmean(offset_loss, 0).tolist()]


def _arm_name(ckpt: str, config, taken: dict) -> str:
    arm = get_arm(config.init)
    name = f"{config.init}-nl{config.n_latents}" if arm.backbone is not None else config.init
    from .checkpoint import SHIPPED, shipped_checkpoint

    shipped = [short for short in SHIPPED if Path(ckpt).resolve() == shipped_checkpoint(short).resolve()]
    run = shipped[0] if shipped else Path(ckpt).parent.name  # a shipped coprocessor by its short name
    name = f"{name} ({run})" if run else name
    return name if name not in taken else f"{name} [{len(taken)}]"


def _print_synth(report: dict) -> None:
    arms = report["arms"]
    families = list(next(iter(arms.values()))["by_family"])
    print(f"\nHeld-out exact match, % [95% Wilson] ({report['instances']} instances), and answer-token loss:")
    print(f"{'arm':<40} | {'overall':>18} | " + " | ".join(f"{f:>8}" for f in families) + " | loss")
    for name, a in arms.items():
        o = a["overall"]
        cells = " | ".join(f"{a['by_family'][f]['em']:>7.1f}%" for f in families)
        fires = f" (gate fires on {a['gate_fire_rate']:.1f}%)" if "gate_fire_rate" in a else ""
        print(
            f"{name[:40]:<40} | {o['em']:>5.1f}% [{o['em_lo']:>4.1f},{o['em_hi']:>5.1f}] | {cells} | {o['loss']:.3f}"
            f"{fires}"
        )
    for name, a in arms.items():
        if "generate_check" in a:
            g = a["generate_check"]
            print(
                f"generate() on {g['n']} answers of {name}: exact match {g['em_generate']:.1f}%, agreeing with the "
                f"parallel pass on {g['agree_with_parallel_pass']:.1f}%"
            )
    if report.get("paired"):
        print("Paired on the same instances (exact McNemar): difference in points, instances only B / only A got, p")
        for pair, t in report["paired"].items():
            print(f"  {pair}: {t['diff_points']:+.1f} ({t['b_only']} / {t['a_only']}), p={t['p']:.2g}")
