"""Where this process computes: the one place that picks a torch device and joins a torchrun job.

Under torchrun every process sees every GPU; a bare "cuda" would put them all on GPU 0. So the device
is chosen here, from LOCAL_RANK, and nowhere else: `resolve_device("auto")` is `cuda:LOCAL_RANK` (plain
`cuda` outside torchrun), then Apple's `mps`, then `cpu`; `distributed()` joins the process group that
torchrun describes (NCCL on GPUs, gloo on CPUs) and pins the process to its GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from geotoken.errors import GeoTokenError


def local_rank() -> int:
    """This process's index among the processes of its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems


def retain_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks up to 32 MB in the heap instead of unmapping them.

    A training step allocates and frees its activations (a GB at `paper` b16); by default each block over
    glibc's mmap threshold is a fresh mapping, so every step page-faults its activations in again: 100K
    faults and 15 % of a `paper` step on a 2-core VM, 7 % at `small` (`geotoken bench train`). Called by
    the training commands (a server should give memory back, so prediction leaves malloc alone).
    Linux/glibc only; GEOTOKEN_MALLOC=default skips it. Returns whether it was applied."""
    if not sys.platform.startswith("linux") or os.environ.get("GEOTOKEN_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    done = [
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
        mallopt(_M_TRIM_THRESHOLD, 1 << 30),  # give the heap's top back only beyond 1 GB free
        mallopt(_M_TOP_PAD, 64 << 20),  # and grow it 64 MB at a time
    ]
    return all(done)


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """ "auto" (or None): this rank's CUDA GPU if any, then Apple MPS, then CPU; anything else is checked
    and kept (an explicit "cuda:1" wins over LOCAL_RANK)."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            if "LOCAL_RANK" not in os.environ:
                return "cuda"
            return f"cuda:{local_rank() % max(1, torch.cuda.device_count())}"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise GeoTokenError(
            f"device {device!r}: not a torch device (auto, cpu, cuda, cuda:1, mps): {e}"
        ) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise GeoTokenError(f"device {device!r}: no CUDA GPU is usable here (use cpu or auto)")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise GeoTokenError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    mps = getattr(torch.backends, "mps", None)
    if chosen.type == "mps" and not (mps is not None and mps.is_available()):
        raise GeoTokenError(f"device {device!r}: Apple MPS is not available here (use cpu or auto)")
    return str(chosen)


def torch_device(device: str | torch.device | None = "auto") -> torch.device:
    """`resolve_device` as a `torch.device` (what `.to()` and autocast take)."""
    return device if isinstance(device, torch.device) else torch.device(resolve_device(device))


@dataclass(frozen=True)
class Dist:
    """This process's place in a job: rank among `world` processes (0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def distributed() -> Dist:
    """Rank and world size: of the initialised process group, or of torchrun's environment (RANK,
    WORLD_SIZE), in which case the group is initialised here (NCCL on CUDA, else gloo) and, on CUDA, the
    process is pinned to GPU LOCAL_RANK first."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(torch.device(resolve_device("auto")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def on_cuda(device: str | torch.device) -> bool:
    """Whether `device` is a CUDA GPU (what autocast and pinned copies ask)."""
    return torch_device(device).type == "cuda"


def own_random_state(fn):
    """Run `fn` with torch's random generators forked: it seeds its own (from its config), and the caller's
    stream goes on afterwards as if `fn` had not run."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return run
