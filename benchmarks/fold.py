"""Folded against projected cross-attention memory in cached decoding, side by side in one process.

    python benchmarks/fold.py --preset small --batch-size 16 --threads 2 --rounds 6
    python benchmarks/fold.py --preset paper --batch-size 8 --threads 2

`GeoToken.init_cache(fold=...)` either projects the encoder memory into each decoder layer's keys and
values once per image, or folds those projections into the queries (`CrossAttention.folded`) and reads the
memory itself; `fold=None` (the default) picks by a multiply-add count. This times each decoder with the
cache forced both ways, alternating in rounds (machine load hits both alike), on the same random
paper-shaped memory, fp32, and prints the median seconds of each, the ratio projected / folded, which form
the default picks, and whether both return the same tokens. Decoding only: the encoder is not timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from geotoken.bench.common import PAPER_INPUTS, set_threads
from geotoken.model import FoldedMemory, GeoToken, preset
from geotoken.search.decode import beam_search, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["small", "paper"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    model = GeoToken(preset(args.preset, **PAPER_INPUTS)).eval().requires_grad_(False)
    with torch.no_grad():
        model.head_w.normal_(0, 0.05)  # untrained heads are zero: give beams something to choose
    memory = torch.randn(args.batch_size, model.cfg.seq_len, model.cfg.d_model)
    decoders = {
        "greedy": (1, lambda: sample(model, memory, 1, temperature=0.0)),
        "beam2": (2, lambda: beam_search(model, memory, 2)),
        "beam5": (5, lambda: beam_search(model, memory, 5)),
    }
    out = {"preset": args.preset, "batch": args.batch_size, "threads": args.threads, "decoders": {}}
    for name, (copies, run) in decoders.items():
        seconds, tokens = {True: [], False: []}, {}
        for _ in range(args.rounds):
            for fold in (True, False):
                model.init_cache = functools.partial(GeoToken.init_cache, model, fold=fold)
                t = time.perf_counter()
                tokens[fold] = run().tokens
                seconds[fold].append(time.perf_counter() - t)
        del model.init_cache  # back to the class's own, fold=None
        default = isinstance(model.init_cache(memory, copies)["layers"][0]["kv"], FoldedMemory)
        folded, projected = (statistics.median(seconds[f]) for f in (True, False))
        out["decoders"][name] = {
            "folded_s": folded,
            "projected_s": projected,
            "projected_over_folded": projected / folded,
            "default_folds": default,
            "same_tokens": bool((tokens[True] == tokens[False]).all()),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
