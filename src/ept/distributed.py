"""Data-parallel training on ``torch.distributed``: one process per rank, each taking its slice of
the global batch.

EP computes its gradient by hand, so DDP's autograd hooks never fire; instead the ranks agree by
explicit collectives, all through a :class:`Group`:

- every decision that changes the step (the free phase blew up, no sequence anywhere settled, a
  nudged retry, the drop of unsettled nudges, a rollback) is reduced across ranks, so all ranks
  take the same branch and no rank waits on a collective the others skipped;
- the gradient is the mean over the kept targets of the *whole* global batch: each rank's gradient
  (a mean over its own kept targets) is weighted by its share of them and the weighted gradients are
  summed in one flat bucket — not a mean of rank means;
- the stats a decision reads (the free residual's mean, the loss) are reduced the same way.

:data:`SINGLE` is the one-process group whose collectives are the identity, so the single-process
code path is the distributed one with N = 1 (and bit-identical to the code before it existed).
Under ``torchrun`` :func:`init_from_env` returns a :class:`TorchGroup` (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

# A peer that died leaves the others blocked in a collective until this many seconds pass.
DEFAULT_TIMEOUT_S = 120.0


class ParallelConfigError(ValueError):
    """A setting data parallelism cannot run (printed as one line, exit 2)."""


class PeerLost(RuntimeError):
    """Another rank stopped (died, or raised) while this one waited on a collective."""


class Group:
    """The single-process group: rank 0 of 1, every collective the identity."""

    rank = 0
    world = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank."""
        return bool(flag)

    def sum(self, values: Iterable[float]) -> list[float]:
        """Elementwise sum over ranks (float64)."""
        return [float(v) for v in values]

    def max(self, values: Iterable[float]) -> list[float]:
        """Elementwise max over ranks (float64)."""
        return [float(v) for v in values]

    def sum_tensor_(self, t: Tensor) -> Tensor:
        """In-place sum over ranks of one flat tensor."""
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (equal shapes), concatenated along dim 0 in rank order."""
        return t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable value: an error message, a float)."""
        return obj

    def barrier(self) -> None:
        return None

    def close(self) -> None:
        return None


SINGLE = Group()


class TorchGroup(Group):
    """A ``torch.distributed`` process group (initialised from torchrun's environment)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # gloo reduces CPU tensors; NCCL needs them on the rank's GPU.
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _reduce(self, values: Iterable[float], op: Any) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._call(self.dist.all_reduce, t, op=op)
        return t.tolist()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # gloo/NCCL: a peer closed its connection or timed out
            raise PeerLost(f"rank {self.rank}: a peer rank stopped during a collective "
                           f"({str(e).splitlines()[0][:160]})") from None

    def any(self, flag: bool) -> bool:
        return self._reduce([1.0 if flag else 0.0], self.dist.ReduceOp.MAX)[0] > 0

    def sum(self, values: Iterable[float]) -> list[float]:
        return self._reduce(values, self.dist.ReduceOp.SUM)

    def max(self, values: Iterable[float]) -> list[float]:
        return self._reduce(values, self.dist.ReduceOp.MAX)

    def sum_tensor_(self, t: Tensor) -> Tensor:
        moved = t.to(self.device)
        self._call(self.dist.all_reduce, moved, op=self.dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved)
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        moved = t.contiguous().to(self.device)
        parts = [torch.empty_like(moved) for _ in range(self.world)]
        self._call(self.dist.all_gather, parts, moved)
        return torch.cat(parts).to(t.device)

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._call(self.dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        self._call(self.dist.barrier)

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device = "cpu", timeout_s: float | None = None) -> Group:
    """The group torchrun's environment describes (:data:`SINGLE` outside torchrun).

    ``EPT_DIST_TIMEOUT`` (seconds) bounds how long a rank waits on a dead peer.
    """
    if not launched():
        return SINGLE
    import torch.distributed as dist

    device = torch.device(device)
    if not dist.is_initialized():
        timeout = timeout_s or float(os.environ.get("EPT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return TorchGroup(device)


def shard(rows: int, group: Group) -> slice:
    """This rank's rows of a global batch of ``rows`` sequences (the same sequences whatever N)."""
    if rows % group.world:
        raise ParallelConfigError(f"--B {rows} is not divisible by the {group.world} ranks: give a batch "
                                  "size that is a multiple of --nproc_per_node")
    per = rows // group.world
    return slice(group.rank * per, (group.rank + 1) * per)


# How each per-step stat combines over ranks. Unlisted floats are means over the sequences (each
# rank's value weighted by its rows); bools are any-rank.
_MAX_KEYS = ("_fevals", "_max", "T2", "nudged_retry", "nudged_states", "eig_omega")
_SUM_KEYS = ("dropped_seqs", "_row_fevals", "kept_targets")
_TARGET_MEAN = ("loss",)


def _kind(key: str) -> str:
    if key in _TARGET_MEAN:
        return "targets"
    if key in _SUM_KEYS or key.endswith("_row_fevals") or key.startswith("dropped_seqs"):
        return "sum"
    if key in _MAX_KEYS or any(key.endswith(s) for s in _MAX_KEYS):
        return "max"
    return "rows"


def reduce_stats(stats: dict[str, Any], group: Group, rows: int, targets: int) -> dict[str, Any]:
    """The step's stats over the global batch: bools any-rank, counts summed, the worst of each
    ``*_max`` and F-eval count, the loss a mean over all targets, other floats a mean over rows.
    Identity on :data:`SINGLE`."""
    if group.world == 1:
        return stats
    flags = sorted(k for k, v in stats.items() if isinstance(v, bool))
    nums = sorted(k for k, v in stats.items() if type(v) in (int, float))
    kinds = {k: _kind(k) for k in nums}
    anys = group.max([1.0 if stats[k] else 0.0 for k in flags]) if flags else []
    w_rows, w_tgt = float(rows), float(targets)
    sums = group.sum([w_rows, w_tgt] + [
        stats[k] * (w_rows if kinds[k] == "rows" else w_tgt if kinds[k] == "targets" else 1.0)
        for k in nums if kinds[k] != "max"])
    maxes = group.max([stats[k] for k in nums if kinds[k] == "max"])
    out = dict(stats)
    out.update({k: a > 0 for k, a in zip(flags, anys, strict=True)})
    total_rows, total_tgt, rest = sums[0], sums[1], iter(sums[2:])
    it_max = iter(maxes)
    for k in nums:
        kind = kinds[k]
        if kind == "max":
            v = next(it_max)
        else:
            s = next(rest)
            v = s / total_rows if kind == "rows" else s / total_tgt if kind == "targets" and total_tgt else s
        out[k] = int(v) if isinstance(stats[k], int) and kind in ("sum", "max") else v
    return out


def all_reduce_grads(grads: dict[str, Tensor], group: Group) -> dict[str, Tensor]:
    """Σ_r g_r over ranks, in one flat bucket (each rank's ``grads`` already weighted by its share).
    Identity on :data:`SINGLE`."""
    if group.world == 1:
        return grads
    names = list(grads)
    flat = torch.cat([grads[n].reshape(-1) for n in names])
    group.sum_tensor_(flat)
    out, at = {}, 0
    for n in names:
        g = grads[n]
        out[n] = flat[at:at + g.numel()].view_as(g)
        at += g.numel()
    return out
