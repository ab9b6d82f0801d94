"""Which selection rule beats greedy and kNN on every test split? Rules tuned on `val`, judged on the tests.

    python benchmarks/selection.py --data DATA --features FEATURES --align ALIGN --bundle BUNDLE -o OUT

DATA, FEATURES, ALIGN are a demo run's stage folders (`runs/demo/data-*`, ...), BUNDLE its bundle. For each
split one pool per image is decoded once (gallery-constrained): the greedy answer, 10 samples at
temperature 1 and the cells of the model's k retrieved neighbours, with the model's log-probabilities; the
pools are cached in OUT/pools-SPLIT.npz. Every rule below then only re-ranks the pools, so a rule's
parameters can be swept cheaply. Each family's parameters are chosen on `val` (random MP16 places, like the
training data: nothing of the test splits is looked at), by the mean accuracy within 25 / 200 / 750 /
2500 km, and that one setting is reported on `test`, `test_disjoint` and `test_shift`, paired against greedy
and against 1-NN (the first retrieved neighbour, the demo's `nn` row) on the same images (95% bootstrap CIs). Written to OUT/selection.md and .json.

Rule families (log P: the model's log-probability of a candidate; S_R: the mean over the k neighbours of
exp(-distance / R km), the `vote` selector's support):
- `vote`: log P + w log S_R (the library's `--select vote` is w 1, R 200);
- `vote-floor`: log P + w log(S_R + f): a candidate far from every neighbour pays at most -w log f, so
  on places where the neighbours are wrong the model's coarse guess survives;
- `gate` (the library's `--select gate`): greedy when the model's probability of its first L tokens is at
  least p, else `vote` (w 1, kernel R);
- `prior`: log P - lam log prior_L, prior_L the gallery's share of rows in the candidate's cell of the
  first L tokens: the model's learned preference for densely photographed cells divided out.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from geotoken.evaluate import paired_comparison
from geotoken.geo import haversine_km
from geotoken.predict import Geolocator
from geotoken.search.candidates import Candidates, duplicate_mask, from_scores
from geotoken.search.decode import generate
from geotoken.search.select import neighbour_support, select
from geotoken.stages.method import evaluation_split

SPLITS = ("val", "test", "test_disjoint", "test_shift")
THRESHOLDS = (25.0, 200.0, 750.0, 2500.0)
GRIDS = {
    "vote": {"w": (0.25, 0.5, 1.0, 2.0), "R": (50.0, 200.0, 500.0)},
    "vote-floor": {"w": (0.5, 1.0, 2.0), "R": (50.0, 200.0, 500.0), "f": (0.01, 0.05, 0.2)},
    "gate": {"L": (1, 2, 3, 4), "p": (0.1, 0.3, 0.5, 0.7, 0.9), "R": (200.0,)},  # R: the default radius_km
    "prior": {"L": (2, 3, 4), "lam": (0.25, 0.5, 1.0)},
}


def decode_pools(geo: Geolocator, split, seed: int = 0, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Greedy + 10 samples + the k retrieved cells per image (gallery-constrained; the pool of
    `greedy+sample+retrieval`), and the neighbours."""
    emb = {m: np.asarray(split.array(m), dtype=np.float32) for m in geo.model.cfg.modalities}
    nbr = geo.neighbours(emb)  # (B, k) gallery rows
    pools = []
    for s in range(0, len(split), batch_size):
        part = slice(s, s + batch_size)
        batch = geo.batch({m: v[part] for m, v in emb.items()}, nbr[part])
        with torch.no_grad():
            pool, _ = generate(geo.model, batch, "greedy+sample+retrieval", num_samples=10, temperature=1.0,
                               seed=seed + s, constraint=geo.constraint, retrieved=geo.model.cfg.k)  # fmt: skip
        pools.append(pool)
    pool = Candidates.join(pools)
    G, T = geo.gallery.tokens.shape
    prior = np.zeros((max(GRIDS["prior"]["L"]) + 1, *pool.logp.shape))
    for L in GRIDS["prior"]["L"]:  # the gallery's share of rows in each candidate's level-L prefix cell
        keys, counts = np.unique(geo.gallery.tokens[:, :L], axis=0, return_counts=True)
        share = dict(zip(map(tuple, keys.tolist()), (counts / G).tolist()))
        flat = pool.tokens[:, :, :L].reshape(-1, L).tolist()
        prior[L] = np.asarray([share.get(tuple(t), 1.0 / G) for t in flat]).reshape(pool.logp.shape)
    return {
        "prior": prior, "tokens": pool.tokens, "logp_scaled": pool.logp_scaled,
        "logp": pool.logp, "lat": pool.lat, "lon": pool.lon, "level_probs": pool.level_probs,
        "duplicate": duplicate_mask(pool.tokens), "neighbours": geo.gallery.coords[nbr],
        "true": np.stack([split.lat, split.lon], axis=1),
    }  # fmt: skip


def support(p: dict, R: float) -> np.ndarray:
    """(B, N) the `vote` selector's support: mean over the k neighbours of exp(-distance / R)."""
    return neighbour_support(as_pool(p), p["neighbours"], R)


def choose(p: dict, scores: np.ndarray) -> np.ndarray:
    """(B,) the best distinct candidate, as the library's selectors pick it (ties: higher log-probability)."""
    return from_scores(as_pool(p), scores).index


def as_pool(p: dict) -> Candidates:
    return Candidates(p["tokens"], p["logp"], p["lat"], p["lon"], p["level_probs"], p["logp_scaled"])


def rule(p: dict, family: str, prm: dict) -> np.ndarray:
    """(B,) chosen candidate index of `family` with parameters `prm` (vote, gate: the library's selectors)."""
    if family == "greedy":
        return np.zeros(len(p["logp"]), dtype=np.int64)
    if family == "vote":  # the library's kernel with weight w (w 1: `--select vote`)
        return choose(p, p["logp"] + prm["w"] * np.log(support(p, prm["R"]) + 1e-300))
    if family == "vote-floor":
        return choose(p, p["logp"] + prm["w"] * np.log(support(p, prm["R"]) + prm["f"]))
    if family == "gate":  # `--select gate` on the greedy-first pool
        sel = select(as_pool(p), "gate", neighbours_latlon=p["neighbours"], radius_km=prm["R"],
                     gate_p=prm["p"], gate_tokens=prm["L"], own_index=0)  # fmt: skip
        return sel.index
    if family == "prior":
        return choose(p, p["logp"] - prm["lam"] * np.log(p["prior"][prm["L"]]))
    raise ValueError(family)


def errors_of(p: dict, index: np.ndarray) -> np.ndarray:
    rows = np.arange(len(index))
    return haversine_km(p["true"][:, 0], p["true"][:, 1], p["lat"][rows, index], p["lon"][rows, index])


def knn_errors(p: dict) -> np.ndarray:
    return haversine_km(p["true"][:, 0], p["true"][:, 1], p["neighbours"][:, 0, 0], p["neighbours"][:, 0, 1])


def accuracy(err: np.ndarray) -> list[float]:
    return [float(np.mean(err <= t)) for t in THRESHOLDS]


def cell(pc, t: float) -> str:
    a = pc.accuracy[t]
    return f"{100 * a.value:+.1f} [{100 * a.lo:+.1f}, {100 * a.hi:+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("data", "features", "align"):
        ap.add_argument(f"--{name}", required=True, type=Path, help=f"the run's {name} stage folder")
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("-o", "--out", required=True, type=Path)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    geo = None
    pools = {}
    for s in SPLITS:
        path = args.out / f"pools-{s}.npz"
        if not path.is_file():
            geo = geo or Geolocator.from_bundle(args.bundle)
            print(f"decoding {s}", flush=True)
            split = evaluation_split(args.data, args.features, args.align, s)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **decode_pools(geo, split))
            tmp.replace(path)
        pools[s] = dict(np.load(path))

    # each family's parameters, chosen on val by the mean accuracy over the thresholds
    chosen = {"greedy": {}}
    grid_report = {}
    for family, grid in GRIDS.items():
        scored = []
        for values in itertools.product(*grid.values()):
            prm = dict(zip(grid, values))
            acc = {s: accuracy(errors_of(pools[s], rule(pools[s], family, prm))) for s in SPLITS}
            scored.append((float(np.mean(acc["val"])), prm, acc))
        scored.sort(key=lambda x: -x[0])
        chosen[family] = scored[0][1]
        grid_report[family] = [{"params": prm, "accuracy": acc} for _, prm, acc in scored]

    lines, report = [], {"chosen_on_val": chosen, "grids": grid_report, "splits": {}}
    for s in SPLITS:
        p = pools[s]
        g, k = errors_of(p, rule(p, "greedy", {})), knn_errors(p)
        lines += [f"\n### {s} ({len(g)} images): % within 25 / 200 / 750 / 2500 km; paired pp [95% CI]\n",
                  "| row | accuracy | vs greedy (200 / 750 / 2500) | vs 1-NN (25 / 200 / 750 / 2500) |",
                  "|---|---|---|---|"]  # fmt: skip
        report["splits"][s] = {"knn": accuracy(k)}
        lines.append(
            f"| 1-NN (the first retrieved neighbour) | {' / '.join(f'{100 * a:.1f}' for a in accuracy(k))} | | |"
        )
        for family, prm in chosen.items():
            e = errors_of(p, rule(p, family, prm))
            name = family + ("" if not prm else " " + ", ".join(f"{a} {b:g}" for a, b in prm.items()))
            vs_g = paired_comparison(e, g, (name, "greedy"), THRESHOLDS, args.n_boot, 0)
            vs_k = paired_comparison(e, k, (name, "knn"), THRESHOLDS, args.n_boot, 0)
            ag = "" if family == "greedy" else " / ".join(cell(vs_g, t) for t in THRESHOLDS[1:])
            lines.append(f"| {name} | {' / '.join(f'{100 * a:.1f}' for a in accuracy(e))} | {ag} | "
                         f"{' / '.join(cell(vs_k, t) for t in THRESHOLDS)} |")  # fmt: skip
            report["splits"][s][name] = {"accuracy": accuracy(e), "vs_greedy": vs_g.to_dict(),
                                         "vs_knn": vs_k.to_dict()}  # fmt: skip
    text = "\n".join(lines)
    print(text)
    (args.out / "selection.md").write_text(text + "\n")
    (args.out / "selection.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
