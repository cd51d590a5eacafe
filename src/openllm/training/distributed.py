"""torchrun support: process-group setup and the few collective helpers the trainer needs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from openllm.core.errors import OpenLLMError, first_line


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> DistInfo:
        """This process's place as torchrun's environment gives it."""
        env = os.environ
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "MASTER_ADDR" in os.environ and "RANK" in os.environ


def init_distributed(device_type: str, timeout: float = 1800.0, group_of_one: bool = False) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU), or with ``group_of_one``
    (--fsdp on one process under torchrun) a group of this process alone. A collective that waits longer than
    ``timeout`` seconds for the other processes fails (see :func:`lost_processes`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (group_of_one and launched_by_torchrun()):
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
        except (RuntimeError, dist.DistError) as exc:
            again = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
            hint = (
                "; torchrun's rendezvous store may hold the previous attempt's addresses: launch torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch/pytorch#135712)"
                if again and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"
                else ""
            )
            raise OpenLLMError(
                f"rank {info.rank}: could not join the other processes ({_first_line(exc)}){hint}"
            ) from None
        # a group of its own for roll calls (lost_processes): the training group is unusable after a timeout
        _roll_call[:] = [dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)), min(timeout, 10.0)]
    return info


_roll_call: list = []  # [gloo group, seconds to wait]


def _first_line(exc: BaseException) -> str:
    line = first_line(exc)
    return re.sub(r"^(\[[^\]]*\]:? )+", "", line)  # (gloo's source location, the rank torch names)


def failed_collective(exc: BaseException, info: DistInfo) -> bool:
    """Whether ``exc`` is a collective that failed: a peer that died (gloo: connection reset or closed), or one
    that did not answer within the timeout (gloo raises those as plain RuntimeErrors)."""
    if not info.enabled:
        return False
    return isinstance(exc, dist.DistError) or bool(
        re.search(r"gloo|nccl|Timed out waiting|Connection (reset|closed)", str(exc), re.IGNORECASE)
    )


def lost_processes(exc: BaseException, info: DistInfo) -> OpenLLMError:
    """The one-line error of a collective that failed: another process died or did not answer in time. Rank 0
    then calls the roll (a monitored barrier in a group of its own), which names the processes that do not
    answer."""
    silent = ""
    if dist.is_initialized() and _roll_call:
        group, seconds = _roll_call
        try:
            dist.monitored_barrier(group, timeout=timedelta(seconds=seconds), wait_all_ranks=True)
        except (RuntimeError, dist.DistError) as barrier_exc:
            silent = f"; {_first_line(barrier_exc)}"
    return OpenLLMError(f"rank {info.rank}: a collective with the other processes failed ({_first_line(exc)}){silent}")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across(info: DistInfo, value: torch.Tensor) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":
            value /= info.world_size
    return value


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (used for stop requests)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_value(info: DistInfo, value: float) -> float:
    """Rank 0's ``value`` on every rank (decisions every process must take alike, made on one figure)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return float(t.item())


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
