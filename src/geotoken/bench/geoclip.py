"""Benchmark: GeoCLIP prediction through geotoken against the `geoclip` package's own `GeoCLIP.predict`.

Both run in the same process, on the same threads, images and weights: a randomly initialised CLIP ViT-L/14
built from its public configuration (nothing is downloaded) with GeoCLIP's shipped image head, temperature,
location encoder and 100K gallery. Ours encodes the gallery once (cached); GeoCLIP's `predict` takes one
image path per call and re-encodes the whole gallery on each.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geotoken import assets
from geotoken.encoders.clip import OPENAI_MEAN, OPENAI_STD
from geotoken.encoders.geoclip import GeoCLIPGeolocator
from geotoken.errors import GeoTokenError
from geotoken.pretrained import GeoCLIPPredictor

# openai/clip-vit-large-patch14's vision tower and preprocessing (its public config.json and
# preprocessor_config.json); GeoCLIP builds the same tower when it is not given pretrained CLIP weights.
VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
VIT_L14_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "resample": 3,
    "image_mean": list(OPENAI_MEAN),
    "image_std": list(OPENAI_STD),
}


def bench_images(n: int, seed: int = 0) -> list[Image.Image]:
    """The wheel's Kauai photo, then `n - 1` random RGB images of varied shapes (fixed by `seed`)."""
    with Image.open(assets.sample_image()) as im:
        images = [im.convert("RGB")]
    rng = np.random.default_rng(seed)
    while len(images) < n:
        h, w = int(rng.integers(160, 480)), int(rng.integers(160, 480))
        coarse = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)  # smooth blobs, not only noise
        noise = rng.integers(-20, 21, (h, w, 3))
        images.append(Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)))  # fmt: skip
    return images[:n]


def save_random_vit_l14(folder: Path, seed: int = 0):
    """A randomly initialised CLIP ViT-L/14 vision tower (with projection) saved to `folder` with
    openai/clip-vit-large-patch14's preprocessor: the real model's shape and loading path, nothing
    downloaded. Returns the model (eval mode)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L14)).eval()
    vision.save_pretrained(folder)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(VIT_L14_PREPROCESSOR))
    return vision


def geoclip_package_predict(vision, images: list[Image.Image], tmp: Path, k: int = 5) -> dict:
    """The `geoclip` package's own `GeoCLIP.predict` (its shipped heads and 100K gallery, `vision`'s CLIP
    weights), one lossless PNG path per call as it takes them: {seconds, gps [(k, 2)], prob [(k,)]}."""
    from geoclip import GeoCLIP

    theirs = GeoCLIP(clip_pretrained=False).eval()  # shipped heads; random ViT-L/14 replaced below
    clip = theirs.image_encoder.CLIP
    if clip.config.vision_config.hidden_act != VIT_L14["hidden_act"] or clip.config.vision_config.image_size != VIT_L14["image_size"]:  # fmt: skip
        raise GeoTokenError("bench: GeoCLIP's own CLIP ViT-L/14 configuration differs from ours")
    clip.vision_model.load_state_dict(vision.vision_model.state_dict(), strict=True)
    clip.visual_projection.load_state_dict(vision.visual_projection.state_dict(), strict=True)
    seconds, gps, prob = 0.0, [], []
    for i, image in enumerate(images):
        path = Path(tmp) / f"geoclip-image-{i}.png"
        image.save(path)  # lossless: GeoCLIP reads the same pixels
        start = time.perf_counter()
        g, p = theirs.predict(str(path), top_k=k)
        seconds += time.perf_counter() - start
        gps.append(g)
        prob.append(p)
    return {"seconds": seconds, "gps": gps, "prob": prob}


def bench_predict_geoclip(
    batch_sizes: tuple[int, ...] = (1, 16),
    threads: int = 2,
    images: int = 16,
    reference_images: int = 2,
    *,
    k: int = 5,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Images/s of `GeoCLIPGeolocator.predict_images` (arrays) and of the whole predictor a user calls
    (`GeoCLIPPredictor.predict`: `Prediction`s with place names and cells, `predictor`, `ratio_predictor`)
    per batch size, beside GeoCLIP's own `predict`, all fp32.

    `ratio[b]` = ours at batch b / GeoCLIP's; `top1_identical`: the same best coordinate on each of the
    first `reference_images` images (GeoCLIP's top-k are compared with ours on those images). The gallery
    cache goes to `cache_dir` (default: the usual cache folder); `ours_setup_s` includes encoding it if
    it was not cached yet (`cache_status`).
    """
    if images < 1 or not 1 <= reference_images <= images or not batch_sizes or min(batch_sizes) < 1:
        raise GeoTokenError(
            f"bench: need images >= 1, 1 <= reference_images <= images, batch sizes >= 1; got "
            f"images={images}, reference_images={reference_images}, batch_sizes={batch_sizes}"
        )
    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="geotoken-geoclip-bench-") as tmp:
            tmp = Path(tmp)
            vision = save_random_vit_l14(tmp / "clip", seed)
            start = time.perf_counter()
            ours = GeoCLIPGeolocator.load(tmp / "clip", cache_dir=cache_dir)
            setup_s = time.perf_counter() - start
            pics = bench_images(images, seed)
            ours.predict_images(pics[:1], k)  # warm-up
            per_batch = {}
            for batch_size in batch_sizes:
                start = time.perf_counter()
                top = ours.predict_images(pics, k, batch_size=batch_size)
                seconds = time.perf_counter() - start
                per_batch[str(batch_size)] = {"seconds": seconds, "images_per_s": images / seconds}
            # the whole predictor a user calls (Geolocator.from_pretrained("geoclip")): the same arrays plus
            # Prediction objects, place names and S2 cells; fp32 like the package
            predictor = GeoCLIPPredictor(ours, level=20)
            predictor.predict(pics[:1], top_k=k)  # warm-up
            per_batch_predictor = {}
            for batch_size in batch_sizes:
                start = time.perf_counter()
                answers = predictor.predict(pics, top_k=k, batch_size=batch_size)
                seconds = time.perf_counter() - start
                per_batch_predictor[str(batch_size)] = {"seconds": seconds, "images_per_s": images / seconds}
            predictor_top1 = [
                bool(
                    np.isclose(a.lat, float(top.latlon[i, 0, 0]))
                    and np.isclose(a.lon, float(top.latlon[i, 0, 1]))
                )
                for i, a in enumerate(answers)
            ]
            theirs = geoclip_package_predict(vision, pics[:reference_images], tmp, k)
            del vision
            ref_seconds = theirs["seconds"]
            same_top1 = [bool(torch.equal(g[0], top.latlon[i, 0])) for i, g in enumerate(theirs["gps"])]
            same_topk = [bool(torch.equal(g, top.latlon[i])) for i, g in enumerate(theirs["gps"])]
            prob_diff = max(float((p - top.prob[i]).abs().max()) for i, p in enumerate(theirs["prob"]))
    finally:
        torch.set_num_threads(previous_threads)

    ref_ips = reference_images / ref_seconds
    return {
        "threads": torch.get_num_threads() if threads <= 0 else threads,
        "images": images,
        "reference_images": reference_images,
        "k": k,
        "gallery_size": len(ours),
        "cache_status": ours.cache_status,
        "ours_setup_s": setup_s,
        "ours": per_batch,
        "geoclip": {"seconds": ref_seconds, "images_per_s": ref_ips, "seconds_per_image": 1 / ref_ips},
        "ratio": {b: v["images_per_s"] / ref_ips for b, v in per_batch.items()},
        "predictor": per_batch_predictor,
        "ratio_predictor": {b: v["images_per_s"] / ref_ips for b, v in per_batch_predictor.items()},
        "predictor_top1_identical": all(predictor_top1),
        "top1_identical": all(same_top1),
        "topk_identical": all(same_topk),
        "max_prob_diff": prob_diff,
    }
