"""The model as an evaluation method: one row per strategy x selector, calibration report, plots."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from geotoken import s2
from geotoken.cli import build_parser, main
from geotoken.errors import GeoTokenError
from geotoken.evaluate.evaluate import EvalConfig, GeoTokenMethodConfig, evaluate
from geotoken.evaluate.geotoken_method import row_label, rows_to_run
from geotoken.evaluate.synthetic import synthetic_splits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def geolocator_and_splits(tiny_model):
    from geotoken.gallery import Gallery
    from geotoken.predict import Geolocator
    from geotoken.retrieval import NeighbourIndex
    from geotoken.search.options import SearchOptions

    gallery, queries = synthetic_splits(n_gallery=400, n_queries=40, seed=5)
    dims = {"visual": gallery.arrays["visual"].shape[1], "gps": gallery.arrays["gps"].shape[1]}
    model = tiny_model(dims, k=3, dropout=0.0, level=10, group=2)
    cfg = model.cfg
    coords = np.stack([gallery.lat, gallery.lon], 1)
    tokens = s2.latlon_to_tokens(gallery.lat, gallery.lon, cfg.level, cfg.group)
    index = NeighbourIndex.build(gallery.arrays["visual"], kind="flat", progress=False)
    geo = Geolocator(
        model, Gallery({m: gallery.arrays[m] for m in dims}, tokens, coords), index=index,
        query_modalities=["visual"], options=SearchOptions(batch_size=16),
    )  # fmt: skip
    return geo, gallery, queries


def test_rows_and_labels():
    cfg = GeoTokenMethodConfig(
        strategies=("greedy", "beam", "sample", "beam"), selectors=("logp", "consensus")
    )
    assert rows_to_run(cfg) == [
        ("greedy", "logp", True),
        ("beam", "logp", True),
        ("beam", "consensus", True),
        ("sample", "logp", True),
        ("sample", "consensus", True),
    ]
    # the gallery-prefix constraint is in the label: "+gallery"; free decoding has no suffix
    assert row_label("beam", "consensus", cfg) == "geotoken beam5+consensus+gallery"
    assert row_label("sample", "logp", cfg) == "geotoken sample10+logp+gallery"
    assert row_label("greedy", "logp", cfg) == "geotoken greedy+gallery"
    assert row_label("sample+retrieval", "reward", cfg) == "geotoken sample10+nbr5+reward+gallery"
    assert row_label("beam", "consensus", cfg, constrain=False) == "geotoken beam5+consensus"
    assert row_label("greedy", "logp", cfg, constrain=False) == "geotoken greedy"
    assert row_label("sample+retrieval", "reward", cfg, False) == "geotoken sample10+nbr5+reward"
    assert row_label("greedy+sample+retrieval", "gate", cfg) == "geotoken greedy+sample10+nbr5+gate+gallery"
    assert row_label("beam+sample", "vote", cfg) == "geotoken beam5+sample10+vote+gallery"  # both pool sizes


def test_rows_free_and_constrained():
    both = GeoTokenMethodConfig(strategies=("greedy", "beam"), constrain=(True, False))
    assert rows_to_run(both) == [
        ("greedy", "logp", False),
        ("greedy", "logp", True),
        ("beam", "logp", False),
        ("beam", "logp", True),
    ]
    # the demo's rows: the search rows constrained, greedy both ways (free first)
    demo = GeoTokenMethodConfig(strategies=("greedy", "beam"), free_strategies=("greedy",))
    assert rows_to_run(demo) == [("greedy", "logp", False), ("greedy", "logp", True), ("beam", "logp", True)]
    free = GeoTokenMethodConfig(strategies=("beam",), constrain=(False,), free_strategies=("greedy",))
    assert rows_to_run(free) == [("beam", "logp", False), ("greedy", "logp", False)]
    with pytest.raises(GeoTokenError, match="constrain"):
        rows_to_run(GeoTokenMethodConfig(constrain=()))
    with pytest.raises(GeoTokenError, match="choose from greedy, beam, sample, beam\\+sample"):
        rows_to_run(GeoTokenMethodConfig(free_strategies=("bem",)))


def test_free_and_constrained_rows_in_one_table(geolocator_and_splits, tmp_path):
    geo, gallery, queries = geolocator_and_splits
    cfg = EvalConfig(
        methods=("geotoken",), n_boot=10, plots=False, limit=8,
        geotoken=GeoTokenMethodConfig(strategies=("greedy",), constrain=(True, False)),
    )  # fmt: skip
    res = evaluate(gallery, queries, tmp_path, cfg, geolocator=geo, log=lambda *a: None)
    assert list(res.runs) == ["geotoken greedy", "geotoken greedy+gallery"]
    assert res.runs["geotoken greedy"].config["constrain"] is False
    assert res.runs["geotoken greedy+gallery"].config["constrain"] is True
    assert res.runs["geotoken greedy+gallery"].strategy == "greedy+gallery"
    assert res.runs["geotoken greedy"].strategy == "greedy"
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["methods"]["geotoken greedy"]["config"]["constrain"] is False
    # the free row is compared with the constrained greedy row, the decoding of the search rows
    assert [(p["a"], p["b"]) for p in report["paired"]] == [("geotoken greedy+gallery", "geotoken greedy")]
    # constrained answers are gallery cells; free decoding of a random model leaves the gallery
    cfg_m = geo.model.cfg

    def cells(lat, lon):
        return {tuple(t) for t in s2.latlon_to_tokens(lat, lon, cfg_m.level, cfg_m.group).tolist()}

    in_gallery = cells(gallery.lat, gallery.lon)
    free, constrained = res.runs["geotoken greedy"].pred, res.runs["geotoken greedy+gallery"].pred
    assert cells(constrained.lat, constrained.lon) <= in_gallery
    assert cells(free.lat, free.lon) - in_gallery


@pytest.mark.slow
def test_geotoken_rows_in_one_table(geolocator_and_splits, tmp_path):
    geo, gallery, queries = geolocator_and_splits
    cfg = EvalConfig(
        methods=("nn", "geotoken"),
        n_boot=50,
        geotoken=GeoTokenMethodConfig(
            strategies=("greedy", "beam", "sample", "beam+sample"),
            selectors=("logp", "consensus"),
            num_samples=4,
        ),
        plots=False,
    )
    res = evaluate(gallery, queries, tmp_path, cfg, geolocator=geo, log=lambda *a: None)
    assert not list(tmp_path.glob("*.png"))
    labels = ["nn", "geotoken greedy+gallery", "geotoken beam5+logp+gallery", "geotoken beam5+consensus+gallery",
              "geotoken sample4+logp+gallery", "geotoken sample4+consensus+gallery",
              "geotoken beam5+sample4+logp+gallery", "geotoken beam5+sample4+consensus+gallery"]  # fmt: skip
    assert list(res.runs) == labels
    report = json.loads((tmp_path / "metrics.json").read_text())
    # paired: every row minus the reference (nn), then every search row minus greedy
    pairs = [(p["a"], p["b"]) for p in report["paired"]]
    assert pairs == [(lab, "nn") for lab in labels[1:]] + [
        (lab, "geotoken greedy+gallery") for lab in labels[2:]
    ]
    for label in labels[1:]:
        m = report["methods"][label]
        assert m["method"] == "geotoken" and m["n"] == len(queries)
        cal = m["calibration"]
        assert set(cal) >= {"within_25km", "within_200km", "within_750km", "levels"}
        assert 0 <= cal["within_200km"]["ece"] <= 1
        assert len(cal["levels"]) == geo.model.cfg.n_tokens
    # the greedy row equals the model's own (gallery-constrained) greedy decoding of the same inputs
    from geotoken.search.decode import generate

    batch = geo.batch({m: queries.arrays[m] for m in ("visual", "gps")}, geo.neighbours(queries.arrays))
    with torch.no_grad():
        pool, _ = generate(geo.model, batch, "greedy", constraint=geo.constraint)
    lat, lon = s2.tokens_to_latlon(pool.tokens[:, 0], geo.model.cfg.level, geo.model.cfg.group)
    np.testing.assert_allclose(res.runs["geotoken greedy+gallery"].pred.lat, lat)
    np.testing.assert_allclose(res.runs["geotoken greedy+gallery"].pred.lon, lon)
    # beam search keeps the most likely of its beams: never less likely than greedy
    beam, greedy = res.runs["geotoken beam5+logp+gallery"], res.runs["geotoken greedy+gallery"]
    assert np.all(beam.pred.score >= greedy.pred.score * (1 - 1e-6))


@pytest.mark.slow
def test_reliability_plot_written(geolocator_and_splits, tmp_path):
    geo, gallery, queries = geolocator_and_splits
    cfg = EvalConfig(methods=("geotoken",), n_boot=10, geotoken=GeoTokenMethodConfig(strategies=("beam",)))
    evaluate(gallery, queries, tmp_path, cfg, geolocator=geo, log=lambda *a: None)
    assert (tmp_path / "reliability_geotoken_beam5_logp_gallery.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_no_constrain_labels_and_cache_keys(random_bundle, tmp_path):
    bundle, out = random_bundle(gallery_rows=64, k=3), tmp_path / "eval"
    base = ["evaluate", "--method", "geotoken", "--model", str(bundle), "--gallery", str(bundle),
            "--queries", str(bundle), "-o", str(out), "--n-boot", "10", "--no-plots", "--limit", "16"]  # fmt: skip

    def methods(*flags):
        assert main([*base, *flags]) == 0
        return json.loads((out / "metrics.json").read_text())["methods"]

    free = methods("--no-constrain")
    assert list(free) == ["geotoken greedy"] and free["geotoken greedy"]["config"]["constrain"] is False
    constrained = methods()  # the default: gallery-constrained, as before
    assert (
        list(constrained) == ["geotoken greedy+gallery"]
        and not constrained["geotoken greedy+gallery"]["cached"]
    )
    # the decoding is part of the cache key: one entry each, and a rerun of either reuses its own
    assert len(list((out / "cache").glob("geotoken_greedy*.npz"))) == 2
    assert methods("--no-constrain")["geotoken greedy"]["cached"]
    both = methods("--constrain", "--free-strategy", "greedy")
    assert list(both) == ["geotoken greedy", "geotoken greedy+gallery"]
    assert all(m["cached"] for m in both.values())


def test_a_loaded_bundle_shares_a_cache_across_evaluations(random_bundle, tmp_path):
    """The run's eval stage: the bundle loaded once (geolocator) and named (cfg.model), a cache beside the
    stage folders: another n_boot (a new stage folder) re-scores the cached decodes, it does not decode."""
    from geotoken.evaluate import load_split
    from geotoken.predict import Geolocator

    bundle = random_bundle(gallery_rows=64, k=3)
    geo, split = Geolocator.from_bundle(bundle), load_split(bundle, name="gallery")
    model = GeoTokenMethodConfig(model=str(bundle), strategies=("greedy", "beam"))
    for n_boot, cached in ((10, False), (20, True)):
        cfg = EvalConfig(methods=("nn", "geotoken"), n_boot=n_boot, limit=8, plots=False, geotoken=model)
        res = evaluate(split, split, tmp_path / f"eval{n_boot}", cfg, geolocator=geo, log=lambda *a: None,
                       cache_dir=tmp_path / "cache")  # fmt: skip
        assert {label: run.cached for label, run in res.runs.items()} == dict.fromkeys(res.runs, cached)
    assert not (tmp_path / "eval10" / "cache").exists()


def test_constrain_flags_parse():
    parser = build_parser()
    for command in (["evaluate", "--gallery", "G", "--queries", "Q", "-o", "O"], ["predict", "x.jpg", "--model", "M"],
                    ["calibrate", "--model", "M", "--queries", "Q"]):  # fmt: skip
        assert parser.parse_args(command).constrain is None  # the default: the bundle's / the config's
        assert parser.parse_args([*command, "--constrain"]).constrain is True
        assert parser.parse_args([*command, "--no-constrain"]).constrain is False


def test_cli_device_reaches_the_bundle(random_bundle, tmp_path, monkeypatch):
    import geotoken.evaluate.geotoken_method as method

    bundle, seen = random_bundle(gallery_rows=64, k=3), []
    load = method.Geolocator.from_bundle

    def spy(path, device="auto", **kw):
        seen.append(device)
        return load(path, device=device, **kw)

    monkeypatch.setattr(method.Geolocator, "from_bundle", spy)
    args = ["evaluate", "--method", "geotoken", "--model", str(bundle), "--gallery", str(bundle), "--queries",
            str(bundle), "--n-boot", "10", "--no-plots", "--limit", "8"]  # fmt: skip
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert main([*args, "-o", str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert seen == ["auto", "cpu"]


def test_mllm_rows_are_keyed_by_the_endpoint_and_count_their_fallbacks(random_bundle, tmp_path, monkeypatch):
    """select=mllm in evaluate: another MLLM model (set in the environment) decodes afresh instead of
    reusing the last one's cached answers, and images whose answer could not be used are counted and said
    (they silently kept their logp choice)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    from geotoken.evaluate import load_split

    class Answer(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.server.models.append(body["model"])
            text = (
                "somewhere in France"
                if body["model"] == "nojson"
                else '{"latitude": 48.85, "longitude": 2.35}'
            )
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    srv.models = []
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("GEOTOKEN_MLLM_BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/v1")
    bundle = random_bundle(gallery_rows=64, k=3)
    split = load_split(bundle, name="gallery")
    images = []
    for i in range(len(split)):
        images.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (32, 32), (10 * i, 50, 90)).save(images[-1])
    split.images = images
    model = GeoTokenMethodConfig(
        model=str(bundle), strategies=("greedy+sample",), selectors=("mllm",), num_samples=3
    )
    cfg = EvalConfig(methods=("geotoken",), n_boot=10, plots=False, geotoken=model, limit=len(split))
    try:
        monkeypatch.setenv("GEOTOKEN_MLLM_MODEL", "nojson")
        with pytest.warns(UserWarning, match=rf"{len(split)} of {len(split)} images fell back to logp"):
            res = evaluate(split, split, tmp_path / "e", cfg, log=lambda *a: None, cache_dir=tmp_path / "c")
        (run,) = res.runs.values()
        assert run.config["mllm_fell_back"] == len(split) and run.config["mllm"]["model"] == "nojson"
        assert "api_key" not in run.config["mllm"]
        monkeypatch.setenv("GEOTOKEN_MLLM_MODEL", "own")
        res = evaluate(split, split, tmp_path / "e", cfg, log=lambda *a: None, cache_dir=tmp_path / "c")
        (run,) = res.runs.values()
        assert not run.cached and run.config["mllm_fell_back"] == 0 and "own" in srv.models
        # free generation (the paper's other MLLM row, --mllm-mode free): its own row and cache entry
        free = dataclasses.replace(cfg, geotoken=dataclasses.replace(model, mllm={"mode": "free"}))
        res = evaluate(split, split, tmp_path / "f", free, log=lambda *a: None, cache_dir=tmp_path / "c")
        ((label, run),) = res.runs.items()
        assert "+mllm-free" in label and run.config["mllm"]["mode"] == "free" and not run.cached
    finally:
        srv.shutdown()
        srv.server_close()


def test_rows_searched_otherwise_than_the_calibration_say_so(random_bundle, tmp_path):
    import shutil

    from geotoken.bundle import set_bundle_part
    from geotoken.evaluate import load_split
    from geotoken.search.calibration import Calibration

    bundle = tmp_path / "b"
    shutil.copytree(random_bundle(gallery_rows=64, k=3), bundle)
    Calibration(search={"strategy": "greedy", "constrain": True, "select": "gate"}).save(
        bundle / "calibration.json"
    )
    set_bundle_part(bundle, "calibration", "calibration.json")
    split = load_split(bundle, name="gallery")
    model = GeoTokenMethodConfig(model=str(bundle), strategies=("greedy", "beam"), selectors=("gate",))
    cfg = EvalConfig(methods=("geotoken",), n_boot=10, limit=6, plots=False, geotoken=model)
    res = evaluate(split, split, tmp_path / "e", cfg, log=lambda *a: None, cache_dir=tmp_path / "c")
    fitted = {label: run.config.get("calibration_fitted_for") for label, run in res.runs.items()}
    assert fitted["geotoken greedy+gallery"] is None  # the search it was fitted under
    assert fitted["geotoken beam5+gate+gallery"] == {"strategy": "greedy"}  # (a width greedy has none of)
    again = evaluate(split, split, tmp_path / "e2", cfg, log=lambda *a: None, cache_dir=tmp_path / "c")
    assert (
        again.runs["geotoken beam5+gate+gallery"].config["calibration_fitted_for"]["strategy"] == "greedy"
    )  # cached


def test_each_search_row_is_paired_with_the_greedy_row_of_its_own_decoding():
    from geotoken.evaluate.baselines import Predictions
    from geotoken.evaluate.evaluate import score_runs
    from geotoken.evaluate.runs import MethodRun

    gt = GeoTokenMethodConfig(model="x", strategies=("greedy", "sample"), constrain=(True, False))
    rng, pred = np.random.default_rng(0), Predictions(np.zeros(50), np.zeros(50))
    runs = {"knn": MethodRun("knn", "knn", "knn", {}, pred, rng.random(50) * 1e3)}  # the reference
    for strategy, select, constrain in rows_to_run(gt):
        label = row_label(strategy, select, gt, constrain)
        runs[label] = MethodRun(label, "geotoken", strategy, {}, pred, rng.random(50) * 1e3)
    pairs = {(p.a, p.b) for p in score_runs(runs, EvalConfig(methods=("geotoken",), n_boot=10, geotoken=gt))}
    assert ("geotoken sample10+logp", "geotoken greedy") in pairs  # free against free
    assert ("geotoken sample10+logp+gallery", "geotoken greedy+gallery") in pairs
    assert ("geotoken sample10+logp", "geotoken greedy+gallery") not in pairs
    assert ("geotoken greedy", "geotoken greedy+gallery") in pairs  # the two decodings, greedy
