"""Checkpoints: atomic writes, keep-last-k, weights-only loads, RNG states, safetensors export.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads
with ``torch.load(..., weights_only=True)``: a file holding any other pickled object is refused
before that object is built (nothing in it runs). Files are written to a temporary name in the
same directory, flushed and fsynced, renamed over the final name and the directory fsynced, so
a process killed at any moment leaves either the old file set or the new one, never a torn file
under a checkpoint name.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

log = logging.getLogger("polydiff.engine")

CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
FORMAT = "polydiff.engine/1"

# Test hook: when this env var is a substring of a file being written, stall (after the data is
# written and fsynced, before the rename) so a test can SIGKILL the process mid-checkpoint.
_STALL_ENV = "POLYDIFF_TEST_STALL_BEFORE_RENAME"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely: refused, corrupt or incomplete."""


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then fsync and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        stall = os.environ.get(_STALL_ENV)
        if stall and stall in path.name:
            print(f"polydiff-test: stalling before rename of {tmp}", file=sys.stderr, flush=True)
            time.sleep(3600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically to ``path``."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; refuse anything else with ``CheckpointError``.

    A file containing arbitrary pickled objects (classes, functions, ``__reduce__`` payloads) is
    rejected by torch's restricted unpickler before any of its objects is constructed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load checkpoint {str(path)!r}: it contains pickled objects outside the "
            f"weights-only allow-list (tensors, numbers, strings, lists, dicts); nothing in it was "
            f"executed. torch said: {first}"
        ) from None
    except Exception as e:  # noqa: BLE001 - garbage bytes fail in the legacy unpickler in many ways (IndexError, ...)
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or incomplete: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict")
    return state


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``directory``, oldest first; temporary files excluded."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; return the removed paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpts = list_checkpoints(directory)
    removed = [p for _, p in ckpts[:-keep_last]]
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        fsync_dir(directory)
    return removed


def set_aside_checkpoints_after(directory: str | os.PathLike, step: int | None) -> list[Path]:
    """Rename the checkpoints of a step after ``step`` (all of them for None) to ``<name>.set-aside``
    and return the new paths. A run that resumes from an older checkpoint than the newest (the newer
    ones did not load, or ``resume`` named an older one) would otherwise have pruning, which keeps the
    highest steps, delete its own new checkpoints and keep the abandoned ones, and a later
    ``resume=auto`` would continue the abandoned run. Renamed, not deleted: nothing is lost."""
    moved = []
    for s, p in list_checkpoints(directory):
        if step is None or s > step:
            target = p.with_name(p.name + ".set-aside")
            k = 1
            while target.exists():
                target, k = p.with_name(f"{p.name}.set-aside.{k}"), k + 1
            p.rename(target)
            moved.append(target)
    if moved:
        fsync_dir(directory)
    return moved


def pick_resume_checkpoint(directory: str | os.PathLike, resume, key: str = "resume",
                           error: type[Exception] = ValueError, bools=("false", "true")) -> tuple[Path, dict] | None:
    """The checkpoint a run continues from, as ``resume`` asks: ``"auto"`` the newest loadable one in
    ``directory`` if any (None: start at step 0), ``True`` the same but one is required, ``False`` none
    may exist (None), a path that file. Refusals raise ``error`` naming ``key`` and its value as the
    caller's user spells them (``bools``: a config's false/true, or Python's False/True). Files are
    read with ``weights_only=True``."""
    existing = list_checkpoints(directory)
    if resume is False:
        if existing:
            raise error(f"{key}={bools[0]} but {directory} already holds checkpoints (newest: step {existing[-1][0]}); "
                        f"use {key}=auto to continue them, or another directory")
        return None
    if resume is True or resume == "auto":
        found = newest_loadable(directory)
        if found is None and resume is True:
            raise error(f"{key}={bools[1]} but {directory} holds no loadable checkpoint")
        return found
    return Path(resume), load_checkpoint(resume)


def first_ema_shadow(state: dict, order=()) -> dict | None:
    """A checkpoint's EMA weights of the first decay key of ``order`` (e.g. a run's recorded
    ``trainer.ema_decays`` as :func:`core.engine.ema.decay_key` spells them) that it holds, else its
    first shadow (the engine keeps the shadows in the configured order), or None without an EMA."""
    shadows = (state.get("ema") or {}).get("shadows") or {}
    if not shadows:
        return None
    for key in order:
        if key in shadows:
            return shadows[key]
    return next(iter(shadows.values()))


def read_run_json(run_dir: str | os.PathLike, entry: str, required=()) -> dict:
    """The ``run.json`` an entry point (``entry``, e.g. ``"graph.train"``) wrote into ``run_dir``, as a dict
    holding every key of ``required``; ValueError saying "<run_dir> is not a <entry> run" and why (no
    run.json, an unreadable one, missing keys: another entry point's run) otherwise."""
    info_path = Path(run_dir) / "run.json"
    what = f"{run_dir} is not {'an' if entry[:1] in 'aeiou' else 'a'} {entry} run"
    if not info_path.is_file():
        raise ValueError(f"{what}: it holds no run.json")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(info_path)!r} cannot be read: {e}") from None
    missing = [k for k in required if not isinstance(info, dict) or k not in info]
    if missing or not isinstance(info, dict):
        raise ValueError(f"{what}: its run.json has no {missing}; is it another entry point's run?")
    return info


def state_dict_misfit(expected: dict, weights: dict, show: int = 3) -> str:
    """How ``weights`` differ from a model's ``state_dict()`` ``expected``: the names missing, unexpected
    and of other shapes (a few of each, with shapes), or ``''`` when they fit."""
    def some(names, shapes=False):
        names = sorted(names)
        shown = [f"{k} {tuple(weights[k].shape)} in the weights, {tuple(expected[k].shape)} in the model"
                 for k in names[:show]] if shapes else names[:show]
        return f"{len(names)} ({'; '.join(shown) if shapes else shown}{' ...' if len(names) > show else ''})"

    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    shapes = {k for k in set(expected) & set(weights)
              if tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)}
    parts = [f"{what} {some(names, what == 'other shapes')}" for what, names in
             (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if names]
    return ", ".join(parts)


def ema_order(run_dir: str | os.PathLike, decays=None) -> list[str]:
    """Decay keys (``"0.999"``) of a run's EMAs in ``trainer.ema_decays`` order, the first being the
    trainer's default EMA. ``decays``: the list a run recorded (its run.json); a run from before it was
    recorded falls back on the shadow order of its newest checkpoint (the engine keeps the configured
    order), else ``[]``."""
    from .ema import decay_key

    if decays:
        return [decay_key(d) for d in decays]
    found = newest_loadable(Path(run_dir) / "checkpoints")
    return list((found[1].get("ema") or {}).get("shadows") or {}) if found is not None else []


def first_ema_export(run_dir: str | os.PathLike, decays=None) -> Path | None:
    """The run's exported EMA weights (``ema_<decay>.safetensors``) of the first configured decay
    (:func:`ema_order`), the first export by name when none matches (e.g. a renamed, packed run), or
    None without exports. The file name never decides between decays the run recorded."""
    exports = sorted(Path(run_dir).glob("ema_*.safetensors"))
    if not exports:
        return None
    by_name = {p.name: p for p in exports}
    order = ema_order(run_dir, decays) if (decays or len(exports) > 1) else []
    return next((by_name[f"ema_{k}.safetensors"] for k in order if f"ema_{k}.safetensors" in by_name), exports[0])


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by a writer that died before its rename."""
    d = Path(directory)
    if not d.is_dir():
        return []
    stale = [p for p in d.iterdir() if p.name.startswith(".") and ".tmp." in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def newest_loadable(directory: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``directory`` that loads, or None; skipped files are logged loudly."""
    for step, p in reversed(list_checkpoints(directory)):
        try:
            return p, load_checkpoint(p)
        except CheckpointError as e:
            if "refusing" in str(e):
                raise
            log.warning("skipping checkpoint of step %d: %s", step, e)
    return None


# ----------------------------------------------------------------------------- RNG states
# Stored as tensors and plain numbers so they load under weights_only=True.


def rng_state() -> dict:
    """The global RNG states of python ``random``, numpy, torch CPU and (if initialised) CUDA."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
         npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this host has %d; not restored",
                        len(cuda), torch.cuda.device_count())


# ----------------------------------------------------------------------------- export


def export_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write a flat ``name -> tensor`` dict as safetensors, atomically."""
    from safetensors.torch import save

    flat = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"export_safetensors: value of {k!r} is a {type(v).__name__}, not a tensor")
        flat[k] = v.detach().to("cpu").contiguous().clone()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = save(flat, metadata=meta)
    return atomic_write(path, lambda f: f.write(data))


def export_ema_from_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike,
                               decay: float | None = None) -> Path:
    """Export the EMA weights of ``decay`` (default: the first decay) from a checkpoint file."""
    state = load_checkpoint(ckpt)
    ema = state.get("ema") or {}
    shadows = ema.get("shadows") or {}
    if not shadows:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} holds no EMA weights")
    key = next(iter(shadows)) if decay is None else _decay_key(decay)
    if key not in shadows:
        raise ValueError(f"decay {decay!r} is not in checkpoint {str(ckpt)!r}; it has {list(shadows)}")
    return export_safetensors(shadows[key], out, {"ema_decay": key, "step": str(state.get("step"))})


def _decay_key(decay: float) -> str:
    return repr(float(decay))


def main(argv: list[str] | None = None) -> None:
    """``python -m core.engine.checkpoint CKPT OUT.safetensors [--decay D]``: export EMA weights."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--decay", type=float, default=None)
    args = ap.parse_args(argv)
    print(export_ema_from_checkpoint(args.ckpt, args.out, args.decay))


if __name__ == "__main__":
    main()
