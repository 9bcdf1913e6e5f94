"""Training entry point of the text domain: discrete diffusion (SEDD, RADD) and the AR baseline.

    python -m text.train model=radd trainer.out_dir=outputs/text/radd
    python -m text.train model=sedd data=bible data.tokenizer=gpt2
    python -m text.train model=ar data=files data.paths=[my/texts] data.tokenizer=bpe

Config groups (``configs/text/``): ``model`` (``sedd`` | ``radd`` | ``ar``: :class:`TextModelConfig`),
``data`` (``shakespeare`` | ``bible`` | ``files``: :class:`TextDataConfig`), ``sampler`` (samples
written during training), ``trainer`` (``core.engine`` :class:`TrainerConfig`). The three models
share one transformer and parameter count, the data pipeline, the engine and its settings, so
a comparison at equal steps changes only ``model=``.

The run directory gets ``run.json`` (model and data settings, tokenizer spec, vocabulary size, the
EMA decays in their configured order), ``val_chunk.pt`` (one validation chunk, for the infilling
example of ``text.sample``) and, with ``data.tokenizer=bpe``, the trained ``tokenizer.json`` (named
in ``run.json`` relative to the run directory, so the directory can be moved or copied). A run
directory keeps its tokenizer: resuming its checkpoints with data settings (or text) that build
another one, e.g. another ``data.bpe_vocab_size``, is refused at start (a ``ConfigError``, exit 2)
and leaves its ``tokenizer.json`` and ``run.json`` as they were; use a new ``trainer.out_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from core.engine.checkpoint import atomic_write, list_checkpoints
from core.engine.config import ConfigError, register_schema
from core.engine.run import hydra_entry, prepare
from core.engine.trainer import Trainer, seed_from

from .data import chunk_tokens, encode_documents, load_corpus, split_documents
from .model import TextModel, TextModelConfig, make_loss
from .tokenizers import BPETokenizer, build_tokenizer, from_spec, train_bpe

TOKENIZERS = ("char", "gpt2", "bpe")
MIN_BPE_VOCAB = 257  # train_bpe: the 256 byte tokens and at least one merge


@dataclass
class TextDataConfig:
    corpus: str = "shakespeare"  # shakespeare | bible | files
    paths: list[str] = field(default_factory=list)  # corpus=files: text files or directories
    tokenizer: str = "char"  # char | gpt2 | bpe (trained on the training split)
    bpe_vocab_size: int = 2048
    seq_len: int = 128
    val_fraction: float = 0.1
    split_seed: int = 0

    def validate(self) -> None:
        if self.corpus not in ("shakespeare", "bible", "files"):
            raise ValueError(f"data.corpus must be one of ['shakespeare', 'bible', 'files'], got {self.corpus!r}")
        if self.corpus == "files" and not self.paths:
            raise ValueError("data.corpus=files needs data.paths (text files or directories)")
        for p in self.paths:
            if not Path(p).exists():
                raise ValueError(f"data.paths holds a path that does not exist: {p!r}")
            if Path(p).is_dir() and next(Path(p).rglob("*.txt"), None) is None:
                raise ValueError(f"data.paths holds a directory without *.txt files: {p!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"data.tokenizer must be one of {list(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and (isinstance(self.bpe_vocab_size, bool) or self.bpe_vocab_size < MIN_BPE_VOCAB):
            raise ValueError(f"data.bpe_vocab_size must be >= {MIN_BPE_VOCAB} (the 256 bytes + merges), "
                             f"got {self.bpe_vocab_size!r}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")


@dataclass
class TextSamplerConfig:
    steps: int = 64  # diffusion steps of the samples written during training
    num_samples: int = 2
    temperature: float = 1.0  # AR
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.num_samples < 1 or not self.temperature > 0:
            raise ValueError(f"sampler.steps, sampler.num_samples must be >= 1 and sampler.temperature > 0, got "
                             f"{self.steps}, {self.num_samples}, {self.temperature}")


register_schema("model", "text_model_schema", TextModelConfig)
register_schema("data", "text_data_schema", TextDataConfig)
register_schema("sampler", "text_sampler_schema", TextSamplerConfig)


def prepare_data(cfg: TextDataConfig, out_dir: str | Path | None = None, *, existing_run: bool = False):
    """``(tokenizer, train chunks (N, L), validation chunks (M, L), split names)`` of a data config.

    A corpus these settings cannot use (no training document left, a split too short for one chunk
    of ``data.seq_len`` tokens, a file that is not UTF-8) is a :class:`ConfigError` naming the setting.
    ``out_dir``: the run directory; a ``bpe`` tokenizer is trained to a temporary file and then
    written (atomically) to its ``tokenizer.json``. ``existing_run``: ``out_dir`` holds checkpoints,
    whose weights belong to the tokenizer the run recorded (``run.json``, ``tokenizer.json``): a
    tokenizer of other content is a :class:`ConfigError` (a data setting changed the vocabulary),
    raised before anything in ``out_dir`` is written, and the run's own files are kept.
    """
    where = f"data.paths={list(cfg.paths)}" if cfg.corpus == "files" else f"data.corpus={cfg.corpus!r}"
    try:
        docs = load_corpus(cfg.corpus, cfg.paths)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        train_names, val_names = split_documents(list(docs), cfg.val_fraction, cfg.split_seed)
    except ValueError as e:
        hint = ("the corpus is split by document and validation gets at least one: give more documents"
                if len(docs) < 2 else "lower data.val_fraction or give more documents")
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} on the {len(docs)} document(s) of {where}: {e}; "
                          f"{hint}") from None
    train_texts = [docs[n] for n in train_names]
    val_texts = [docs[n] for n in val_names]
    if cfg.tokenizer == "bpe" and out_dir is not None:
        tok = _bpe_for_run(cfg, train_texts, Path(out_dir), existing_run)
    else:
        tok = build_tokenizer(cfg.tokenizer, train_texts, all_texts=val_texts, bpe_vocab_size=cfg.bpe_vocab_size)
        if existing_run and out_dir is not None:
            _check_run_tokenizer(cfg, tok, Path(out_dir))
    sep = tok.encode("\n\n")
    chunks = []
    for name, texts in (("training", train_texts), ("validation", val_texts)):
        stream = encode_documents(tok, texts, sep)
        if len(stream) < cfg.seq_len:
            raise ConfigError(f"data.seq_len={cfg.seq_len} is longer than the {name} split, whose {len(stream)} "
                              f"tokens make no chunk; lower data.seq_len or give more text")
        chunks.append(chunk_tokens(stream, cfg.seq_len))
    return tok, chunks[0], chunks[1], {"train": train_names, "val": val_names}


def _bpe_for_run(cfg: TextDataConfig, train_texts: list[str], out_dir: Path, existing_run: bool) -> BPETokenizer:
    """Train the BPE of ``cfg`` in a temporary folder; check it against an existing run's; write it into the run."""
    # Under torchrun every rank trains the same (deterministic) BPE before the process group
    # exists; each writes its own file so that no two ranks write one file at once.
    rank = int(os.environ.get("RANK", "0"))
    final = out_dir / ("tokenizer.json" if rank == 0 else f".tokenizer.rank{rank}.json")
    with tempfile.TemporaryDirectory(prefix="polydiff-bpe-") as tmp:
        new = train_bpe(train_texts, cfg.bpe_vocab_size, Path(tmp) / "tokenizer.json")
        content = Path(new.path).read_bytes()
    if existing_run:
        _check_run_tokenizer(cfg, new, out_dir)
        if final.is_file():  # the run's own file (of the same content): kept as it is
            return BPETokenizer(str(final))
    atomic_write(final, lambda f: f.write(content))
    return BPETokenizer(str(final))


def _check_run_tokenizer(cfg: TextDataConfig, tok, out_dir: Path) -> None:
    """ConfigError unless ``tok`` has the content of the tokenizer the run in ``out_dir`` recorded."""
    old, old_data = None, None
    try:
        if (out_dir / "run.json").is_file():
            info = json.loads((out_dir / "run.json").read_text())
            old, old_data = from_spec(info["tokenizer"], root=out_dir), info.get("data")
        elif (out_dir / "tokenizer.json").is_file():
            old = BPETokenizer(str(out_dir / "tokenizer.json"))
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing readable recorded: the engine still checks the weights against the model
    if old is None or old.fingerprint() == tok.fingerprint():
        return
    new_data = dataclasses.asdict(cfg)
    changed = [f"data.{k} {old_data[k]!r} -> {v!r}" for k, v in new_data.items()
               if isinstance(old_data, dict) and k in old_data and old_data[k] != v]
    why = (f"a data setting changed the tokenizer: {', '.join(changed)}" if changed else
           "the training text changed the tokenizer (the data settings are the run's)")
    size = (f"{tok.vocab_size} tokens against the run's {old.vocab_size}" if tok.vocab_size != old.vocab_size else
            f"{tok.vocab_size} tokens like the run's, but other ones")
    raise ConfigError(f"{why}: the {tok.kind} vocabulary it builds has {size}. {out_dir} holds checkpoints whose "
                      "weights belong to the run's tokenizer, which is kept: resume with the run's data settings, "
                      "or give a new trainer.out_dir")


def make_sample_fn(model_cfg: TextModelConfig, sampler: TextSamplerConfig, tokenizer, seq_len: int):
    """Write ``samples/step_<step>.txt`` (decoded samples of the EMA model) on rank 0."""
    from .sample import sample_ar, sample_diffusion

    def sample_fn(model: torch.nn.Module, step: int, out_dir: Path) -> None:
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(seed_from(sampler.seed, step))
        net = getattr(model, "module", model)
        if model_cfg.kind == "ar":
            x, _ = sample_ar(net, sampler.num_samples, seq_len, temperature=sampler.temperature, generator=g)
        else:
            x, _ = sample_diffusion(net, sampler.num_samples, seq_len, sampler.steps, generator=g)
        folder = out_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        text = "\n\n".join(f"## sample {i}\n{tokenizer.decode(r.tolist())}" for i, r in enumerate(x.cpu()))
        atomic_write(folder / f"step_{step:08d}.txt", lambda f: f.write(text.encode()))

    return sample_fn


def train(cfg: DictConfig) -> dict:
    """Check ``cfg``, build the data, model and loss, and train with the engine; returns the last metrics."""
    ctx = prepare(cfg, groups=("model", "data", "sampler"))
    model_cfg: TextModelConfig = ctx.groups["model"]
    data_cfg: TextDataConfig = ctx.groups["data"]
    out_dir = Path(ctx.trainer.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # checkpoints there (whatever trainer.resume says) hold weights of the run's tokenizer: never replaced
    existing_run = bool(list_checkpoints(out_dir / "checkpoints"))
    tok, train_chunks, val_chunks, split = prepare_data(data_cfg, out_dir, existing_run=existing_run)
    model = TextModel(model_cfg, tok.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())  # before the engine wraps (FSDP shards) it
    trainer = Trainer(model, make_loss(model_cfg), train_chunks, ctx.trainer,
                      sample_fn=make_sample_fn(model_cfg, ctx.groups["sampler"], tok, data_cfg.seq_len),
                      run_config=ctx.snapshot())
    trainer.resume()  # a refused resume (another model's checkpoint) stops before run.json is rewritten
    if trainer.is_main:
        info = {"model": dataclasses.asdict(model_cfg), "data": dataclasses.asdict(data_cfg), "tokenizer": tok.spec(out_dir),
                "vocab_size": tok.vocab_size, "ema_decays": list(ctx.trainer.ema_decays), "parameters": n_params,
                "train_chunks": train_chunks.shape[0], "val_chunks": val_chunks.shape[0], "split": split}
        atomic_write(out_dir / "run.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
        atomic_write(out_dir / "val_chunk.pt", lambda f: torch.save(val_chunks[0].clone(), f))
    result = trainer.fit()
    if trainer.is_main:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}), flush=True)
    return result


main = hydra_entry(train, Path(__file__).resolve().parents[1] / "configs" / "text")

if __name__ == "__main__":
    main()
