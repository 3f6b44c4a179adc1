"""Data-parallel ranks of one cell: the process group, rank-0 duties, and a local rank spawner.

    python launch.py gpus=2 ...                     # starts 2 ranks itself (spawn_ranks below)
    torchrun --nproc-per-node 2 launch.py gpus=2    # or any launcher that sets RANK/WORLD_SIZE/...

A cell with `gpus: N > 1` runs as N processes on one node, one per GPU (rank r uses cuda:LOCAL_RANK).
Under SLURM each rank is one submitit task; locally `spawn_ranks` (or submitit's local executor)
starts them. Every rank builds the same model and adapter, training is DDP through the TRL trainer
(gradients of v all-reduced, so v stays bit-identical on every rank), evaluation is sharded and
gathered, and only rank 0 writes results, metrics, W&B and the exported adapter. On CPU the same
code runs with the gloo backend when WORLD_SIZE > 1 (the tests do this).
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .fingerprint import weight_fingerprint

# How long a collective may wait for the slowest rank, in minutes (rollouts of long completions are slow).
TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN = "TINYABLATE_DIST_TIMEOUT_MIN", 60


def collective_timeout() -> timedelta:
    """$TINYABLATE_DIST_TIMEOUT_MIN (default 60) as a timedelta; a bad value says what to set."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = int(raw)
    except ValueError:
        minutes = 0
    if minutes < 1:
        raise ValueError(
            f"{TIMEOUT_ENV}={raw!r} is invalid: a whole number of minutes >= 1 (default {DEFAULT_TIMEOUT_MIN})"
        )
    return timedelta(minutes=minutes)


@dataclass(frozen=True)
class Ranks:
    """Where this process sits among the ranks of its cell."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env() -> Ranks:
    """The layout torchrun, submitit or spawn_ranks exported; a single process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def current() -> Ranks:
    """This process's ranks once the group is up (single process otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()


@contextmanager
def process_group(gpus: int) -> Iterator[Ranks]:
    """Join the cell's process group for the duration of the block (a no-op for one process).

    nccl on GPUs, gloo on CPU. Each GPU rank is pinned to cuda:LOCAL_RANK before any weight loads.
    """
    ranks = ranks_from_env()
    if not ranks.distributed:
        if gpus > 1:  # one process would quietly train on one of the N GPUs
            raise ValueError(
                f"gpus={gpus} runs as {gpus} ranks, but this is a single process (no WORLD_SIZE): "
                f"start it with launch.py or tinyablate.cell.run_cell, or under "
                f"torchrun --nproc-per-node {gpus}"
            )
        yield ranks
        return
    if gpus not in (0, ranks.world_size):
        raise ValueError(
            f"gpus={gpus} but this cell was started as {ranks.world_size} ranks (WORLD_SIZE): "
            f"start one rank per GPU, e.g. torchrun --nproc-per-node {gpus}"
        )
    timeout = collective_timeout()
    _share_cpu_threads(ranks)
    created = not dist.is_initialized()
    if created:
        if gpus:
            require_gpus(ranks.local_rank + 1)
            torch.cuda.set_device(ranks.local_rank)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", ranks.local_rank))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    try:
        yield ranks
        if created:
            dist.barrier()  # no rank tears down while another still communicates
    finally:
        if created and dist.is_initialized():
            # DDP wrappers (e.g. inside a finished Trainer) hold the group through reference cycles; freed
            # only at interpreter exit, after the group, gloo's worker threads abort the process.
            gc.collect()
            dist.destroy_process_group()


def _share_cpu_threads(ranks: Ranks) -> None:
    """Split the node's cores between its ranks (unless OMP_NUM_THREADS says otherwise): N processes
    with a full-size thread pool each oversubscribe the CPU and slow every rank's kernel launches."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // local_world))


def visible_gpus() -> int:
    """The CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_gpus(n: int) -> None:
    """Raise, saying what to change, unless this process sees at least `n` CUDA devices."""
    visible = visible_gpus()
    if visible < n:
        raise RuntimeError(
            f"this cell needs {n} GPU(s) but this process sees {visible}: run it where {n} GPUs are "
            "visible (hydra/launcher=slurm requests them), or set gpus=0 for CPU"
        )


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    ranks = current()
    if not ranks.distributed:
        return [value]
    out: list = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out


def require_same_on_all_ranks(value: Any, what: str) -> None:
    """Raise on every rank if `value` differs between ranks (e.g. the model's identity)."""
    values = gather_to_all(value)
    if any(v != values[0] for v in values[1:]):
        raise RuntimeError(
            f"{what} differs between ranks: " + "; ".join(f"rank {i}: {v}" for i, v in enumerate(values))
        )


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the other ranks (e.g. rank 0 fills a cache the others read)."""
    ranks = current()
    if ranks.distributed and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.distributed and ranks.is_main:
        dist.barrier()


def tensors_fingerprint(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes and a strided sample of values)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name}:{weight_fingerprint(tensor)};".encode())
    return digest.hexdigest()[:24]


def shard(items: list, ranks: Ranks) -> list:
    """This rank's share of `items` (round robin, so shares differ in size by at most one)."""
    return items[ranks.rank :: ranks.world_size]


def unshard(shares: list) -> list:
    """Inverse of `shard` over the gathered shares of every rank: the items in their original order."""
    out = []
    for i in range(max((len(s) for s in shares), default=0)):
        out += [s[i] for s in shares if i < len(s)]
    return out


# -- starting ranks locally ------------------------------------------------------------------
def spawn_ranks(world_size: int, fn: Callable, *args: Any) -> None:
    """Run `fn(*args)` in `world_size` fresh processes that form one process group on this machine.

    Each child gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE; if any rank
    fails, the others are stopped and the error is raised here. `fn` must be importable (a module-level
    function), as the children are started with the spawn method.
    """
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }
    mp.start_processes(_rank_main, args=(env, fn, args), nprocs=world_size, join=True, start_method="spawn")


def _rank_main(rank: int, env: dict, fn: Callable, args: tuple) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    fn(*args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
