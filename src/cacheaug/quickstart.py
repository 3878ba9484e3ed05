"""`cacheaug quickstart`, the main job: what the method buys, measured on your machine, then the pipeline end to end.

1. load Gemma 3 270M (offline, pinned tokenizer) and the coprocessor shipped with cacheaug
   (``gemma-3-270m-skills``: trained on problems that need computation, with its gate);
2. score a few hundred problems whose answer-equivalent twins never occur in its training data, frozen and
   augmented (one parallel pass), and print exact match per family with 95% intervals and a paired test;
3. decode three of them side by side through ``generate``;
4. general text left alone: held-out perplexity of the default corpus, frozen vs gated, and how often the gate fired;
5. a demonstration of the training pipeline: a few steps of a coprocessor and of the pause-token control on the
   default corpus (seven registry sources), with their held-out perplexity change (a brief run: not evidence);
6. a JSON report and plots (exact match by family; the demonstration's perplexity change by offset).
On 2 CPU cores: under 10 minutes in all.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .base import load_base_model
from .corpus import prepare_default
from .evaluate import relative_ppl_change
from .model import CacheAugmentedLM
from .train import TrainConfig, train

LABELS = {"copy": "coprocessor", "pause": "pause tokens (control)"}
SHIPPED = "gemma-3-270m-skills"
GENERAL_LEN = 512  # tokens per general-text sequence


def heldout_problems(per_level: int, seed: int = 2026) -> list[dict]:
    """Problems of every family and level of the default ``data synth`` options whose answer-equivalent twins can never
    be in a training corpus it writes (the held-out side of its split: cacheaug.synth.is_heldout_instance), drawn with
    their own seed."""
    import random

    from .synth import SynthConfig, sample_heldout

    cfg, rng, rows = SynthConfig(), random.Random(seed), []
    for family in cfg.families:
        for level in cfg.levels(family):
            drawn = sample_heldout(family, level, per_level, rng, cfg.heldout_share)
            if len(drawn) == per_level:  # (a level too small for a held-out side is left out, as data synth does)
                rows += [{"family": family, "level": level, "question": q, "answer": a} for q, a in drawn]
    return rows


def skills(model, tok, per_level: int, report: dict) -> None:
    """Steps 2-4 of the main job with the shipped coprocessor ``model`` (it has a gate)."""
    from .data import Splits
    from .evaluate import bootstrap_rel_change, heldout_sequences, offset_loss_sums
    from .synth_eval import build_rows, mcnemar, score_instances, summarise

    instances = heldout_problems(per_level)
    print(
        f"\n== problems that need computation: {len(instances)} held-out problems (their twins never occur in the "
        "coprocessor's training data), frozen vs augmented where the gate fires"
    )
    scores = score_instances(model, tok, instances, per_row=8, progress=True)
    fire = scores["gate_fire"]
    gated_em = [a if f else b for a, b, f in zip(scores["em"], scores["base_em"], fire)]
    frozen = summarise(instances, scores["base_em"], scores["base_loss"])
    aug = summarise(instances, gated_em, [a if f else b for a, b, f in zip(scores["loss"], scores["base_loss"], fire)])
    test = mcnemar(scores["base_em"], gated_em)
    print(f"{'family':>8} | {'n':>4} | {'frozen':>20} | {'augmented (gated)':>20} | gate fired")
    for fam in list(frozen["by_family"]) + ["overall"]:
        f = frozen["overall"] if fam == "overall" else frozen["by_family"][fam]
        a = aug["overall"] if fam == "overall" else aug["by_family"][fam]
        idx = [i for i, r in enumerate(instances) if fam == "overall" or r["family"] == fam]
        fired = 100 * sum(fire[i] for i in idx) / len(idx)
        print(
            f"{fam:>8} | {f['n']:>4} | {f['em']:>5.1f}% [{f['em_lo']:>4.1f},{f['em_hi']:>5.1f}] | "
            f"{a['em']:>5.1f}% [{a['em_lo']:>4.1f},{a['em_hi']:>5.1f}] | {fired:>5.1f}%"
        )
    print(
        f"paired on the same problems (exact McNemar): {test['diff_points']:+.1f} points, {test['b_only']} solved only "
        f"augmented, {test['a_only']} only frozen, p = {test['p']:.2g}"
    )
    report["problems"] = {
        "instances": len(instances),
        "frozen": frozen,
        "augmented_gated": aug,
        "paired": test,
        "gate_fire_rate": 100 * sum(fire) / len(fire),
    }

    rows, spans = build_rows(tok, instances[:: max(1, len(instances) // 3)][:3], per_row=1)
    report["examples"] = []
    print("\nThree of them decoded by generate(), frozen and augmented:")
    for ids, ((_, p, n),) in zip(rows, spans):
        prompt = ids[None, : p + 1].to(model.device)
        frozen_text = tok.decode(model.generate(prompt, n, augment=False)[0, p + 1 :])
        aug_text = tok.decode(model.generate(prompt, n)[0, p + 1 :])
        question = tok.decode(ids[: p + 1], skip_special_tokens=True).strip()
        report["examples"].append(
            {
                "question": question,
                "frozen": frozen_text,
                "augmented": aug_text,
                "answer": tok.decode(ids[p + 1 : p + 1 + n]),
            }
        )
        print(
            f"  {question}\n    frozen: {frozen_text.strip()!r}   augmented: {aug_text.strip()!r}   "
            f"(answer {tok.decode(ids[p + 1 : p + 1 + n]).strip()!r})"
        )

    seqs = heldout_sequences(tok, ("default",), Splits(), GENERAL_LEN, 6)
    offsets = [o for o in (1, 2, 4, 8, 16, 32) if o <= model.config.n_ahead]
    aug_sums, base_sums, points, gated_sums, fires = offset_loss_sums(model, seqs, stride=16, with_gate=True)
    gated = bootstrap_rel_change(gated_sums, base_sums, points)
    always = bootstrap_rel_change(aug_sums, base_sums, points)
    rate = 100 * fires.sum().item() / (points * len(seqs))
    print(
        f"\n== general text left alone: held-out documents of the default corpus ({len(seqs)} x {GENERAL_LEN} tokens, an "
        f"insertion point every 16 tokens); the gate fired at {rate:.1f}% of {points * len(seqs)} points"
    )
    print(f"{'offset':>6} | {'gated':>24} | {'always inserted':>16}")
    for o in offsets:
        g = [gated[k][o - 1] for k in ("change", "lo", "hi")]
        print(f"{o:>6} | {g[0]:>+7.2f}% [{g[1]:>+6.2f}, {g[2]:>+6.2f}] | {always['change'][o - 1]:>+15.1f}%")
    report["general_text"] = {
        "sequences": len(seqs),
        "seq_len": GENERAL_LEN,
        "points": points * len(seqs),
        "offsets": offsets,
        "gated": {k: [v[o - 1] for o in offsets] for k, v in gated.items()},
        "always": {k: [v[o - 1] for o in offsets] for k, v in always.items()},
        "gate_fire_rate": rate,
    }


def plot_problems(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr, au = report["problems"]["frozen"], report["problems"]["augmented_gated"]
    fams = list(fr["by_family"]) + ["overall"]
    get = lambda r, f: r["overall"] if f == "overall" else r["by_family"][f]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for i, (name, r) in enumerate((("frozen", fr), ("augmented (gated)", au))):
        x = [j + (i - 0.5) * 0.38 for j in range(len(fams))]
        em = [get(r, f)["em"] for f in fams]
        err = [[e - get(r, f)["em_lo"] for f, e in zip(fams, em)], [get(r, f)["em_hi"] - e for f, e in zip(fams, em)]]
        ax.bar(x, em, width=0.38, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel("exact match, % (95% Wilson)")
    ax.set_title(f"{report['model']} + {SHIPPED}: {report['problems']['instances']} held-out problems", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _last_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_losses" in line]
    return rows[-1]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for kind, run in report["runs"].items():
        offsets = range(1, len(run["rel_ppl_change_pct"]) + 1)
        ax.plot(offsets, run["rel_ppl_change_pct"], marker="o", label=LABELS[kind])
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_yscale("symlog", linthresh=10)  # early offsets of a brief run can be off by orders of magnitude
    ax.set_xlabel("offset after the insertion point (tokens)")
    ax.set_ylabel("held-out perplexity change vs frozen (%)")
    ax.set_title(f"{report['model']}, {report['steps']} steps, N_L={report['n_latents']}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_quickstart(
    steps: int = 10, out_dir: str | Path = "runs/quickstart", device: str | None = None, problems_per_level: int = 20
) -> dict:
    from .checkpoint import resolve_checkpoint

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    prepare_default()
    base, tok = load_base_model("gemma-3-270m", device=device)
    report = {"model": "gemma-3-270m", "device": str(base.device)}
    folder = resolve_checkpoint(SHIPPED)
    if (folder / "coprocessor_config.json").is_file():
        shipped = CacheAugmentedLM.from_pretrained(folder, base=base)
        report["coprocessor"] = {"name": SHIPPED, **shipped.config.to_dict()}
        skills(shipped, tok, problems_per_level, report)
        del shipped
    else:
        print(f"cacheaug: the shipped coprocessor {SHIPPED} is not in this installation ({folder}): skipping its part")
    gpu = base.device.type == "cuda"
    shape = (
        dict(seq_len=1024, batch_size=8, n_latents=16, n_ahead=16, n_traces=16)
        if gpu
        else dict(seq_len=256, batch_size=2, n_latents=8, n_ahead=8, n_traces=8)
    )
    report.update(steps=steps, **shape, runs={})
    print(
        f"\n== a demonstration of the training pipeline on the default corpus: {steps} steps of a coprocessor, then "
        "of the pause-token control (a brief run on this machine, not evidence)"
    )
    for kind in ("copy", "pause"):
        print(f"\n== {LABELS[kind]}: {steps} steps")
        cfg = TrainConfig.from_flat(
            init=kind,
            out_dir=str(out_dir / kind),
            max_steps=steps,
            warmup_steps=max(1, steps // 8),
            eval_every=0,
            save_every=0,
            eval_sequences=16,  # (a demonstration: half the held-out windows of a GPU run's check)
            log_every=max(1, steps // 10),
            resume=False,
            **shape,
        )
        ckpt = train(cfg, base=base, tokenizer=tok)
        ev = _last_eval(out_dir / kind)
        change = relative_ppl_change({"augmented": ev["eval_losses"], "base": ev["eval_base_losses"]})
        report["runs"][kind] = {
            "checkpoint": str(ckpt),
            "heldout_losses": ev["eval_losses"],
            "heldout_base_losses": ev["eval_base_losses"],
            "rel_ppl_change_pct": change,
            "eval_points": ev["eval_points"],
        }

    model = CacheAugmentedLM.from_pretrained(report["runs"]["copy"]["checkpoint"], base=base)
    heldout_text = "The Congress of the United States has the power to"
    prompt = tok(heldout_text, return_tensors="pt").input_ids.to(base.device)
    report["sample"] = {
        "prompt": heldout_text,
        "base": tok.decode(model.generate(prompt, 24, augment=False)[0, prompt.shape[1] :]),
        "augmented": tok.decode(model.generate(prompt, 24)[0, prompt.shape[1] :]),
    }

    cop, pause = report["runs"]["copy"]["rel_ppl_change_pct"], report["runs"]["pause"]["rel_ppl_change_pct"]
    base_losses = report["runs"]["copy"]["heldout_base_losses"]
    print(
        f"\nHeld-out perplexity change vs the frozen model by offset after the insertion point "
        f"({report['runs']['copy']['eval_points']} insertion points, {steps} steps each, same data and batch):"
    )
    print(f"{'offset':>6} | {'frozen ppl':>10} | {'pause tokens':>12} | {'coprocessor':>11} | {'margin (pts)':>12}")
    for o in range(len(cop)):
        print(
            f"{o + 1:>6} | {math.exp(base_losses[o]):>10.2f} | {pause[o]:>+11.2f}% | {cop[o]:>+10.2f}% | "
            f"{cop[o] - pause[o]:>+12.2f}"
        )
    print(
        "\nmargin = coprocessor - pause tokens, in percentage points (negative: the coprocessor is better). Only "
        "this margin is the coprocessor's own; the rest is adaptation to a text mix the frozen model never saw.\n"
        "This was a demonstration of the pipeline, not evidence: GPU-scale runs with every control (pause tokens, a LoRA-tuned "
        "decoder, a decoder adapted to the corpus, unseen sources) are in docs/results.md."
    )
    print(
        f"\nprompt:    {report['sample']['prompt']!r}\nfrozen:    {report['sample']['base']!r}\n"
        f"augmented: {report['sample']['augmented']!r}"
    )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quickstart.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out_dir / "quickstart.png")
    written = [out_dir / "quickstart.json"]
    if "problems" in report:  # (the shipped coprocessor's part ran)
        plot_problems(report, out_dir / "problems.png")
        written.append(out_dir / "problems.png")
    print(
        f"\nwrote {', '.join(map(str, written))} and {out_dir / 'quickstart.png'} (the demonstration) "
        f"({report['seconds']} s)"
    )
    return report
