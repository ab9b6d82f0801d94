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


_FAULTS = """
import resource, sys, torch
from geotoken.devices import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(4 << 20).fill_(1.0)  # 16 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()  # the heap grows once
print(applied, faults())
"""


def test_retain_freed_memory_stops_page_faults_on_reused_blocks(monkeypatch):
    """Freeing and re-allocating 16 MB blocks faults their pages in every time by default (each is a fresh
    mapping, ~4,100 faults), and not at all once it has run (glibc on Linux); GEOTOKEN_MALLOC=default
    opts out."""
    import subprocess
    import sys

    from geotoken.devices import retain_freed_memory

    monkeypatch.setenv("GEOTOKEN_MALLOC", "default")
    assert retain_freed_memory() is False
    if not sys.platform.startswith("linux"):
        return
    monkeypatch.delenv("GEOTOKEN_MALLOC")
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        for mode in ("default", "retain")
    }
    assert runs["retain"][0] == "True" and runs["default"][0] == "False"
    assert int(runs["default"][1]) >= 4000  # at least one block's pages faulted in again
    assert int(runs["retain"][1]) < 100
