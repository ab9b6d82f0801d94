"""Why beam search loses to greedy from 200 km up: where do their answers go, and does prefix scoring help?

    python benchmarks/beam_vs_greedy.py runs/demo            # the run's bundle, both test splits

For every test image whose beam-5 answer lies more than 200 km from the greedy answer, it prints how often
each is right (within 200 km) and how many gallery places lie within 200 km of each answer (is beam drawn
to densely covered regions?). Then it re-decodes with beam 5 and 10 samples and picks each image's answer
by the log-probability of its first m tokens only (full path as tie-break), beside the full-path pick.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from geotoken.evaluate.evaluate import load_split
from geotoken.features import FeatureStore
from geotoken.geo import haversine_km
from geotoken.predict import Geolocator


def _density(lat: np.ndarray, lon: np.ndarray, gallery: np.ndarray, km: float = 200.0) -> np.ndarray:
    out = np.empty(len(lat), dtype=np.int64)
    for s in range(0, len(lat), 256):  # (256, G) distances at a time
        d = haversine_km(
            lat[s : s + 256, None], lon[s : s + 256, None], gallery[None, :, 0], gallery[None, :, 1]
        )
        out[s : s + 256] = (d <= km).sum(1)
    return out


def _errors(pool, scores: np.ndarray, queries) -> np.ndarray:
    """km error of each image's candidate with the highest score (scores (B, N))."""
    rows, best = np.arange(len(scores)), scores.argmax(1)
    return haversine_km(queries.lat, queries.lon, pool.lat[rows, best], pool.lon[rows, best])


def _accuracy(errors: np.ndarray) -> str:
    within = " / ".join(f"{100 * (errors <= t).mean():.1f}" for t in (1, 25, 200, 750, 2500))
    return f"{within} % within 1/25/200/750/2500 km, median {np.median(errors):,.0f} km"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a `geotoken demo` run folder (run.json names its stages)")
    p.add_argument("--splits", nargs="+", default=["test", "test_disjoint"])
    p.add_argument("--prefix", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="prefix lengths to score")
    args = p.parse_args()

    import pandas as pd

    run = Path(args.run_dir)
    summary = json.loads((run / "run.json").read_text())
    folder = {name: run / s["folder"] for name, s in summary["stages"].items()}
    gallery = np.asarray(FeatureStore.open(folder["features"] / "gallery").coords)
    geo = Geolocator.from_bundle(summary["bundle"])
    for split in args.splits:
        print(f"== {split}")
        pred = pd.read_csv(Path(summary["eval"][split]) / "predictions.csv")
        greedy = pred[pred.method == "geotoken greedy"].set_index("id")
        beam = pred[pred.method == "geotoken beam5+logp"].set_index("id").loc[greedy.index]
        apart = haversine_km(greedy.pred_lat, greedy.pred_lon, beam.pred_lat, beam.pred_lon) > 200
        dg = _density(greedy.pred_lat.values[apart], greedy.pred_lon.values[apart], gallery)
        db = _density(beam.pred_lat.values[apart], beam.pred_lon.values[apart], gallery)
        print(
            f"beam's answer > 200 km from greedy's: {100 * apart.mean():.1f} % of images; there, within 200 km: "
            f"greedy {100 * (greedy.error_km.values[apart] <= 200).mean():.1f} %, "
            f"beam {100 * (beam.error_km.values[apart] <= 200).mean():.1f} %; gallery places within 200 km of "
            f"the answer (median): greedy {np.median(dg):.0f}, beam {np.median(db):.0f}; "
            f"beam's answer in the denser region for {100 * (db > dg).mean():.0f} % of them"
        )
        queries = load_split(folder["features"] / split, folder["data"] / f"{split}.csv", name=split)
        emb = {m: np.asarray(queries.array(m), dtype=np.float32) for m in geo.model.cfg.modalities}
        nbrs = geo.neighbours(emb)
        for strategy in ("beam", "sample"):
            pool = geo.search(
                emb, nbrs, None, strategy=strategy, select="logp", beam_width=5, num_samples=10
            ).pool
            lp = np.log(np.maximum(pool.level_probs, 1e-300))  # (B, N, T) per-token log-probabilities

            print(f"{strategy}, full path: {_accuracy(_errors(pool, lp.sum(-1), queries))}")
            for m in args.prefix:
                print(
                    f"{strategy}, first {m} tokens: {_accuracy(_errors(pool, lp[..., :m].sum(-1) + 1e-6 * lp.sum(-1), queries))}"
                )


if __name__ == "__main__":
    main()
