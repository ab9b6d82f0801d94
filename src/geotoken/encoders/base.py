"""The image-backbone interface and shared PIL/NumPy preprocessing.

A backbone owns its preprocessing (resize, crop, normalise) so features are always computed the way
its weights expect; `config()` is enough to re-create it with `load_backbone(**config)` (`backbones`).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from geotoken.data.images import to_rgb


def clip_spelled(config: Any) -> Any:
    """A saved encoder config (a store's, heads' or bundle's backbone; a text encoder) as today's code spells
    it: CLIP's weights under `clip`, as `--clip` and `clip=` name them (configs written before say `model`)."""
    if (
        isinstance(config, dict)
        and config.get("name") == "clip"
        and "model" in config
        and "clip" not in config
    ):
        return {("clip" if k == "model" else k): v for k, v in config.items()}
    return config


class ImageBackbone(nn.Module):
    """A frozen image encoder: PIL image -> `preprocess` -> (3, H, W); batch (B, 3, H, W) -> `forward` -> (B, dim)."""

    name: str  # registry name, e.g. "efficientnet-lite0"
    dim: int  # output feature size
    image_size: int  # side of the square input after preprocessing
    mean: tuple[float, float, float]  # per-channel mean and std on the 0..1 scale
    std: tuple[float, float, float]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def preprocess_batch(self, images: list[Image.Image]) -> torch.Tensor:
        """`preprocess` of each image as RGB, stacked (B, 3, H, W): in threads for several images (PIL
        resizes without the GIL, and bicubic from a 12 MP photo takes ~0.1 s), the same tensor as one by one."""
        one = lambda im: self.preprocess(im if im.mode == "RGB" else im.convert("RGB"))  # noqa: E731
        if len(images) < 2:
            return torch.stack([one(im) for im in images])
        return torch.stack(list(_preprocess_pool().map(one, images)))

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """Convenience for a handful of images: preprocess, stack, forward. Batch jobs use `geotoken.features`."""
        x = self.preprocess_batch(images)  # (B, 3, H, W)
        param = next(self.parameters(), None)  # None: the weights live outside torch (ONNX Runtime, CPU fp32)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        return self(x).float()


@functools.cache
def _preprocess_pool() -> ThreadPoolExecutor:
    """One pool for the process's preprocessing: a thread per core, at most 8."""
    return ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="preprocess")


# a forked child (a DataLoader worker) has none of the parent's threads: it makes its own pool
os.register_at_fork(after_in_child=_preprocess_pool.cache_clear)


def default_cache_dir() -> Path:
    """`$GEOTOKEN_CACHE`, else `~/.cache/geotoken` (GeoCLIP's gallery embeddings, CLIP's ONNX graphs)."""
    return Path(os.environ.get("GEOTOKEN_CACHE") or Path.home() / ".cache" / "geotoken")


def _cpuinfo(field: str) -> str:
    """The value of /proc/cpuinfo's first `field` line (the first CPU's), "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return ""


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), "" where it cannot be read."""
    return _cpuinfo("vendor_id")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (AVX-512 BF16 or AMX-BF16), from /proc/cpuinfo's flags.

    Without them bf16 runs emulated, far slower than fp32. (`torch.backends.cpu.get_cpu_capability()`
    says only "AVX512" or "AVX2", which does not tell.) False where /proc/cpuinfo cannot be read.
    """
    return bool({"avx512_bf16", "amx_bf16"} & set(_cpuinfo("flags").split()))


def resize_center_crop(
    image: Image.Image, resize: int, crop: tuple[int, int], resample: int = Image.BICUBIC
) -> Image.Image:
    """RGB image whose shorter side is scaled to `resize`, centre-cropped to `crop` = (height, width).

    Same arithmetic as Hugging Face image processors (new long side = int(resize * long / short),
    crop offset = (size - crop) // 2), so CLIP features match theirs. EXIF rotation is applied first.
    Beyond `EXACT_ASPECT` (a 1 x 4000 strip would become 256 x 1,024,000 pixels) only the crop's source box
    is resampled, with the same filter positions; PIL rounds that path differently (on pixel noise, tall
    strips differ by 0.4 levels on average, up to ~20; wide ones match).
    """
    image = to_rgb(image)
    w, h = image.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    ch, cw = crop
    if max(new_w, new_h) > EXACT_ASPECT * max(resize, ch, cw):
        return _resize_crop_box(image, (new_w, new_h), crop, resample)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=resample)
    if ch > new_h or cw > new_w:  # pad like HF: the crop never fails on a small image
        canvas = Image.new("RGB", (max(cw, new_w), max(ch, new_h)))
        canvas.paste(image, ((canvas.width - new_w) // 2, (canvas.height - new_h) // 2))
        image, new_w, new_h = canvas, canvas.width, canvas.height
    top, left = (new_h - ch) // 2, (new_w - cw) // 2
    return image.crop((left, top, left + cw, top + ch))


EXACT_ASPECT = 4  # resized sides up to 4x the crop: resize the whole image, then crop (HF's exact pixels)


def _resize_crop_box(image: Image.Image, size: tuple[int, int], crop: tuple[int, int], resample: int):
    """`resize_center_crop` without the whole resized image: per axis, the crop's interval in source
    coordinates (or the whole axis, padded, where the crop is longer than the resized side)."""

    def axis(new: int, c: int, source: int) -> tuple[float, float, int, int]:  # box start, end, length, pad
        scale = source / new
        if c <= new:
            offset = (new - c) // 2
            return offset * scale, (offset + c) * scale, c, 0
        return 0.0, float(source), new, (c - new) // 2

    (x0, x1, ow, px), (y0, y1, oh, py) = (
        axis(size[0], crop[1], image.width),
        axis(size[1], crop[0], image.height),
    )
    out = image.resize((ow, oh), resample=resample, box=(x0, y0, x1, y1))
    if (ow, oh) != (crop[1], crop[0]):
        canvas = Image.new("RGB", (crop[1], crop[0]))
        canvas.paste(out, (px, py))
        out = canvas
    return out


def to_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 RGB image -> float32 (3, H, W), scaled to 0..1 then normalised per channel."""
    x = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)  # (H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
