"""A mechanism test: synthetic text whose next tokens need computation over the context.

``cacheaug data synth`` writes English problems whose answer follows a marker (`` Answer:``) a few tokens later
and needs a computation a small decoder cannot do in one forward pass: multi-digit addition and
multiplication, sorting a list, counting items, and word problems of several steps. One problem per line::

    What is 4821 plus 377? Answer: 5198

Difficulty knobs per family (digits, list length, steps) are fields of :class:`SynthConfig`. Training and
held-out instances are disjoint by what decides the answer (:func:`answer_key`): the unordered operands of an
addition or multiplication, the multiset of a list to sort, the multiset of a counting list plus its target, the
start and operations of a word problem without its names and things. That key decides a problem's side by hash,
so no held-out problem has an answer-equivalent twin (b+a for a+b, a permutation of the list, other names) in
training, whatever the seed or size. Held-out problems are distinct by that key; a level whose held-out side has
fewer than ``heldout_per_level`` distinct problems (1-digit multiplication: 55 problems in all) is left out of the
held-out file, and ``meta.json`` says so. The output folder holds
``train/synth.jsonl`` (documents of ``problems_per_doc`` problems of one family, for ``--data DIR/train``),
optionally ``train/general.jsonl`` (general text mixed in at ``mix_ratio`` of the characters, from the train
side of its sources), ``heldout.jsonl`` (one instance per line with its family, level, question and answer)
and ``meta.json``.

:func:`evaluate_synth` (``cacheaug eval synth``) scores held-out instances for every checkpoint and the frozen
decoder: the loss on the answer tokens and exact match of the greedy answer. Both come from one parallel
pass with the insertion point right after the marker (:meth:`CacheAugmentedLM.score_targets`); greedy
decoding reproduces an answer iff the model's top token is the right one at every answer token, so exact
match needs no decoding loop, and ``check_generate`` confirms it on some instances through ``generate`` (the
``augment`` path serving uses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arms import get_arm

MARKER = " Answer:"
FAMILIES = ("add", "mul", "sort", "count", "word")
_ITEMS = ("apple", "pear", "plum", "fig", "lemon", "grape", "melon", "peach", "cherry", "mango")
_NAMES = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas")
_THINGS = ("marbles", "stamps", "coins", "books", "cards", "shells", "pencils", "stickers")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SynthConfig:
    """Options of ``cacheaug data synth``; every field is an option of the same name."""

    out: str = _f("synth", "output folder")
    families: tuple[str, ...] = _f(FAMILIES, f"task families: {' '.join(FAMILIES)}")
    add_digits: tuple[int, ...] = _f((2, 3, 4, 5), "difficulty levels of addition: digits of each operand")
    mul_digits: tuple[int, ...] = _f((1, 2, 3), "difficulty levels of multiplication: digits of each operand")
    sort_lengths: tuple[int, ...] = _f((3, 5, 7), "difficulty levels of sorting: list lengths (numbers 0-99)")
    count_lengths: tuple[int, ...] = _f((5, 10, 15), "difficulty levels of counting: items in the list")
    word_steps: tuple[int, ...] = _f((1, 2, 3), "difficulty levels of word problems: operations after the start")
    train_docs: int = _f(2000, "training documents")
    problems_per_doc: int = _f(16, "problems per training document (one family each)")
    heldout_per_level: int = _f(40, "held-out instances per family and level")
    heldout_share: int = _f(10, "one operand set in this many goes to the held-out side")
    mix_sources: tuple[str, ...] = _f((), "general text to mix into train/ (e.g. default), from its train side")
    mix_ratio: float = _f(0.0, "share of the training characters that is general text (0 = synthetic only)")
    seed: int = _f(0, "seed of the generator")

    def __post_init__(self) -> None:
        problems = []
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            problems.append(f"--families must be among {FAMILIES}, got {list(self.families)}")
        for name in ("add_digits", "mul_digits", "sort_lengths", "count_lengths", "word_steps"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                problems.append(f"--{name.replace('_', '-')} needs levels >= 1, got {list(getattr(self, name))}")
        for name in ("train_docs", "problems_per_doc", "heldout_per_level"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        if self.heldout_share < 2:
            problems.append("--heldout-share must be at least 2")
        if not 0 <= self.mix_ratio < 1 or (self.mix_ratio > 0 and not self.mix_sources):
            problems.append("--mix-ratio must be in [0, 1) and needs --mix-sources when positive")
        if problems:
            raise ValueError("Invalid synth options:\n  " + "\n  ".join(problems))

    def levels(self, family: str) -> tuple[int, ...]:
        return {
            "add": self.add_digits,
            "mul": self.mul_digits,
            "sort": self.sort_lengths,
            "count": self.count_lengths,
            "word": self.word_steps,
        }[family]


# ---------------------------------------------------------------------------------------------- instances
def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def make_instance(family: str, level: int, rng: random.Random) -> tuple[tuple, str, str]:
    """``(operands, question, answer)`` of one problem; the operands decide its side (train or held-out)."""
    if family == "add":
        a, b = _number(rng, level), _number(rng, level)
        q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]).format(a=a, b=b)
        return (a, b), q, str(a + b)
    if family == "mul":
        a, b = _number(rng, level), _number(rng, level)
        q = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}."]).format(a=a, b=b)
        return (a, b), q, str(a * b)
    if family == "sort":
        xs = [rng.randint(0, 99) for _ in range(level)]
        q = f"Sort {', '.join(map(str, xs))} from smallest to largest."
        return tuple(xs), q, ", ".join(map(str, sorted(xs)))
    if family == "count":
        items = [rng.choice(_ITEMS) for _ in range(level)]
        target = rng.choice(items)
        q = f"In the list {', '.join(items)}, how many times does {target} appear?"
        return (*items, target), q, str(items.count(target))
    if family == "word":
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        total = rng.randint(10, 60)
        parts, ops = [f"{name} has {total} {thing}."], [total]
        for _ in range(level):
            kind = rng.choice(["buy", "lose", "bags"] if total > 1 else ["buy", "bags"])
            if kind == "buy":
                n = rng.randint(2, 30)
                parts.append(f"Then {name} gets {n} more.")
                total += n
            elif kind == "lose":
                n = rng.randint(1, total - 1)
                parts.append(f"Then {name} gives away {n}.")
                total -= n
            else:
                k, n = rng.randint(2, 5), rng.randint(2, 9)
                parts.append(f"Then {name} buys {k} bags of {n} {thing} each.")
                total += k * n
            ops.append((kind, n) if kind != "bags" else (kind, k, n))
        parts.append(f"How many {thing} does {name} have now?")
        return (name, thing, *ops), " ".join(parts), str(total)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def answer_key(family: str, operands: tuple) -> tuple:
    """What decides a problem's answer, up to the choices that do not change it: problems with the same key are
    answer-equivalent twins (``a+b`` and ``b+a``; a list and its permutations; a word problem with other names)."""
    if family in ("add", "mul", "sort"):
        return tuple(sorted(operands))
    if family == "count":
        return (*sorted(operands[:-1]), operands[-1])
    if family == "word":
        return tuple(operands[2:])  # the start and the operations, without the name and the thing
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def is_heldout_instance(family: str, operands: tuple, share: int) -> bool:
    key = json.dumps([family, *answer_key(family, operands)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % share == 0


def sample(family: str, level: int, rng: random.Random, heldout: bool, share: int, tries: int = 10_000):
    """One instance of the requested side (train or held-out)."""
    for _ in range(tries):
        operands, q, a = make_instance(family, level, rng)
        if is_heldout_instance(family, operands, share) == heldout:
            return operands, q, a
    raise ValueError(
        f"Could not draw a {'held-out' if heldout else 'training'} instance of {family} level {level}: "
        "the problem space is too small for --heldout-share."
    )


def sample_heldout(family: str, level: int, n: int, rng: random.Random, share: int) -> list[tuple[str, str]]:
    """Up to ``n`` held-out ``(question, answer)`` pairs with distinct answer keys; fewer when the level's held-out
    side has fewer distinct problems (the draws stop after ``100 n + 10,000`` tries)."""
    seen, rows = set(), []
    for _ in range(100 * n + 10_000):
        operands, q, a = make_instance(family, level, rng)
        key = answer_key(family, operands)
        if key not in seen and is_heldout_instance(family, operands, share):
            seen.add(key)
            rows.append((q, a))
            if len(rows) == n:
                break
    return rows


def line(question: str, answer: str) -> str:
    return f"{question}{MARKER} {answer}\n"


def generate_synth(cfg: SynthConfig) -> Path:
    """Write the corpus described in the module docstring; returns the output folder."""
    from .corpus import iter_named_documents
    from .data import Splits

    out = Path(cfg.out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    n_chars = 0
    with open(out / "train" / "synth.jsonl.part", "w") as f:
        for d in range(cfg.train_docs):
            family = cfg.families[d % len(cfg.families)]
            lines = []
            for _ in range(cfg.problems_per_doc):
                _, q, a = sample(family, rng.choice(cfg.levels(family)), rng, False, cfg.heldout_share)
                lines.append(line(q, a))
            text = "".join(lines)
            n_chars += len(text)
            f.write(json.dumps({"text": text}) + "\n")
    (out / "train" / "synth.jsonl.part").replace(out / "train" / "synth.jsonl")

    mixed = 0
    if cfg.mix_ratio > 0:
        want = cfg.mix_ratio / (1 - cfg.mix_ratio) * n_chars
        splits = Splits()  # general text from the train side of the default split: its held-out part stays unseen
        with open(out / "train" / "general.jsonl.part", "w") as f:
            for spec in cfg.mix_sources:
                for _, doc in iter_named_documents(spec):
                    if mixed >= want:
                        break
                    if doc.strip() and splits.split_of(doc) == "train":
                        f.write(json.dumps({"text": doc}) + "\n")
                        mixed += len(doc)
        (out / "train" / "general.jsonl.part").replace(out / "train" / "general.jsonl")

    rows, left_out = [], {}
    for family in cfg.families:
        for level in cfg.levels(family):
            drawn = sample_heldout(family, level, cfg.heldout_per_level, rng, cfg.heldout_share)
            if len(drawn) < cfg.heldout_per_level:
                left_out[f"{family} {level}"] = (
                    f"only {len(drawn)} distinct held-out problems (answer-equivalent "
                    f"twins counted once) for --heldout-per-level {cfg.heldout_per_level}"
                )
                continue
            rows += [{"family": family, "level": level, "question": q, "answer": a} for q, a in drawn]
    if not rows:
        raise ValueError(
            "No level has enough distinct held-out problems: lower --heldout-per-level or raise the difficulty levels"
        )
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {
        "config": _config_dict(cfg),
        "marker": MARKER,
        "split": "answer_key",
        "train_chars": n_chars,
        "general_chars": mixed,
        "heldout_instances": len(rows),
        "heldout_left_out": left_out,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"cacheaug: wrote {cfg.train_docs} training documents ({n_chars:,} characters"
        f"{f', plus {mixed:,} of general text' if mixed else ''}) to {out / 'train'} and {len(rows)} held-out "
        f"instances to {out / 'heldout.jsonl'}"
    )
    for level, why in left_out.items():
        print(f"cacheaug: level {level} left out of the held-out file: {why} (it stays in training)")
    return out


def _config_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# ---------------------------------------------------------------------------------------------- insertion points
def marker_positions(
    ids: torch.Tensor,
    marker_ids: list[int],
    n_valid: int,
    k: int,
    generator: torch.Generator | None = None,
    span: int = 0,
    stop_ids: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """``[k]`` sorted distinct insertion points in ``[0, n_valid)`` for one sequence ``ids`` ``[T]``: the last token
    of each occurrence of ``marker_ids`` (a seeded choice of k if there are more), filled up with uniform points.
    With ``span`` > 0 (``--insertion answer``) every point of the answer after each marker is a candidate too: the
    marker's last token and each answer token after it, up to the one before a token of ``stop_ids`` (the line's
    end) and at most ``span`` points per answer."""
    m = len(marker_ids)
    ids = ids.cpu()
    if m and len(ids) >= m:
        windows = ids.unfold(0, m, 1)  # [T-m+1, m]
        ends = (windows == torch.tensor(marker_ids)).all(1).nonzero()[:, 0] + m - 1
        ends = ends[ends < n_valid]
    else:
        ends = torch.zeros(0, dtype=torch.long)
    if span > 0 and len(ends):
        points, toks = [], ids.tolist()
        for end in ends.tolist():
            p = end
            while p < n_valid and p - end < span:
                points.append(p)
                if toks[p + 1] in stop_ids:
                    break
                p += 1
        ends = torch.tensor(sorted(set(points)), dtype=torch.long)
    if len(ends) >= k:
        pick = ends[torch.randperm(len(ends), generator=generator)[:k]]
    else:
        free = torch.ones(n_valid, dtype=torch.bool)
        free[ends] = False
        others = free.nonzero()[:, 0]
        pick = torch.cat([ends, others[torch.randperm(len(others), generator=generator)[: k - len(ends)]]])
    return pick.sort().values.long()


def line_end_ids(tokenizer) -> frozenset[int]:
    """The ids of every token whose text holds a line break (where an answer of ``data synth`` text ends)."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    return frozenset(i for i, t in enumerate(texts) if "\n" in t)


# ---------------------------------------------------------------------------------------------- evaluation
def read_heldout(path: str | Path) -> list[dict]:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    if not rows or not all({"family", "level", "question", "answer"} <= set(r) for r in rows):
        raise ValueError(f"{path} is not a held-out file of `cacheaug data synth` (family, level, question, answer).")
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
    from .checkpoint import read_config

    name = read_config(checkpoints[0])["base_model"].get("name_or_path") if checkpoints else None
    if not name:
        raise ValueError(
            f"{checkpoints[0] if checkpoints else 'no checkpoint'} does not record its base model's name: "
            "pass --model (the base model it was trained on)"
        )
    return name


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
