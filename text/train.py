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
in ``run.json`` relative to the run directory, so the directory can be moved or copied).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from core.engine.checkpoint import atomic_write
from core.engine.config import register_schema
from core.engine.run import hydra_entry, prepare
from core.engine.trainer import Trainer, seed_from

from .data import chunk_tokens, encode_documents, load_corpus, split_documents
from .model import TextModel, TextModelConfig, make_loss
from .tokenizers import build_tokenizer

TOKENIZERS = ("char", "gpt2", "bpe")


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
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"data.tokenizer must be one of {list(TOKENIZERS)}, got {self.tokenizer!r}")
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


def prepare_data(cfg: TextDataConfig, out_dir: str | Path | None = None):
    """``(tokenizer, train chunks (N, L), validation chunks (M, L), split names)`` of a data config."""
    docs = load_corpus(cfg.corpus, cfg.paths)
    train_names, val_names = split_documents(list(docs), cfg.val_fraction, cfg.split_seed)
    train_texts = [docs[n] for n in train_names]
    val_texts = [docs[n] for n in val_names]
    bpe_path = None
    if out_dir is not None:
        # Under torchrun every rank trains the same (deterministic) BPE before the process group
        # exists; each writes its own file so that no two ranks write one file at once.
        rank = int(os.environ.get("RANK", "0"))
        bpe_path = Path(out_dir) / ("tokenizer.json" if rank == 0 else f".tokenizer.rank{rank}.json")
    tok = build_tokenizer(cfg.tokenizer, train_texts, all_texts=val_texts, bpe_vocab_size=cfg.bpe_vocab_size,
                          bpe_path=bpe_path)
    sep = tok.encode("\n\n")
    train = chunk_tokens(encode_documents(tok, train_texts, sep), cfg.seq_len)
    val = chunk_tokens(encode_documents(tok, val_texts, sep), cfg.seq_len)
    return tok, train, val, {"train": train_names, "val": val_names}


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
    tok, train_chunks, val_chunks, split = prepare_data(data_cfg, out_dir)
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
