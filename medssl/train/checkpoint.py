"""The one checkpoint reader and writer of medssl.

Writing is atomic (temp file + rename). Reading never unpickles anything but tensors and plain containers
(`torch.load(weights_only=True)`, or safetensors); `strip_prefixes` removes wrapper prefixes and
`load_exact` loads a state dict and reports the exact missing / unexpected keys. `medssl.hub`,
`medssl.train` and `medssl.detection` all read weights through these functions.
"""

from __future__ import annotations

import argparse
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_RE = re.compile(r"checkpoint-(\d+)\.pt$")


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    """`folder/checkpoint-00000100.pt` for step 100."""
    return Path(folder) / f"checkpoint-{step:08d}.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically: never a half-written checkpoint under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file: safetensors, or `torch.load(weights_only=True)` (tensors and plain containers).

    `argparse.Namespace` (what the official MAE stores as 'args') is the one class allowed besides those.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends
        raise ValueError(f"{path}: cannot be loaded safely with weights_only=True ({exc}). medssl never "
                         "unpickles arbitrary objects: re-save the state dict from a trusted environment "
                         "(torch.save(ckpt['model'], ...) or safetensors).") from exc


WRAPPER_PREFIXES = ("module.", "_orig_mod.", "encoder.", "backbone.", "model.")


def strip_prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = WRAPPER_PREFIXES
                   ) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP `module.`, `torch.compile`, ...) shared by every key, repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
               allowed_missing: set[str] | frozenset[str] = frozenset()) -> None:
    """`module.load_state_dict(state, strict=False)`, then assert the exact key sets (and shapes).

    Raises:
        ValueError: naming `where`, the missing keys (beyond `allowed_missing`), the unexpected keys, or the
            shape mismatch.
    """
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{where}: weights do not fit {type(module).__name__}: {exc}") from exc
    missing, unexpected = set(result.missing_keys) - set(allowed_missing), set(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit {type(module).__name__}: missing keys {sorted(missing)}, "
                         f"unexpected keys {sorted(unexpected)}")


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in `folder`, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.search(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(folder: str | os.PathLike, keep: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything); those of a step that is a
    multiple of `keep_every` (> 0) are kept too (snapshots along a run, e.g. for a pretraining-length curve)."""
    if keep <= 0:
        return
    found = sorted((int(m.group(1)), p) for p in Path(folder).iterdir() if (m := CKPT_RE.search(p.name)))
    for step, p in found[:-keep]:
        if keep_every <= 0 or step % keep_every:
            p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
