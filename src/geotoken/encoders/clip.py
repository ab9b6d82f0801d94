"""CLIP vision tower (the paper's setting is ViT-L/14) through Hugging Face `transformers`.

`clip` (the weights) is a local folder or a hub id; a full `CLIPModel` checkpoint works too (only the vision tower
and its projection are loaded). Preprocessing follows the folder's `preprocessor_config.json`
(resize, centre crop, mean/std), reimplemented with PIL/NumPy so torchvision is never needed.

The ViT-L/14 forward is most of a prediction's time on a CPU, so the tower runs with PyTorch's fused
attention (`attention="sdpa"`, the same features as the eager path to ~1e-7) and an inference
`precision` (`PRECISIONS`): fp32; bf16 autocast (pays only with AVX-512 BF16 / AMX or on GPUs); int8
dynamic quantisation of every Linear layer (CPU only: int8 weights, activations quantised per batch);
"auto" picks per machine (`resolve_precision`: bf16 where the CPU has bf16 units, else fp32). `geotoken bench predict --agreement` checks them
against fp32 eager on a fixed image set. A `runtime` (`RUNTIMES`) runs fp32 and int8 through ONNX Runtime
instead of torch (`geotoken.encoders.ort`); "auto" does so on a non-Intel CPU at fp32 when it is installed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.ao.quantization
from PIL import Image

from geotoken.encoders.base import ImageBackbone, cpu_has_bf16, resize_center_crop, to_tensor
from geotoken.encoders.ort import OnnxTower, files_key, resolve_runtime
from geotoken.errors import GeoTokenError
from geotoken.io import read_json

# OpenAI CLIP's constants, used when a folder has no preprocessor_config.json.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PAPER_MODEL = "openai/clip-vit-large-patch14"
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # inference precision of the vision tower
ATTENTIONS = ("sdpa", "eager")  # transformers' attention implementations the tower accepts


def resolve_precision(precision: str, device: torch.device | str = "cpu", runtime: str = "auto") -> str:
    """The precision to run: "auto" is bf16 on a CPU with bf16 units (AVX-512 BF16 / AMX), else fp32; fp32
    under an explicit `runtime` "onnx" (ONNX Runtime runs fp32 and int8; bf16 stays on torch).

    int8 is ~2.5x faster than fp32 in the ViT-L/14 forward on 2 cores and keeps cosine 0.9995, but "auto"
    does not choose it: on random weights it changed GeoCLIP's (near-tied) top-1 gallery coordinate on 3 of
    16 fixed images (`geotoken bench predict --agreement`, BENCHMARKS.md), so it stays an explicit choice."""
    if precision not in PRECISIONS:
        raise GeoTokenError(f"clip: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type != "cpu" or runtime == "onnx":
        return "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def quantize_int8(net: torch.nn.Module) -> torch.nn.Module:
    """Every nn.Linear of `net` as a dynamically quantised int8 Linear (weights int8 per tensor,
    activations quantised on the fly), through PyTorch's eager dynamic quantisation (CPU kernels)."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)


def _side(value: Any, field: str, source: str) -> tuple[int, int] | int:
    """HF size fields: an int, {"shortest_edge": n} (-> n) or {"height": h, "width": w} (-> (h, w))."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return int(value["height"]), int(value["width"])
    raise GeoTokenError(f"{source}: field {field!r} has unsupported value {value!r}")


def hf_file(model: str, filename: str) -> str | None:
    """Path of `filename` in a local folder or the HF cache (downloaded only if the hub is reachable)."""
    from transformers.utils import cached_file

    return cached_file(model, filename, _raise_exceptions_for_missing_entries=False)


def _snapshot(model: str) -> Path | None:
    """The local folder of a hub id's files (its HF cache snapshot), None where its config is not there."""
    config = hf_file(model, "config.json")
    return Path(config).parent if config else None


def tower_config(model: str, tower: str):
    """Config of one tower ("vision" or "text"); from a full CLIPModel folder, with its projection size.

    (`CLIP*ModelWithProjection.from_pretrained` on a full CLIP checkpoint would otherwise keep the
    tower config's default projection_dim and re-initialise a mis-shaped projection.)
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    if config.model_type == "clip":
        sub = getattr(config, f"{tower}_config")
        sub.projection_dim = config.projection_dim
        return sub
    if config.model_type != f"clip_{tower}_model":
        raise GeoTokenError(
            f"{model!r} is a {config.model_type!r} model, not a CLIP model with a {tower} tower"
        )
    return config


def check_loading(info: dict, what: str) -> None:
    """A tower with missing or re-initialised weights would embed silently and uselessly: refuse it."""
    bad = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if bad:
        raise GeoTokenError(f"{what}: weights missing or of the wrong shape: {bad[:5]}")


def load_tower(cls: Any, model: str, what: str, **options) -> torch.nn.Module:
    """`cls.from_pretrained(model, **options)`, checked by `check_loading`. transformers' own load report
    is silenced: from a full CLIP checkpoint it lists every weight of the other tower as UNEXPECTED
    (hundreds of lines for ViT-L/14 in every log), which is expected; what matters is checked here."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        net, info = cls.from_pretrained(model, output_loading_info=True, **options)
    except OSError as e:
        raise GeoTokenError(f"{what}: cannot load {model!r} (a folder or hub id): {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loading(info, f"{what}: {model!r}")
    return net


class CLIPBackbone(ImageBackbone):
    name = "clip"

    def __init__(
        self,
        clip: str = PAPER_MODEL,
        dtype: str = "float32",
        precision: str = "fp32",
        attention: str = "sdpa",
        runtime: str = "auto",
    ):
        """clip: the CLIP weights, a local folder or hub id; dtype: the weights' storage dtype; precision: how the forward runs (`PRECISIONS`; "auto" is
        resolved for the CPU here: a model moved to a GPU afterwards should be built with "fp32"/"bf16");
        attention: "sdpa" (fused) or "eager" (transformers' reference path, for agreement checks);
        runtime: what runs the tower (`RUNTIMES`): "torch", "onnx" (ONNX Runtime on the CPU, fp32 or int8,
        exported once into the cache, `geotoken.encoders.ort`) or "auto" (onnx on a non-Intel CPU at fp32
        when onnxruntime and onnx are installed, else torch; `resolve_runtime`). The resolved one is `self.runtime`."""
        super().__init__()
        if dtype not in ("float32", "float16", "bfloat16"):
            raise GeoTokenError(f"clip: dtype must be float32, float16 or bfloat16, got {dtype!r}")
        if attention not in ATTENTIONS:
            raise GeoTokenError(f"clip: attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        precision = resolve_precision(precision, runtime=runtime)
        if precision == "int8" and dtype != "float32":
            raise GeoTokenError(f"clip: precision int8 quantises float32 weights, not dtype {dtype!r}")
        self.clip = str(clip)
        try:
            self.tower_config = config = tower_config(self.clip, "vision")
            pre_path = hf_file(self.clip, "preprocessor_config.json")
        except GeoTokenError:
            raise
        except (OSError, ValueError) as e:  # ValueError: a folder whose config.json names no model type
            said = " ".join(str(e).split()).rstrip(".")  # transformers' message spans lines
            if not Path(self.clip).is_dir():  # a hub id: say how to do without the network
                said += "; without network, name a local CLIP folder (--clip / clip=)"
                offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
                said += (  # (offline already: the model is just not in the cache)
                    " or fetch it once where the Hub can be reached"
                    if offline
                    else ", or set HF_HUB_OFFLINE=1 to use the Hugging Face cache without asking the Hub"
                )
            raise GeoTokenError(f"clip: cannot load {self.clip!r} (a folder or hub id): {said}") from None
        self._load_options = {"dtype": getattr(torch, dtype), "attn_implementation": attention}
        self.runtime = resolve_runtime(runtime, precision, "cpu", dtype)
        self.runtime_asked = runtime
        self.precision, self.attention = precision, attention
        self.dtype_name = dtype
        self.dim = int(config.projection_dim)

        pre = read_json(pre_path) if pre_path else {}
        source = pre_path or self.clip
        native = int(config.image_size)
        size = _side(pre.get("size", native), "size", source) if pre.get("do_resize", True) else None
        crop = (
            _side(pre.get("crop_size", native), "crop_size", source)
            if pre.get("do_center_crop", True)
            else None
        )
        crop = crop or size or native  # batches need one shape: without a crop, a square of the resize side
        self.crop = (crop, crop) if isinstance(crop, int) else crop  # (height, width)
        self.resize = size  # int: shorter side; (h, w): exact size; None: keep
        self.resample = int(pre.get("resample", Image.BICUBIC))
        self.image_size = self.crop[0]
        self.mean = tuple(pre.get("image_mean", OPENAI_MEAN))
        self.std = tuple(pre.get("image_std", OPENAI_STD))
        # onnx: an ONNX Runtime session over the exported tower, keyed by the weight files, so a cached
        # graph loads without the torch tower (~4 s of start-up and the weights' memory again for ViT-L);
        # `torch_tower()` builds it only where it runs (a move off the CPU under runtime "auto")
        self.net = None
        self.onnx = None
        if self.runtime == "onnx":
            folder = Path(self.clip) if Path(self.clip).is_dir() else _snapshot(self.clip)
            weights = files_key(folder, dtype=dtype, attention=attention) if folder is not None else None
            label = f"clip {self.clip!r}"
            self.onnx = OnnxTower(self._load_tower, self.crop, precision, label=label, weights=weights)
        else:
            net = self._load_tower()
            self.net = quantize_int8(net) if precision == "int8" else net
        self.requires_grad_(False)

    def _load_tower(self) -> torch.nn.Module:
        from transformers import CLIPVisionModelWithProjection

        net = load_tower(
            CLIPVisionModelWithProjection, self.clip, "clip vision tower",
            config=self.tower_config, **self._load_options,
        )  # fmt: skip
        return net.eval().requires_grad_(False)

    def torch_tower(self) -> torch.nn.Module:
        """The transformers tower (int8-quantised under torch int8). Under runtime onnx it is built here,
        on first use, from `clip` (the ONNX session does not need it)."""
        if self.net is None:
            self.net = self._load_tower()
        return self.net

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        if isinstance(self.resize, tuple):  # fixed (h, w) resize, then crop
            image = image.convert("RGB").resize(self.resize[::-1], resample=self.resample)
            image = resize_center_crop(image, min(image.size), self.crop, self.resample)
        else:
            image = resize_center_crop(image, self.resize or min(image.size), self.crop, self.resample)
        return to_tensor(image, self.mean, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W) -> projected image embedding (B, projection_dim), not normalised
        if self.onnx is not None and (x.device.type == "cpu" or self.runtime_asked == "onnx"):
            return self.onnx.run(x)  # (a tower moved off the CPU under runtime "auto" runs on torch)
        if self.precision == "int8" and x.device.type != "cpu":
            raise GeoTokenError(f"clip: precision int8 runs on the CPU only, not on {x.device}")
        net = self.torch_tower()
        if next(net.parameters()).device != x.device:  # a tower built here for a batch off the CPU
            net.to(x.device)
        if self.precision != "bf16":
            return net(pixel_values=x).image_embeds
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return net(pixel_values=x).image_embeds.float()

    def config(self) -> dict[str, Any]:
        # precision, attention and runtime are choices of the machine, not part of what the features are
        return {"name": self.name, "clip": self.clip, "dtype": self.dtype_name}
