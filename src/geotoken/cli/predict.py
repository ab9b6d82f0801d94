"""`geotoken predict PHOTO... --model MODEL [-o predictions.csv]`: where were these photos taken?

MODEL is a bundle folder, a Hugging Face Hub repo id holding one, or `geoclip` (GeoCLIP's pretrained
weights). A photo whose EXIF carries GPS shows it beside the prediction, with the distance."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from geotoken import DTYPES
from geotoken.cli import DEVICE_HELP, THREADS_HELP, add_mllm_arguments, count, mllm_changes, use_threads
from geotoken.data.images import list_images, split_ref
from geotoken.encoders.clip import PRECISIONS
from geotoken.encoders.ort import RUNTIMES
from geotoken.errors import GeoTokenError
from geotoken.io import check_outputs_spare_inputs
from geotoken.photos import PREDICTION_FORMATS, predict_photos, write_predictions
from geotoken.predict import Geolocator
from geotoken.search import LOGP_KINDS, SELECTORS, STRATEGIES
from geotoken.search.options import PAPER_TEMPERATURE, STRATEGY_OPTIONS, sampling_temperature, unused_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="geolocate photos with a trained model bundle",
        description="Geolocate photos: embed, retrieve neighbours, decode S2 tokens, select, and print the "
        "top-k candidates (lat, lon, calibrated probability, S2 cell, nearest place, per-level confidence). "
        "With -o FILE (.csv or .jsonl) every photo gets a row, kept in FILE.partial as batches finish and "
        "renamed to FILE at the end: killed, the same command goes on where it stopped. An unreadable file stops "
        "it (exit status 2, no FILE) unless --skip-bad. On the terminal, unreadable files get a one-line "
        "error and the others still run; the exit status is 1 if any failed (0 with --skip-bad).",
    )
    p.add_argument(
        "photos",
        nargs="+",
        metavar="PHOTO",
        help="image files (JPEG, PNG, ...), SHARD.tar#MEMBER, or folders (every image under them, recursively)",
    )
    p.add_argument(
        "-o",
        "--out",
        help="write one prediction per photo to this file instead of printing: .csv (the top candidate, "
        "EXIF GPS, error) or .jsonl (everything --json prints, one object a line), with a progress bar",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="record unreadable photos (reported on stderr, an error row in the output) and go on; without "
        "it, -o stops at the first one with an error naming it (rerun with --skip-bad to go on from there)",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="model bundle folder (has bundle.json), a Hugging Face Hub repo id (ORG/NAME) holding one, or "
        "geoclip (GeoCLIP's pretrained weights; the first run downloads CLIP ViT-L/14, about 1.7 GB)",
    )
    p.add_argument(
        "--clip",
        metavar="PATH_OR_ID",
        help="CLIP ViT-L/14 weights, a folder or hub id (default: openai/clip-vit-large-patch14 for geoclip, "
        "the bundle's own for a bundle)",
    )
    p.add_argument("--revision", help="branch, tag or commit of a Hugging Face Hub MODEL (default main)")
    p.add_argument(
        "--top-k",
        type=int,
        default=5,
        help="candidates per photo, up to (default 5; a search may find fewer, e.g. greedy finds one)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="decoding (default: the bundle's)",
    )
    p.add_argument("--select", choices=SELECTORS, help="selector (default: the bundle's)")
    p.add_argument("--beam-width", type=int, help="beam width (strategy beam)")
    p.add_argument("--num-samples", type=int, help="samples per photo (strategy sample)")
    p.add_argument(
        "--retrieved", type=int, help="neighbours' cells pooled with the samples (sample+retrieval)"
    )
    p.add_argument("--temperature", type=sampling_temperature, metavar="T",
                   help=f"sampling temperature, a number or 'paper' ({PAPER_TEMPERATURE}, the authors'; "
                   "default: the bundle's)")  # fmt: skip
    p.add_argument("--logp-kind", choices=LOGP_KINDS,
                   help="select logp by the model's own log-probability (t1) or the temperature-scaled one "
                   "of the samples (scaled, the authors'); default: the bundle's")  # fmt: skip
    p.add_argument("--radius-km", type=float, help="consensus radius, vote kernel width, in km")
    p.add_argument("--gate-p", type=float, metavar="P",
                   help="select gate: keep the model's own answer where P(its first --gate-tokens tokens) "
                   ">= P, else let the neighbours vote (default: the bundle's)")  # fmt: skip
    p.add_argument(
        "--gate-tokens", type=int, help="select gate: tokens of the region the model must be sure of"
    )
    p.add_argument(
        "--constrain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode only cells that occur in the gallery, or freely with --no-constrain (default: the bundle's)",
    )
    add_mllm_arguments(p)
    p.add_argument("--batch-size", type=int, default=16, help="photos per forward pass (default 16)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.add_argument(
        "--dtype", choices=DTYPES, help="model precision (bf16: ~2x faster on CPUs with bf16 units)"
    )
    add_backbone_precision(p)
    p.add_argument("--json", action="store_true", help="print one JSON array instead of text")
    p.set_defaults(func=run)


def _text(path: str, pred, gps: dict | None = None) -> str:
    lines = [f"{path}  ({pred.strategy}, {pred.select}{'; ' + pred.note if pred.note else ''})"]
    for i, c in enumerate(pred.candidates, 1):
        place = ", ".join(x for x in (c.place.get("city"), c.place.get("country")) if x)
        levels = " ".join(f"{v:.2f}" for v in c.level_confidence or [])
        p = f"p(<{c.probability_within_km:g} km)"
        lines.append(
            f"  {i}. {c.lat:9.5f} {c.lon:10.5f}  {p}={c.probability:.3f}  "
            f"cell {c.cell}  {place or '-'}" + (f"  levels {levels}" if levels else "")
        )
    if gps:
        lines.append(
            f"  EXIF GPS {gps['lat']:9.5f} {gps['lon']:10.5f}  {gps['distance_km']:.1f} km from the top candidate"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads)
    if args.out and Path(args.out).suffix.lower() not in PREDICTION_FORMATS:
        raise GeoTokenError(f"{args.out}: -o/--out must end in {' or '.join(PREDICTION_FORMATS)}")
    if args.out and args.json:
        raise GeoTokenError(
            f"{args.out}: --json prints to the terminal; with -o, name a .jsonl file for JSON"
        )
    check_outputs_spare_inputs(args.photos, args.out)
    photos = checked_photos(args.photos, stops_at_bad=bool(args.out) and not args.skip_bad)
    geo = Geolocator.from_pretrained(
        args.model,
        clip=args.clip,
        revision=args.revision,
        device=args.device,
        backbone_precision=args.backbone_precision,
        backbone_runtime=args.backbone_runtime,
    )
    options = {
        "beam_width": args.beam_width,
        "num_samples": args.num_samples,
        "retrieved": args.retrieved,
        "temperature": args.temperature,
        "logp_kind": args.logp_kind,
        "radius_km": args.radius_km,
        "gate_p": args.gate_p,
        "gate_tokens": args.gate_tokens,
        "dtype": args.dtype,
    }
    strategy = args.strategy or getattr(getattr(geo, "options", None), "strategy", None)
    given = [name for name, value in options.items() if value is not None]
    for name in unused_options(strategy, given) if strategy else []:  # (a typo of intent, not an error)
        warnings.warn(f"--{name.replace('_', '-')} applies to {STRATEGY_OPTIONS[name]} strategies; the search is "
                      f"{strategy}, so it changes nothing", stacklevel=1)  # fmt: skip
    if args.constrain is not None:  # (GeoCLIP has no search options: it refuses this one by name)
        options["constrain"] = args.constrain
    changes = mllm_changes(args)
    if changes:  # (GeoCLIP has no search options: it refuses this one by name)
        mllm = getattr(geo, "options", None)
        options["mllm"] = mllm.mllm.replace(**changes) if mllm else changes

    def report(path: str, error: str) -> None:
        print(f"geotoken predict: error: {error}", file=sys.stderr)

    search = dict(strategy=args.strategy, select=args.select, on_error=report, **options)
    if args.out:
        done = write_predictions(geo, photos, args.out, args.top_k, args.batch_size,
                                 skip_bad=args.skip_bad, progress=True, **search)  # fmt: skip
        resumed = f"; {done['resumed']} of them from the interrupted run" if done["resumed"] else ""
        print(f"wrote {done['photos']} predictions ({done['failed']} unreadable{resumed}) to {done['path']}")
        if done["fell_back"]:
            warnings.warn(f"{done['fell_back']} photo(s) kept the model's own choice: the MLLM's answer could not "
                          f"be used (their note says why, e.g. the endpoint's error)", stacklevel=1)  # fmt: skip
        return 0
    # on the terminal: unreadable files are reported and the others still run (exit status 1 without --skip-bad)
    results, failed = [], 0
    for result in predict_photos(geo, photos, args.top_k, args.batch_size, skip_bad=True, **search):
        results.append(result.to_dict())
        if result.error:
            failed += 1
        elif not args.json:
            print(_text(result.file, result.prediction, result.exif_gps))
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 1 if failed and not args.skip_bad else 0


def checked_photos(sources: list[str], stops_at_bad: bool) -> list[str]:
    """The photo arguments as image references (folders listed), checked before the model loads (CLIP
    ViT-L/14 takes seconds to load, or a download): a missing file ends the job at once when nothing else
    exists or when the job would stop at it (-o without --skip-bad); else it is reported in its turn."""
    missing = [s for s in map(os.fspath, sources) if not os.path.exists(split_ref(s)[0])]
    if missing and (stops_at_bad or len(missing) == len(sources)):
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise GeoTokenError(f"{missing[0]}: no such file or folder{more}")
    return list_images(sources)


def add_backbone_precision(p) -> None:
    """`--backbone-precision` and `--backbone-runtime`, shared by predict and serve."""
    p.add_argument(
        "--backbone-precision",
        choices=PRECISIONS,
        default="auto",
        help="how a CLIP backbone runs (default auto: bf16 autocast on CPUs with AVX-512 BF16 / AMX, else fp32; "
        "fp32 under an explicit --backbone-runtime onnx; int8: Linear layers quantised, 2-3x faster ViT-L/14 "
        "forward on CPUs, features within cosine 0.9995, never chosen by auto; geotoken bench predict "
        "--agreement checks them against fp32)",
    )
    p.add_argument(
        "--backbone-runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs a CLIP backbone (default auto: ONNX Runtime on a non-Intel CPU at fp32 when onnxruntime "
        "is installed, else torch; onnx: fp32 or int8 through ONNX Runtime (ViT-L/14 fp32 2.4x faster than "
        "torch fp32 on an AMD EPYC, the same speed on Intel), exported once into $GEOTOKEN_CACHE; "
        "pip install 'geotoken[onnx]')",
    )
