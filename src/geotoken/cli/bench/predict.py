"""`geotoken bench predict`: images/s of the whole prediction path at real size, beside GeoCLIP's own predict.

`--model geotoken` (default): the paper-sized GeoToken path (random CLIP ViT-L/14 from its config, heads,
100K-row gallery, `paper` preset at k 15) per backbone precision, decoder and batch size, with the time
per stage; `--model geoclip`: GeoCLIP through geotoken. Both beside the geoclip package's `GeoCLIP.predict`
on the same weights and images, in the same run. Bodies: `geotoken.bench.predict`, `geotoken.bench.geoclip`.
"""

from __future__ import annotations

import json

from geotoken.bench.geoclip import bench_predict_geoclip
from geotoken.bench.predict import DECODERS, GALLERY_ROWS, MIN_COSINE, MIN_TOP1, STAGES, bench_predict
from geotoken.cli import THREADS_HELP, count
from geotoken.encoders.clip import PRECISIONS
from geotoken.encoders.ort import RUNTIMES
from geotoken.predict import BUILTIN_MODELS

MODELS = ("geotoken", *BUILTIN_MODELS)
BIG_INDEX_ROWS = 4_700_000  # MP16's gallery
AGREEMENT_IMAGES = 32


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="images/s of predict at real size (random CLIP ViT-L/14 from its config), beside GeoCLIP's own",
        description="Images/s and p50/p95 latency of the whole prediction path at the paper's size on random "
        "weights (nothing is downloaded), per stage, next to the geoclip package's own `GeoCLIP.predict` (which "
        "re-encodes its 100K-coordinate gallery for every image) on the same CLIP ViT-L/14 weights, images and "
        "threads, in the same run. --model geoclip: GeoCLIP through geotoken instead (same top-1 required).",
    )
    p.add_argument("--model", choices=MODELS, default="geotoken", help="path to time (default geotoken)")
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 16], help="our batch sizes (default 1 16)"
    )
    p.add_argument("--images", type=int, default=16, help="images timed on our path (default 16)")
    p.add_argument(
        "--reference-images",
        type=int,
        help="images timed on GeoCLIP's path (default 1 for geotoken, 2 for geoclip; ~30 s each)",
    )
    p.add_argument(
        "--backbone-precisions",
        nargs="+",
        choices=PRECISIONS,
        default=["fp32", "auto"],
        help="geotoken: CLIP precisions to time (default fp32 auto)",
    )
    p.add_argument(
        "--backbone-runtimes",
        nargs="+",
        choices=RUNTIMES,
        default=["torch", "auto"],
        help="geotoken: CLIP runtimes to time each precision on (default torch auto: fp32 eager torch beside "
        "what auto picks here); rows are precision/runtime, one per distinct resolved pair",
    )
    p.add_argument(
        "--decoders", nargs="+", choices=tuple(DECODERS), default=list(DECODERS), help="geotoken: decoders"
    )
    p.add_argument(
        "--gallery-rows",
        type=int,
        default=GALLERY_ROWS,
        help=f"geotoken: gallery rows (default {GALLERY_ROWS:,})",
    )
    p.add_argument(
        "--index-rows",
        type=int,
        nargs="?",
        const=BIG_INDEX_ROWS,
        default=0,
        help=f"geotoken: also time an IVF-PQ index of this many random rows (default {BIG_INDEX_ROWS:,} when "
        "given without a value; built once, cached by its parameters under the cache folder)",
    )
    p.add_argument(
        "--agreement",
        type=int,
        nargs="?",
        const=AGREEMENT_IMAGES,
        default=0,
        help=f"geotoken: check every precision against fp32 eager on this many fixed images (default "
        f"{AGREEMENT_IMAGES} when given without a value): feature cosine >= {MIN_COSINE}, top-1 GeoCLIP "
        f"coordinate and GeoToken greedy cell agreement >= {MIN_TOP1:.0%}%",  # %% for argparse
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="geotoken: interleaved timing rounds, the fastest kept (default 1)",
    )
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _print_geotoken(res: dict) -> None:
    print(
        f"predict benchmark: paper preset, k {res['k']}, {res['gallery_rows']:,}-row gallery, "
        f"{res['threads']} threads, CPU bf16 units: {res['cpu_has_bf16']} (images/s; p50/p95 ms per call)"
    )
    geoclip = res["geoclip_predict"]["images_per_s"]
    print(f"  GeoCLIP's own predict: {geoclip:.4f} images/s ({1 / geoclip:.1f} s per image)")
    for variant, why in res.get("skipped_variants", {}).items():
        print(f"  (backbone {variant} left out: {why})")
    for precision, by in res["ours"].items():
        resolved = res["variants"][precision]
        print(f"  backbone {precision} ({resolved['precision']}/{resolved['runtime']}):")
        for decoder, per in by.items():
            for b, v in per.items():
                speed = res.get("speedup_vs_fp32", {}).get(precision, {}).get(decoder, {}).get(b)
                line = (f"    {decoder:<9} batch {b:>3}: {v['images_per_s']:8.3f}  p50 {v['p50_ms']:9.1f}  "
                        f"p95 {v['p95_ms']:9.1f}  x{res['ratio_vs_geoclip'][precision][decoder][b]:.1f} GeoCLIP")  # fmt: skip
                if speed is not None and precision != "fp32/torch":
                    line += f"  x{speed:.2f} fp32/torch"
                print(line)
                total = sum(v["stages_ms"].values()) or 1.0
                split = ", ".join(
                    f"{s} {v['stages_ms'][s]:.0f} ({v['stages_ms'][s] / total:.0%})" for s in STAGES
                )
                print(f"      ms per image: {split}")
    if "big_index" in res:
        big = res["big_index"]
        print(f"  IVF-PQ over {big['rows']:,} rows ({big['cache']}): {big['search_ms_per_image']:.2f} ms per image, "
              f"{big['reranked_search_ms_per_image']:.2f} re-ranking {big['refine']} x k by exact vectors "
              f"(flat {res['gallery_rows']:,}: {big['flat_search_ms_per_image']:.2f})")  # fmt: skip
    bc = res.get("backbone_compute")
    if bc:
        print(f"  backbone: {bc['gflop_per_image']:.1f} GFLOP per image; torch fp32 matmul {bc['fp32_matmul_gflops']:.0f} "
              f"GFLOP/s here; achieved ({bc['decoder']}, batch {bc['batch']}):")  # fmt: skip
        for variant, row in bc["variants"].items():
            print(f"    {variant:<12} {row['backbone_ms_per_image']:8.0f} ms per image  {row['gflops']:6.0f} GFLOP/s  "
                  f"({row['share_of_fp32_matmul']:.0%} of the fp32 matmul rate)")  # fmt: skip
    for precision, row in res.get("agreement", {}).items():
        agree = ", ".join(f"{k} {v:.1%}" for k, v in row.items() if k.endswith("agreement"))
        print(f"  agreement {precision} ({row['resolved']}/{row['runtime']}) vs fp32 eager torch: cosine min {row['cosine_min']:.5f}, "
              f"{agree}: {'passes' if row['passes'] else 'FAILS'}")  # fmt: skip


def run(args) -> int:
    if args.model == "geoclip":
        result = bench_predict_geoclip(
            tuple(args.batch_sizes),
            args.threads,
            args.images,
            2 if args.reference_images is None else args.reference_images,
            seed=args.seed,
        )
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    result = bench_predict(
        tuple(args.batch_sizes),
        args.threads,
        args.images,
        1 if args.reference_images is None else args.reference_images,
        precisions=tuple(args.backbone_precisions),
        runtimes=tuple(args.backbone_runtimes),
        decoders=tuple(args.decoders),
        gallery_rows=args.gallery_rows,
        index_rows=args.index_rows,
        agreement=args.agreement,
        rounds=args.rounds,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result))
    else:
        _print_geotoken(result)
    return 0
