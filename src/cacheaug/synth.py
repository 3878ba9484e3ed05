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

Scoring held-out problems (``cacheaug eval synth``) is :mod:`cacheaug.synth_eval`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
