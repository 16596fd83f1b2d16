"""Several processes (torchrun / accelerate launch): one Accelerate state for precompute and train alike."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .errors import PipelineError, first_line


PREPARE_TIMEOUT = timedelta(hours=6)


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state(cpu: bool) -> PartialState:
    """The process group of a torchrun/accelerate launch (or a single process). On a machine without CUDA,
    Accelerate only picks its gloo CPU backend when told cpu=True; otherwise every process would run alone."""
    multi_cpu = launched_processes() > 1 and not torch.cuda.is_available()
    # the other processes wait in a collective while the main one prepares a precompute (loading, tokenising and
    # laying out millions of examples can outlast the default 30-minute timeout)
    return PartialState(cpu=cpu or multi_cpu, timeout=PREPARE_TIMEOUT)


def share(state: PartialState, obj=None):
    """The main process's `obj`, on every process (a no-op for one process)."""
    box = [obj]
    if state.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


def lost_a_process(e: BaseException) -> bool:
    """A collective broken by a process that is gone (a killed node, a lost machine): torch's distributed errors,
    or the transport errors gloo and NCCL raise as plain RuntimeErrors (during backward's all-reduce)."""
    return isinstance(e, torch.distributed.DistError) or any(
        w in str(e) for w in ("gloo", "NCCL", "Connection reset", "Connection closed"))


def lost_process_error(command: str, e: BaseException, then: str) -> PipelineError:
    """What the surviving processes say instead of the backend's traceback: what broke, then where the work is and
    how to resume (`then`)."""
    return PipelineError(f"another process of this {command} stopped before the end ({first_line(e)[:160]}). {then}")
