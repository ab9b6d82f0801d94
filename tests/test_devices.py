"""The torch device is chosen in one place (geotoken.devices), per torchrun rank."""

import ast
from pathlib import Path

import pytest
import torch

import geotoken
from geotoken.devices import Dist, distributed, on_cuda, resolve_device, torch_device
from geotoken.errors import GeoTokenError


def test_auto_is_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device() == resolve_device(None) == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == "cuda:3"
    monkeypatch.setenv("LOCAL_RANK", "5")  # more processes than GPUs on the machine: wrap around
    assert resolve_device("auto") == "cuda:1"
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cpu") == "cpu"  # explicit wins
    assert torch_device("auto") == torch.device("cuda:1") and on_cuda("auto")


def test_cpu_box_and_bad_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") in ("cpu", "mps") and not on_cuda("cpu")
    with pytest.raises(GeoTokenError, match="gpu0"):
        resolve_device("gpu0")
    with pytest.raises(GeoTokenError, match="no CUDA GPU is usable here"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(GeoTokenError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(GeoTokenError, match="MPS is not available"):
        resolve_device("mps")


def test_outside_torchrun_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed()
    assert d == Dist(0, 1) and d.main
    d.barrier()  # a no-op for one process


def test_no_device_string_outside_geotoken_devices():
    """A "cuda" literal elsewhere would be a second place choosing a device (all ranks on GPU 0)."""
    root = Path(geotoken.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if path.name == "devices.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value == "cuda" or node.value.startswith("cuda:"):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found


_MAPPED = """
import ctypes, sys, torch
from geotoken.devices import retain_freed_memory
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
before = libc.mallinfo2().hblkhd  # bytes in blocks malloc mapped on their own
block = torch.empty(30 << 18)  # 30 MB
print(applied, (libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.slow  # a subprocess allocating and freeing ~1 GB, 3-8 s
def test_retain_freed_memory_serves_large_blocks_from_the_heap(monkeypatch):
    """By default glibc maps a fresh 30 MB block on its own (so each one freed and allocated again is
    faulted in anew); once it has run, the block comes from the heap, which keeps freed memory.
    GEOTOKEN_MALLOC=default opts out."""
    import ctypes
    import subprocess
    import sys

    from geotoken.devices import retain_freed_memory

    monkeypatch.setenv("GEOTOKEN_MALLOC", "default")
    assert retain_freed_memory() is False
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc >= 2.33 only (mallinfo2)")
    monkeypatch.delenv("GEOTOKEN_MALLOC")
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", _MAPPED, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        for mode in ("default", "retain")
    }
    assert runs == {"default": ["False", "30"], "retain": ["True", "0"]}
