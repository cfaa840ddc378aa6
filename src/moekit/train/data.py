"""Training data: documents from local text (or the embedded corpus), a tokenizer, and a token stream to batch.

Legend: B batch, S sequence length, N tokens in a stream.

The path from text to batches: `load_documents` (files, folders, JSONL, or the embedded corpus) -> `split_documents`
(train/validation by document, deterministic) -> `Tokenizer` (byte-level BPE trained on the training split, or raw
bytes) -> `TokenStream` (every document's ids followed by EOS, concatenated, with a parallel domain-id array) ->
`TokenStream.sample` (random windows of S+1 tokens from a seeded generator) or `TokenStream.eval_batches` (fixed
windows). `prepare_data` runs the whole path.

The embedded corpus (`embedded_corpus`) needs no download on any machine with Python, because it *is* Python:

* "prose": the English text of the CPython documentation topics that `help()` shows (`pydoc_data.topics.topics`, a
  dict topic -> text; 79 documents, 464,970 characters / 466,117 UTF-8 bytes on CPython 3.11.7);
* "code": the standard library's own `.py` sources (`sysconfig.get_paths()["stdlib"]`, excluding `test`/`tests`/
  `idle_test` directories and `site-packages`), taken in sorted path order until `max_code_bytes` (default 3 MB:
  on CPython 3.11.7 that is the first 173 files, `__future__.py` to `email/feedparser.py`, 2,986,664 bytes of the
  12.1 MB available).

Measured on CPython 3.11.7: 252 documents, 3,451,634 characters (3,452,781 UTF-8 bytes), 13% prose by bytes; the
95/5 split by document within each domain holds out 13 (4 prose, 9 code); the default 4096-token BPE gives
874,997 training tokens (758,113 code, 116,884 prose) and 45,009 validation tokens (37,957 code, 7,052 prose),
3.75 characters per token; the byte tokenizer gives 3,453,033 tokens in all (bytes + one EOS per document).
Other Python versions give a slightly different corpus: the documents come from the interpreter that runs moekit.

Licence: both parts are files of CPython (`Lib/pydoc_data/topics.py` and `Lib/**/*.py`), copyright the Python
Software Foundation, under the PSF License Version 2 (https://docs.python.org/3/license.html; code examples in
the documentation are also under the Zero-Clause BSD licence). Nothing is downloaded or redistributed by moekit:
the text is read from the user's own Python installation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

EOS = "<|endoftext|>"
# 3 MB of code: ~875k training tokens, so the default runs see no token twice; BPE training + encoding ~1.5 s.
DEFAULT_MAX_CODE_BYTES = 3_000_000
CODE_SUFFIXES = frozenset(
    ".py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .tsx .jsx .rb .sh .lua .swift .kt .scala .cs .m .jl".split()
)
_EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
    """A corpus that cannot be used (missing, empty, unreadable, or too small); the message names the path."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        text: the document's text.
        domain: a tag for analysis ("prose" or "code" in the embedded corpus and for files; JSONL may set its own).
        source: where it came from, relative to the corpus so that moving it keeps the split: a file's name or
            its path inside the folder, "name.jsonl:line" for JSONL, "pydoc:topic", "stdlib:relative/path.py".
            Unique within a corpus; the key of the train/validation split.
    """

    text: str
    domain: str
    source: str


# ----------------------------------------------------------------------------------------------------- documents


def embedded_corpus(max_code_bytes: int = DEFAULT_MAX_CODE_BYTES) -> list[Document]:
    """The corpus every Python carries: documentation topics ("prose") and standard-library sources ("code").

    Args:
        max_code_bytes: cap on the bytes of source files taken (files in sorted path order, stopping before the
            first file that would pass the cap), so the corpus is the same on every run of the same Python.

    Returns:
        The prose documents (sorted by topic) followed by the code documents (sorted by path).
    """
    from pydoc_data.topics import topics

    docs = [Document(topics[name], "prose", f"pydoc:{name}") for name in sorted(topics) if topics[name].strip()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in _stdlib_sources(stdlib):
        size = path.stat().st_size
        if total + size > max_code_bytes:
            break
        text = _read_text(path)
        if text is not None and text.strip():
            docs.append(Document(text, "code", f"stdlib:{path.relative_to(stdlib).as_posix()}"))
            total += size
    return docs


def _stdlib_sources(stdlib: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_STDLIB_DIRS and not d.startswith(".")]
        found.extend(Path(root) / f for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(stdlib).as_posix())


def load_documents(
    path: str | os.PathLike | None = None, text_field: str = "text", max_code_bytes: int = DEFAULT_MAX_CODE_BYTES
) -> list[Document]:
    """Documents from a text file, a folder of text files (recursive), a JSONL file, or the embedded corpus.

    Args:
        path: a file (`.jsonl`: one JSON object per line; anything else: one document), a folder (every text file
            below it, sorted by path; binary and hidden files skipped), or None for `embedded_corpus`.
        text_field: the JSONL key holding the text. A string "domain" key, where present, sets the domain.
        max_code_bytes: passed to `embedded_corpus` when path is None.

    Returns:
        The documents, in a deterministic order. Files are tagged "code" by extension (`CODE_SUFFIXES`), else "prose".

    Raises:
        DataError: the path does not exist, a named file is not UTF-8 text, a JSONL line is not an object with a
            string `text_field`, or no document has any text.
    """
    if path is None:
        return embedded_corpus(max_code_bytes)
    root = Path(path)
    if not root.exists():
        raise DataError(f"corpus {str(root)!r} does not exist")
    if root.is_dir():
        docs = []
        for file in sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root))):
            docs.extend(_file_documents(file, file.relative_to(root).as_posix(), text_field, strict=False))
    else:
        docs = _file_documents(root, root.name, text_field, strict=True)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"corpus {str(root)!r} has no text (no non-empty UTF-8 text documents found)")
    return docs


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _file_documents(path: Path, name: str, text_field: str, strict: bool) -> list[Document]:
    text = _read_text(path)
    if text is None:
        if strict:
            raise DataError(f"{str(path)!r} is not a UTF-8 text file")
        return []  # folders hold images, archives, ...: a binary file there is skipped, not an error
    if path.suffix.lower() == ".jsonl":
        return _jsonl_documents(path, name, text, text_field)
    domain = "code" if path.suffix.lower() in CODE_SUFFIXES else "prose"
    return [Document(text, domain, name)]


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {str(path)!r}: {err.strerror}") from None
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_documents(path: Path, name: str, text: str, text_field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{str(path)!r} line {lineno} is not valid JSON: {err.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{str(path)!r} line {lineno} has no string field {text_field!r} (found {keys}); "
                "choose the field with --text-field"
            )
        domain = record.get("domain") if isinstance(record.get("domain"), str) else "prose"
        docs.append(Document(record[text_field], domain, f"{name}:{lineno}"))
    return docs


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and validation, deterministically and by document, within each domain.

    A document's side depends only on its `source` and the seed (a hash rank), so adding a file does not move the
    others. Each domain with at least two documents gives max(1, round(val_fraction * n)) of them to validation,
    so every domain is measured. If that leaves validation empty (e.g. a single file), the largest document is cut
    at the line boundary nearest to (1 - val_fraction) of its length and its tail becomes the validation document.

    Args:
        docs: the corpus.
        val_fraction: share of each domain's documents held out.
        seed: changes which documents are held out.

    Returns:
        (train, validation), each in corpus order.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    held_out: set[int] = set()
    for domain in sorted({d.domain for d in docs}):
        members = [i for i, d in enumerate(docs) if d.domain == domain]
        if len(members) < 2:
            continue
        count = max(1, round(val_fraction * len(members)))
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{docs[i].source}".encode()).hexdigest())
        held_out.update(ranked[:count])
    train = [d for i, d in enumerate(docs) if i not in held_out]
    val = [d for i, d in enumerate(docs) if i in held_out]
    if not val and docs:
        largest = max(range(len(docs)), key=lambda i: len(docs[i].text))
        doc = docs[largest]
        cut = _cut_point(doc.text, 1 - val_fraction)
        head, tail = doc.text[:cut], doc.text[cut:]
        train = [d if i != largest else Document(head, d.domain, d.source) for i, d in enumerate(docs)]
        val = [Document(tail, doc.domain, f"{doc.source}[{cut}:]")]
    return train, val


def _cut_point(text: str, fraction: float) -> int:
    target = max(1, min(len(text) - 1, round(fraction * len(text))))
    newline = text.rfind("\n", 0, target)
    # A line boundary keeps both halves readable; only a text of one long line is cut mid-line.
    return newline + 1 if newline > len(text) // 2 else target


# ----------------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of `tokenizers`' ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class Tokenizer:
    """A byte-level tokenizer (Hugging Face `tokenizers`), trained BPE or plain bytes, with one EOS token.

    Both kinds are byte-level, so any text round-trips exactly: `decode(encode(text)) == text`. Both save as a
    standard `tokenizer.json` that `tokenizers.Tokenizer.from_file` (and transformers) can read.

    Args:
        hf: the underlying `tokenizers.Tokenizer`; build one with `train_bpe`, `bytes` or `load`.
        eos_id: the end-of-text id; None = the id of moekit's EOS token (a released model's tokenizer names its
            own, e.g. from its config.json: see `moekit.hf.load_tokenizer`).
    """

    def __init__(self, hf, eos_id: int | None = None) -> None:
        self.hf = hf
        eos = hf.token_to_id(EOS) if eos_id is None else eos_id
        if eos is None:
            raise DataError(f"tokenizer has no {EOS} token")
        self.eos_id: int = eos

    @classmethod
    def train_bpe(cls, texts: Sequence[str], vocab_size: int = 4096) -> "Tokenizer":
        """Train byte-level BPE (the GPT-2 recipe) on `texts`: 256 byte symbols, then merges up to `vocab_size`."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"vocab_size must be >= 257 (256 bytes + EOS) for BPE, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even if unseen
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def bytes(cls) -> "Tokenizer":
        """The byte tokenizer: id b is byte b (0..255), id 256 is EOS. Needs no training."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        table = _bytes_to_unicode()
        vocab = {table[b]: b for b in range(256)}
        vocab[EOS] = 256
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))  # BPE with no merges = one token per byte
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOS])
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a `tokenizer.json`. Raises DataError naming the file if it is missing or unreadable."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception for both missing and malformed files
            raise DataError(f"cannot load tokenizer {str(path)!r}: {err}") from None

    def save(self, path: str | os.PathLike) -> None:
        self.hf.save(str(path))

    def to_str(self) -> str:
        return self.hf.to_str()

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


class StreamDecoder:
    """Turns generated token ids into text as they arrive, never printing half a UTF-8 character.

    A byte-level token can end inside a multi-byte character; decoding then shows U+FFFD for the incomplete tail.
    `push` holds such a tail back until the bytes that complete it arrive.

    Args:
        tokenizer: the model's tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        """Add new token ids; return the text that is now complete and was not returned before."""
        self.ids.extend(int(i) for i in ids)
        return self._advance(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        """Return whatever is left, incomplete characters included (as U+FFFD)."""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        # Byte-level decoding only ever extends the text already shown (earlier bytes decode the same way).
        new = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += new
        return new


# -------------------------------------------------------------------------------------------------- token stream


@dataclass
class Batch:
    """Inputs, next-token targets and the domain of each target. Attributes: x, y, domains, all [B, S]."""

    x: Tensor
    y: Tensor
    domains: Tensor


@dataclass
class TokenStream:
    """Documents tokenized and concatenated, each followed by EOS, with the domain of every token.

    Attributes:
        ids: [N] int64 token ids.
        domains: [N] uint8 index into `domain_names` (an EOS has the domain of the document it ends).
        domain_names: the domain of each index.
    """

    ids: Tensor
    domains: Tensor
    domain_names: list[str]

    @classmethod
    def from_documents(
        cls, docs: Sequence[Document], tokenizer: Tokenizer, domain_names: list[str], max_tokens: int | None = None
    ) -> "TokenStream":
        """Tokenize `docs` in order; keep at most `max_tokens` tokens (the first ones) if given."""
        encoded = tokenizer.encode_batch([d.text for d in docs])
        ids: list[int] = []
        domains: list[int] = []
        for doc, doc_ids in zip(docs, encoded):
            ids.extend(doc_ids)
            ids.append(tokenizer.eos_id)
            domains.extend([domain_names.index(doc.domain)] * (len(doc_ids) + 1))
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        if max_tokens is not None:
            ids, domains = ids[:max_tokens], domains[:max_tokens]
        return cls(torch.tensor(ids, dtype=torch.int64), torch.tensor(domains, dtype=torch.uint8), domain_names)

    def __len__(self) -> int:
        return self.ids.numel()

    def fingerprint(self) -> str:
        """A short hash of the ids: a resumed run checks it is training on the same tokens."""
        return hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()[:16]

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """B windows of S+1 consecutive tokens at uniformly random starts drawn from `generator`.

        Args:
            batch_size: B.
            seq_len: S.
            generator: a seeded CPU generator; its state after the call determines the next batch, so saving it
                with a checkpoint makes a resumed run see the same batches.

        Returns:
            Batch with x = window[:, :-1], y = window[:, 1:].
        """
        if len(self) < seq_len + 1:
            raise DataError(
                f"the training stream has {len(self)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                "use more text or a shorter --seq-len"
            )
        starts_B = torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator)
        return self._windows(starts_B, seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, max_windows: int) -> Iterator[Batch]:
        """Fixed windows spread evenly over the stream (the same every call), in batches of at most B.

        A stream shorter than S+1 gives one window of its whole length; one shorter than 2 gives nothing.
        """
        seq_len = min(seq_len, len(self) - 1)
        if seq_len < 1:
            return
        count = max(1, min(max_windows, (len(self) - 1) // seq_len))
        last_start = len(self) - seq_len - 1
        starts = torch.arange(count) * last_start // max(count - 1, 1)
        for i in range(0, count, batch_size):
            yield self._windows(starts[i : i + batch_size], seq_len)

    def _windows(self, starts_B: Tensor, seq_len: int) -> Batch:
        index_BS = starts_B[:, None] + torch.arange(seq_len + 1)
        window = self.ids[index_BS]
        return Batch(window[:, :-1], window[:, 1:], self.domains[index_BS][:, 1:])


# ------------------------------------------------------------------------------------------------ the whole path


@dataclass
class Data:
    """Everything training needs from the corpus.

    Attributes:
        train, val: the token streams.
        tokenizer: trained on the training split (or bytes).
        train_documents, val_documents: the documents behind each stream, in stream order, with their domains.
    """

    train: TokenStream
    val: TokenStream
    tokenizer: Tokenizer
    train_documents: list[Document]
    val_documents: list[Document]

    def summary(self) -> str:
        domains = ", ".join(self.train.domain_names)
        docs = self.train_documents + self.val_documents
        return (
            f"corpus: {len(docs):,} documents ({domains}), {sum(len(d.text) for d in docs):,} characters; "
            f"{len(self.train):,} train / {len(self.val):,} validation tokens; vocab {self.tokenizer.vocab_size:,}"
        )


def prepare_data(
    path: str | os.PathLike | None = None,
    tokenizer: str | Tokenizer = "bpe",
    vocab_size: int = 4096,
    text_field: str = "text",
    max_tokens: int | None = None,
    seed: int = 0,
) -> Data:
    """Load, split and tokenize a corpus.

    Args:
        path: see `load_documents` (None: the embedded corpus).
        tokenizer: "bpe" (train one on the training split), "bytes", or an existing Tokenizer (a resumed run).
        vocab_size: BPE vocabulary size.
        text_field: JSONL key of the text.
        max_tokens: keep only the first N tokens of the training stream (validation is not cut).
        seed: the split's seed.

    Returns:
        Data with both streams and the tokenizer.
    """
    docs = load_documents(path, text_field)
    train_docs, val_docs = split_documents(docs, seed=seed)
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer == "bytes":
        tok = Tokenizer.bytes()
    elif tokenizer == "bpe":
        tok = Tokenizer.train_bpe([d.text for d in train_docs], vocab_size)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}: expected 'bpe' or 'bytes'")
    names = sorted({d.domain for d in docs})
    if len(names) > 255:
        raise DataError(f"{len(names)} distinct domains; at most 255 are supported")
    train = TokenStream.from_documents(train_docs, tok, names, max_tokens)
    val = TokenStream.from_documents(val_docs, tok, names)
    return Data(train, val, tok, train_docs, val_docs)
