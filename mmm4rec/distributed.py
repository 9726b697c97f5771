"""torch.distributed support for training and evaluation (torchrun, DDP; nccl on CUDA, gloo on CPU).

How a run is split over R ranks (the same numbers as one process with the same global batch):
    every rank draws the SAME shuffled global batch (seed, epoch) and keeps its contiguous slice of it
    (`shard_slice`); the local loss is rescaled by  R * n_local / n_global  so that DDP's gradient average equals the
    gradient of the global-batch mean; evaluation splits the samples into contiguous shards and all-reduces the metric
    counts (`all_reduce_accumulator`: integer rank histograms, so the metrics are exactly the single-process ones).  Rank 0 alone writes checkpoints, logs, plots and progress bars.

    ctx = init_distributed("auto")     # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun; no-op otherwise
    ctx.is_main, ctx.rank, ctx.world_size, ctx.device

In-batch (pre-training) negatives across ranks: `gather_with_grad(t)` concatenates every rank's [b_r, ...] rows in
rank order with gradients flowing back to the rank that produced them (torch.distributed.nn.functional.all_gather).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple  # noqa: F401

import numpy as np
import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.  world_size 1 = plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: Optional[str] = None, *, timeout_s: int = 600) -> DistContext:
    """Initialise the process group from the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) and pick this rank's device.

    device: None/'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu; 'cpu' forces gloo; 'cuda' needs CUDA.
    Without WORLD_SIZE > 1 (and no group already initialised) this is a no-op returning a single-process context."""
    from datetime import timedelta

    want_cuda = device in (None, "auto") and torch.cuda.is_available() or (device or "").startswith("cuda")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device(f"cuda:{local}") if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistContext(rank, world, local, dev, initialised_here=False)
    if not launched_by_torchrun():
        if device in (None, "auto"):
            return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return DistContext(device=torch.device(device))
    missing = [v for v in ENV_VARS + ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this node")
    local = int(os.environ["LOCAL_RANK"])
    if want_cuda:
        torch.cuda.set_device(local)
        dev, backend = torch.device(f"cuda:{local}"), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, initialised_here=True)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if this context created it."""
    if ctx.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def shard_slice(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous [lo, hi) of n items for `rank`: the first n % world_size ranks get one extra item."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_batch(batch: Dict[str, torch.Tensor], ctx: DistContext) -> Tuple[Dict[str, torch.Tensor], float]:
    """This rank's rows of a global batch and the loss weight  R * n_local / n_global  that makes DDP's gradient
    average equal the global-batch mean (0 rows -> weight 0: the rank still joins the all-reduce)."""
    n = len(next(iter(batch.values())))
    if not ctx.distributed:
        return batch, 1.0
    lo, hi = shard_slice(n, ctx.rank, ctx.world_size)
    return {k: v[lo:hi] for k, v in batch.items()}, ctx.world_size * (hi - lo) / max(n, 1)


def all_reduce_accumulator(acc, ctx: DistContext):
    """Sum a RankingAccumulator's integer rank counts and sample count over ranks, in place (exact: the merged
    accumulator gives the single-process metrics bit for bit).  Every rank must call this, also one with no samples."""
    if not ctx.distributed:
        return acc
    top = max(acc.ks)
    counts = acc.rank_counts if acc.rank_counts is not None else torch.zeros(top, dtype=torch.int64)
    packed = torch.cat([counts.to(device=ctx.device, dtype=torch.int64),
                        torch.tensor([acc.count], dtype=torch.int64, device=ctx.device)])
    dist.all_reduce(packed)
    acc.rank_counts, acc.count = packed[:top], int(packed[top])
    return acc


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a tensor over ranks (a no-op in a single process)."""
    if not ctx.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / ctx.world_size


def gather_rows(t: torch.Tensor, ctx: DistContext) -> Tuple[torch.Tensor, int]:
    """[b_r, ...] on every rank -> ([sum_r b_r, ...] in rank order, rows before this rank).  No gradient."""
    if not ctx.distributed:
        return t, 0
    sizes = _all_sizes(t, ctx)
    top = max(sizes)
    padded = torch.cat([t, t.new_zeros(top - t.shape[0], *t.shape[1:])]) if t.shape[0] < top else t
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, sizes)]), sum(sizes[:ctx.rank])


def _all_sizes(t: torch.Tensor, ctx: DistContext):
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    """[top, ...] per rank -> [R, top, ...]; backward: sum the gathered gradient over ranks, keep this rank's block
    (every rank's loss may depend on every block)."""

    @staticmethod
    def forward(ctx, t, rank, world_size):
        ctx.rank = rank
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank], None, None


def gather_with_grad(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """[b_r, ...] on every rank -> [sum_r b_r, ...] in rank order; the gradient of each rank's block flows back to
    that rank, summed over every rank's use of it (all ranks must call this; row counts may differ)."""
    if not ctx.distributed:
        return t
    counts = _all_sizes(t, ctx)
    top = max(counts)
    padded = torch.cat([t, t.new_zeros(top - t.shape[0], *t.shape[1:])]) if t.shape[0] < top else t
    parts = _AllGatherWithGrad.apply(padded, ctx.rank, ctx.world_size)
    return torch.cat([parts[r, :c] for r, c in enumerate(counts)])


def data_fingerprint(data) -> str:
    """A short hash of what every rank must agree on: item count, split sizes and the train targets."""
    h = hashlib.sha1()
    h.update(f"{data.num_items}|{data.max_len}".encode())
    for split in ("train", "valid", "test"):
        s = data.split(split)
        h.update(f"{split}:{len(s['target'])}".encode())
        h.update(np.ascontiguousarray(s["target"][:100000]).tobytes())
    return h.hexdigest()[:16]


def check_same_data(data, ctx: DistContext) -> None:
    """Raise a one-line RuntimeError on every rank when ranks loaded different data (different files, max_len,
    filters)."""
    if not ctx.distributed:
        return
    mine = data_fingerprint(data)
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        raise RuntimeError(f"ranks disagree on the data (fingerprints by rank: {everyone}): every rank must load "
                           f"the same prepared dataset")


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's decision (e.g. stop early, time budget reached) on every rank."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=ctx.device)
    dist.broadcast(t, 0)
    return bool(int(t))


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def global_inbatch_pool(ctx: DistContext):
    """For MMM4Rec.loss(mode="inbatch", pool=...): the in-batch negative pool across ranks.  Returns a function
    (item_vectors [b, N], target_ids [b]) -> (all vectors [B, N] with gradients to their ranks, all ids [B], this
    rank's row offset in them)."""
    def pool(vectors, ids):
        all_vectors = gather_with_grad(vectors, ctx)
        all_ids, offset = gather_rows(ids, ctx)
        return all_vectors, all_ids, offset
    return pool
