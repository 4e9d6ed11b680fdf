"""torchrun / DDP plumbing for ``python -m fastxmc.train``.

Single process: ``python -m fastxmc.train ...``. One node, N processes::

    torchrun --standalone --nproc_per_node=N -m fastxmc.train --preset coco128 ...

Several nodes (run on every node, same rendezvous endpoint)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=<0|1> \\
        --rdzv_backend=c10d --rdzv_endpoint=<host0>:29500 -m fastxmc.train ...

The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
...): NCCL on GPUs (one per process, ``cuda:LOCAL_RANK``), gloo on CPU. G and D are wrapped in
separate DDP modules; every rank reads its own shard of the data (the loader takes rank and
world size) and rank 0 alone writes the run directory.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastxmc.atomic import process_alive


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # (host name, pid) of every rank, gathered at start: names the rank that was lost
    processes: tuple = field(default=(), compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def group(self):
        """The process group for global negatives (None when single-process)."""
        return dist.group.WORLD if self.distributed else None


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when a GPU is present, else CPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but no CUDA GPU is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str) -> DistEnv:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    processes = ()
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (socket.gethostname(), os.getpid()))
        processes = tuple(gathered)
    return DistEnv(rank, world_size, local_rank, device, processes)


class PeerLostError(RuntimeError):
    """Another rank of the job died or stopped answering: the collectives cannot go on."""


def lost_ranks(env: DistEnv) -> list:
    """Ranks on this host whose process no longer exists (others cannot be checked from here)."""
    here, lost = socket.gethostname(), []
    for rank, (host, pid) in enumerate(env.processes):
        if rank == env.rank or host != here:
            continue
        if not process_alive(pid):
            lost.append(rank)
    return lost


def peer_lost_error(env: DistEnv, err: BaseException) -> PeerLostError | None:
    """A :class:`PeerLostError` naming the lost rank(s) when ``err`` is a failed collective of a
    distributed run; ``None`` for any other error (the caller re-raises it)."""
    if not env.distributed or not isinstance(err, RuntimeError) or isinstance(err, PeerLostError):
        return None
    text = str(err)
    collective = isinstance(err, getattr(dist, "DistError", ())) or any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset",
                                  "Broken pipe", "timed out"))
    if not collective:
        return None
    lost = lost_ranks(env)
    who = (f"rank {', '.join(map(str, lost))} is gone" if lost else
           "another rank stopped answering (on another host, or still shutting down)")
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # gloo prefixes its source line
    return PeerLostError(f"rank {env.rank} of {env.world_size}: {who}, so the collectives cannot "
                         f"go on ({first[:120]})")


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, env: DistEnv, *, find_unused_parameters: bool = False) -> nn.Module:
    """DDP-wrap ``module`` when distributed (buffers such as BN statistics and spectral-norm vectors
    are broadcast from rank 0 at every forward, so every rank sees the same ones)."""
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=True,
                                   find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def any_rank(flags: list, env: DistEnv) -> list:
    """Element-wise OR of boolean flags over the ranks (one small all-reduce), so that every
    rank takes the same decision (stop, non-finite loss)."""
    if not env.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def parameter_fingerprint(module: nn.Module) -> list:
    """Sum and sum of squares of every parameter (fp64), to check that ranks agree."""
    with torch.no_grad():
        return [(float(p.double().sum()), float(p.double().square().sum()))
                for p in module.parameters()]
