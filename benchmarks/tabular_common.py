"""What the tabular benchmarks share: a shipped data set and a saved model fitted on it, checked."""

from __future__ import annotations

import argparse

import torch


def load_data_and_model(p: argparse.ArgumentParser, data: str, model: str, threads: int, label: str = ""):
    """``(train, test, spec, model)``: ``data``'s split and the saved TabularDiffusion at ``model``, progress
    bars off, torch on ``threads`` threads. A data set that does not exist, or a model whose columns it
    lacks, exits through ``p.error`` naming them (``label`` prefixes the message, e.g. the flag)."""
    from tabular.api import TabularDiffusion
    from tabular.data import DATASETS, load_dataset

    if data not in DATASETS:
        p.error(f"unknown --data {data!r}; choose one of {sorted(DATASETS)}")
    torch.set_num_threads(threads)
    train, test, spec = load_dataset(data)
    m = TabularDiffusion.load(model)
    absent = [c for c in m.schema.names if c not in train.columns]
    if absent:
        p.error(f"{label}the model's columns {absent} are not in --data {data!r}; name the model's data set")
    m.fit_config.progress = False
    return train, test, spec, m


def write_result(path: str | None, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (nothing when None), written atomically: an interrupted
    benchmark leaves the previous results file whole."""
    if path:
        import json

        from core.engine.checkpoint import atomic_write

        atomic_write(path, lambda f: f.write(json.dumps(result, indent=1).encode()))
