"""Data-parallel training with ``torch.distributed`` (DDP), launched by ``torchrun``: the reusable layer.

Every training loop (ViLT/METER VQA in :mod:`apt_deploy.training`, CLIP in :mod:`apt_deploy.clip_training`)
uses the same pieces, and a new backbone's loop adopts them in a few lines (docs/distributed.md):

- :func:`distributed` — a context manager: reads torchrun's environment (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), joins the process group (NCCL on GPUs, gloo on CPUs)
  and leaves it. Without torchrun (or with one process) it is a no-op: one process, no process group.
- :class:`DistContext` — rank, world size, device; ``sum`` / ``mean`` all-reduce, ``gather_objects``.
- :func:`wrap_trainable` — DDP around the module whose forward the loss goes through; only the trainable
  tensors are broadcast and all-reduced (frozen weights and buffers are ignored: every rank loads them).
- :class:`ShardedBatches` — the resumable micro-batch stream of one rank: a ``DistributedSampler`` per
  epoch (order = f(seed, epoch), shard = f(rank)), skipped exactly on resume.
- :func:`shard_range`, :func:`main_progress`, :func:`quiet_other_ranks` — evaluation shards, rank-0-only
  progress bars and logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from apt_deploy.errors import ConfigError
from apt_deploy.progress import progress

log = logging.getLogger(__name__)
T = TypeVar("T")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands. The default is one process on the CPU without a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: no process group (one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64; the values themselves on one process)."""
        if not self.is_distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, value: float) -> float:
        return self.sum([value])[0] / self.world_size

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def distributed(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Join the process group torchrun describes (no-op for one process) and leave it on exit."""
    ctx = init_distributed(device, timeout_s)
    try:
        yield ctx
    finally:
        if ctx.is_distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """:class:`DistContext` from torchrun's environment; NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU."""
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local)
    if world <= 1:
        return DistContext(device=dev)
    import torch.distributed as dist

    rank = _env_int("RANK", 0)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)
    if ctx.is_main:
        log.info("process group: %d processes, backend %s; rank 0 on %s", world, backend, dev)
    return ctx


def resolve_device(device: str, local_rank: int = 0) -> str:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cuda`` without CUDA is an error."""
    if device not in DEVICES:
        raise ConfigError(f"--device {device}", f"one of {', '.join(DEVICES)}")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("--device cuda, but torch sees no CUDA device", "a machine with a CUDA GPU and a CUDA build "
                          "of torch", "pass --device cpu (gloo) or install the CUDA build of torch")
    if device == "cpu" or not has_cuda:
        return "cpu"
    return f"cuda:{local_rank}"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return default if raw is None else int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}", "an integer (torchrun sets it)",
                          "launch with torchrun or unset it") from None


def check_world_size(examples: int, ctx: DistContext, what: str = "the training data") -> None:
    """Refuse a world size larger than the data: some ranks would only see padding copies."""
    if examples < ctx.world_size:
        raise ConfigError(f"world size {ctx.world_size} (torchrun --nnodes x --nproc_per_node) but {what} has only "
                          f"{examples} examples", "at most one process per training example",
                          "launch fewer processes or use more data")


def wrap_trainable(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP around ``module`` (itself for one process). Frozen parameters and all buffers are ignored, so DDP
    broadcasts (from rank 0) and all-reduces only the trained tensors; every rank reads the frozen base itself."""
    if not ctx.is_distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
    device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    return DDP(module, device_ids=device_ids, forward_sync_buffers=False)


def sync_context(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for accumulation micro-batches that must not all-reduce yet; a no-op otherwise."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def shard_range(n: int, ctx: DistContext) -> range:
    """This rank's share of ``n`` evaluation examples (strided, no padding: every example counted once)."""
    return range(ctx.rank, n, ctx.world_size)


def main_progress(ctx: DistContext, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterable[T]:
    """A progress bar (or its log lines) on rank 0 only."""
    return progress(items, total=total, desc=desc) if ctx.is_main else items


def quiet_other_ranks(ctx: DistContext) -> None:
    """Ranks other than 0 log warnings and errors only (one set of logs and progress lines per run)."""
    if not ctx.is_main:
        logging.getLogger("apt_deploy").setLevel(logging.WARNING)


class ShardedBatches:
    """Endless micro-batches of this rank's shard, resumable exactly.

    Epoch ``e`` orders the data by ``DistributedSampler(seed=seed).set_epoch(e)`` (a permutation that is a
    function of seed and epoch only; rank r takes every world_size-th index from position r). An epoch
    yields ``len(shard) // batch_size`` micro-batches (the last partial one is dropped; a shard smaller
    than one batch yields it whole). ``consumed`` counts the micro-batches taken, so (epoch, position) =
    divmod(consumed, per_epoch) and a resumed stream skips indices without loading them.
    """

    def __init__(self, dataset: Any, batch_size: int, ctx: DistContext, seed: int,
                 collate_fn: Callable[[list[Any]], Any], shuffle: bool = True) -> None:
        from torch.utils.data import DistributedSampler

        if len(dataset) == 0:
            raise ConfigError("the training dataset is empty", "at least one example")
        check_world_size(len(dataset), ctx)
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                          seed=seed, drop_last=False)
        shard = len(self.sampler)
        self.drop_last = shard >= batch_size
        self.per_epoch = shard // batch_size if self.drop_last else 1
        self.consumed = 0

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        while True:
            epoch, position = divmod(self.consumed, self.per_epoch)
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[position * self.batch_size:]
            # own generator: creating a DataLoader iterator draws a seed, which must not move the global RNG (resume)
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, collate_fn=self.collate_fn,
                                drop_last=self.drop_last, generator=torch.Generator().manual_seed(epoch))
            for batch in loader:
                self.consumed += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, position = divmod(self.consumed, self.per_epoch)
        return {"consumed": self.consumed, "epoch": epoch, "position": position, "per_epoch": self.per_epoch,
                "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("dataset_size") != len(self.dataset) or state.get("per_epoch") != self.per_epoch:
            raise ConfigError(f"the resumed run saw {state.get('dataset_size')} training examples "
                              f"({state.get('per_epoch')} micro-batches per epoch per rank); this one has "
                              f"{len(self.dataset)} ({self.per_epoch})", "the same training data, batch size and "
                              "world size as the interrupted run",
                              "resume with the same --data, --batch-size and torchrun size")
        self.consumed = int(state["consumed"])
