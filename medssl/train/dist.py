"""One distributed set-up for plain `python`, `torchrun` (DDP) and the `deepspeed` launcher."""

from __future__ import annotations

import gc
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

log = logging.getLogger("medssl")


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, backend ('none' | 'ddp' | 'deepspeed') and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(spec: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The one device rule: None / ``auto`` -> this rank's CUDA device when CUDA is present, else the CPU;
    ``cuda`` -> this rank's CUDA device; an explicit ``cuda:k`` or ``cpu`` as given."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def setup_distributed(use_deepspeed: bool = False, device: str | None = None) -> DistInfo:
    """Initialise the process group the launcher asks for.

    - `deepspeed` launcher or `--deepspeed` under plain python: `deepspeed.init_distributed` (gloo on CPU,
      nccl on CUDA); a single process gets RANK/WORLD_SIZE/MASTER_* defaults so no MPI is looked for.
    - `torchrun` (WORLD_SIZE > 1 in the environment): torch.distributed (gloo on CPU, nccl on CUDA) + DDP.
    - otherwise a single process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if use_deepspeed:
        defaults = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(_free_port()))
        for k, v in defaults.items():
            os.environ.setdefault(k, v)
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        info = DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, "deepspeed", dev)
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
        torch_dist.init_process_group(backend=backend)
        info = DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, "ddp", dev)
    else:
        info = DistInfo(device=dev)
    if info.is_main:
        log.info("medssl distributed: backend=%s world_size=%d device=%s", info.backend, info.world_size, dev)
    return info


def cleanup_distributed(info: DistInfo, *, failed: bool = False) -> None:
    """Destroy the process group at exit (avoids DeepSpeed's occasional abort at interpreter exit).

    Call it once the engine is out of scope: unreachable DDP wrappers still hold the group, and a gloo group
    freed later, at interpreter exit, can abort the process ("terminate called without an active exception").
    After a normal end every rank first waits for the others (a rank that tears its gloo pairs down while a
    peer is still busy, rank 0 saving say, can abort that peer the same way). `failed=True` (this rank is
    raising) skips that wait: the other ranks may never arrive, and the error must reach the launcher.
    """
    gc.collect()
    if info.backend == "deepspeed":
        import deepspeed

        deepspeed.comm.destroy_process_group()
    elif info.backend == "ddp" and torch_dist.is_initialized():
        if not failed:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def _all_reduce(value: float, info: DistInfo, op) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.backend != "none" else "cpu")
    torch_dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """Mean of a scalar over ranks (identity for one process)."""
    return value if info.world_size == 1 else _all_reduce(value, info, torch_dist.ReduceOp.SUM) / info.world_size


def all_reduce_max(value: float, info: DistInfo) -> float:
    """Max of a scalar over ranks (identity for one process)."""
    return value if info.world_size == 1 else _all_reduce(value, info, torch_dist.ReduceOp.MAX)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank (`[obj]` for one process)."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op for one process)."""
    if info.world_size > 1:
        torch_dist.barrier()
