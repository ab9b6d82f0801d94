"""The CLIP vision tower through ONNX Runtime (CPUExecutionProvider): exported once, cached on disk.

On an AMD CPU without bf16 ONNX Runtime ran the ViT-L/14 forward ~2.3x faster than PyTorch eager at the
same fp32 features (cosine 1.0), and its dynamically quantised int8 copy ~6x. `RUNTIMES`: "torch", "onnx",
or "auto" (`resolve_runtime`: onnx on a non-Intel CPU at fp32 when `onnxruntime` and `onnx` are
installed; on Intel CPUs torch's MKL runs the fp32 tower as fast).

The graph (pixel_values (B, 3, H, W) -> image_embeds (B, projection_dim)) is exported with
`torch.onnx.export` into `<cache>/clip-onnx/<key>/` (`default_cache_dir`), the key being the identity of
the tower's weights, the image size, the precision and the torch/transformers/onnx/onnxruntime versions.
The weights' identity is that of the files they load from (`files_key`: an HF cache blob is named by its
SHA-256; other files are hashed once and remembered by path, size and mtime), so a cached graph loads
without building the torch tower at all; where the files are unknown it is `weights_sha256` of the tower.
Each entry is written into a temporary folder and renamed into place with a `manifest.json` last, so a
killed export is never reused; an entry that does not match its manifest or does not load is rebuilt.
Nothing is unpickled: the cache holds ONNX protobufs and JSON.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from geotoken.encoders.base import cpu_vendor, default_cache_dir
from geotoken.errors import GeoTokenError
from geotoken.io import read_json, sha256_file, sha256_json, write_json

RUNTIMES = ("auto", "torch", "onnx")  # what runs the CLIP vision tower
ONNX_PRECISIONS = ("fp32", "int8")  # precisions the onnx runtime has (bf16 stays on torch)
CACHE_FORMAT = "geotoken/clip-onnx/1"  # bump when the exported graph changes
OPSET = 17
INSTALL = "pip install 'geotoken[onnx]'"


def onnx_available() -> bool:
    """Whether `onnxruntime` (to run) and `onnx` (to export and quantise) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def resolve_runtime(
    runtime: str, precision: str, device: torch.device | str = "cpu", dtype: str = "float32"
) -> str:
    """The runtime to use for a resolved `precision`: "auto" is onnx on a CPU that is not Intel's, at fp32
    with float32 weights, when onnxruntime and onnx are installed; else torch. On Intel CPUs torch's fp32
    GEMMs (MKL) already run the tower as fast as ONNX Runtime's (614 ms a ViT-L/14 image both ways, box D in
    BENCHMARKS.md), so a one-off export and a second copy of the weights would buy nothing; on AMD they run
    at half its rate (2.0-2.1x end to end, box C). An explicit "onnx" that cannot run raises GeoTokenError."""
    if runtime not in RUNTIMES:
        raise GeoTokenError(f"clip: runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "auto":
        usable = on_cpu and precision == "fp32" and dtype == "float32" and cpu_vendor() != "GenuineIntel"
        return "onnx" if usable and onnx_available() else "torch"
    if runtime == "onnx":
        if precision not in ONNX_PRECISIONS:
            raise GeoTokenError(
                f"clip: runtime onnx runs precision {' or '.join(ONNX_PRECISIONS)}, not {precision!r} "
                "(bf16 runs on torch: --backbone-runtime torch)"
            )
        if dtype != "float32":
            raise GeoTokenError(f"clip: runtime onnx exports float32 weights, not dtype {dtype!r}")
        if not on_cpu:
            raise GeoTokenError(f"clip: runtime onnx runs on the CPU only, not on {device}")
        if not onnx_available():
            raise GeoTokenError(f"clip: runtime onnx needs onnxruntime and onnx: {INSTALL}")
    return runtime


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def weights_sha256(net: torch.nn.Module) -> str:
    """SHA-256 over the state dict: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.index.json")  # what `from_pretrained` reads weights from


def file_sha256(path: Path, known: dict) -> str:
    """SHA-256 of a file's bytes. An HF cache blob is named by it; another file is hashed once and its
    digest kept in `known` (path -> {size, mtime_ns, sha256}) against its real path, size and mtime."""
    real = Path(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    stat = real.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    entry = known.get(str(real))
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and "sha256" in entry:
        return entry["sha256"]
    known[str(real)] = {**stamp, "sha256": sha256_file(real, chunk=16 << 20)}
    return known[str(real)]["sha256"]


def files_key(folder: Path, memo: Path | None = None, **choices) -> str | None:
    """Identity of the weights a model folder holds (its weight files and config.json) with `choices`
    (dtype, attention): None when the folder has no weight file this can name (then hash the tower).
    memo: the JSON file where `file_sha256`'s digests are kept (default `<cache>/file-sha256.json`)."""
    files = sorted({p for pattern in (*WEIGHT_FILES, "config.json") for p in folder.glob(pattern)})
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        return None
    memo = memo or default_cache_dir() / "file-sha256.json"
    try:
        known = read_json(memo)
    except (OSError, ValueError):
        known = {}
    before = dict(known)
    try:
        digests = {p.name: file_sha256(p, known) for p in files}
    except OSError as e:  # a broken symlink (an interrupted download) or a file removed meanwhile
        what = f"model folder {folder}: cannot read weight file {e.filename or ''}"
        raise GeoTokenError(f"{what}: {e.strerror or e}") from e
    if known != before:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_json(memo, known)
        except OSError:  # a read-only cache: hash again next time
            pass
    return sha256_json({"files": digests, **choices})


def graph_key(weights: str, image_size: tuple[int, int], precision: str) -> str:
    """Identity of one cached graph: the weights, input size, precision and the exporting packages."""
    versions = {p: _version(p) for p in ("torch", "transformers", "onnx", "onnxruntime")}
    return sha256_json(
        {"format": CACHE_FORMAT, "weights_sha256": weights, "image_size": list(image_size),
         "precision": precision, "opset": OPSET, "versions": versions}
    )  # fmt: skip


class _Tower(torch.nn.Module):
    """pixel_values -> the projected embedding, exactly what `CLIPBackbone.forward` returns at fp32."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).image_embeds


def _files(folder: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = max(1, threads), 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export_fp32(net: torch.nn.Module, image_size: tuple[int, int], out: Path) -> None:
    x = torch.zeros(1, 3, *image_size)
    with warnings.catch_warnings(), torch.no_grad():  # the legacy exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Tower(net).eval(), (x,), str(out), dynamo=False, opset_version=OPSET,
            input_names=["pixel_values"], output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
        )  # fmt: skip


def _quantize_int8(source: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = sum(_files(source.parent).values()) > 1_800_000_000  # protobuf's 2 GB limit
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" warning on every call
    try:
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, use_external_data_format=large)
    finally:
        root.setLevel(level)


class OnnxTower:
    """An ONNX Runtime session over a cached export of a torch tower. `run(x)` takes and returns CPU float32
    tensors.

    `net` is the tower or a function that builds it; `weights` its identity (`files_key`; None:
    `weights_sha256` of the tower). A function is called only when there is no valid cached graph to load,
    and the tower is not kept. After construction `cache_status` is "loaded" (a valid cached graph),
    "exported" (none yet) or "re-exported" (the cached one was damaged or did not load); `path` is the .onnx
    file."""

    def __init__(
        self,
        net: torch.nn.Module | Callable[[], torch.nn.Module],
        image_size: tuple[int, int],
        precision: str = "fp32",
        cache_dir: str | os.PathLike | None = None,
        threads: int | None = None,
        label: str = "clip",
        weights: str | None = None,
    ):
        if precision not in ONNX_PRECISIONS:
            raise GeoTokenError(f"clip: runtime onnx runs precision {' or '.join(ONNX_PRECISIONS)}, not {precision!r}")  # fmt: skip
        self.precision, self.image_size, self.label = precision, tuple(image_size), label
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "clip-onnx"
        self.threads = threads or torch.get_num_threads()
        self._net = net
        self.weights = weights or weights_sha256(self._tower())
        self.session, self.path, self.cache_status = self._entry(precision)
        self._net = None  # the session holds the weights now

    def _tower(self) -> torch.nn.Module:
        if not isinstance(self._net, torch.nn.Module):
            self._net = self._net()
        return self._net

    def _entry(self, precision: str):
        key = graph_key(self.weights, self.image_size, precision)
        folder = self.root / key[:24]
        path = folder / "model.onnx"
        session = self._load(folder, key)
        if session is not None:
            return session, path, "loaded"
        status = "re-exported" if folder.exists() else "exported"
        source = self._entry("fp32")[1] if precision == "int8" else None  # int8 quantises the fp32 graph
        self._build(folder, key, precision, source)
        session = self._load(folder, key)
        if session is None:
            raise GeoTokenError(f"{self.label}: the ONNX export in {folder} does not load")
        return session, path, status

    def _load(self, folder: Path, key: str):
        try:
            manifest = read_json(folder / "manifest.json")
            if manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
                return None
            if manifest.get("files") != _files(folder):
                return None
            return _session(folder / "model.onnx", self.threads)
        except Exception:  # missing, truncated, not JSON, not a model ONNX Runtime can load: rebuild it
            return None

    def _build(self, folder: Path, key: str, precision: str, source: Path | None) -> None:
        what = (
            f"quantising the {self.label} ONNX graph to int8" if source else f"exporting {self.label} to ONNX"
        )
        print(f"geotoken: {what} (once; cached in {folder}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.root))
        try:
            if source is None:
                _export_fp32(self._tower(), self.image_size, tmp / "model.onnx")
            else:
                _quantize_int8(source, tmp / "model.onnx")
            tmp.chmod(0o755)  # (mkdtemp's folder is private; the cache is not)
            manifest = {"format": CACHE_FORMAT, "key": key, "weights": self.weights, "files": _files(tmp)}
            write_json(tmp / "manifest.json", manifest)
            if folder.exists():
                shutil.rmtree(folder)
            try:
                tmp.rename(folder)
            except OSError:  # another process put a whole entry there first: theirs is as good
                if self._load(folder, key) is None:
                    raise
        except Exception as e:
            if isinstance(e, OSError):
                raise GeoTokenError(f"{self.label}: cannot write the ONNX cache {folder}: {e}") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"geotoken: {what}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise GeoTokenError(f"{self.label}: runtime onnx runs on the CPU only, not on {x.device}")
        pixels = x.detach().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"pixel_values": pixels})[0])
