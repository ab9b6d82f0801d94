"""Bundles on disk: save_bundle / from_bundle with the real stage classes, and `geotoken predict`."""

import json
import shutil
import warnings

import pytest
import torch

from geotoken import assets
from geotoken.cli import main
from geotoken.errors import GeoTokenError
from geotoken.predict import Geolocator

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle(random_bundle):
    return random_bundle(gallery_rows=64, k=3)


def test_from_bundle_predicts(bundle, photo):
    geo = Geolocator.from_bundle(bundle)
    info = geo.info()
    assert info["gallery_rows"] == 64 and info["query_modalities"] == ["visual"]
    json.dumps(info)
    [pred] = geo.predict([photo], top_k=3, strategy="sample", num_samples=6, select="consensus")
    assert 1 <= len(pred.candidates) <= 3 and pred.select == "consensus"
    assert -90 <= pred.lat <= 90 and len(pred.candidates[0].cell) == 11  # level-20 token
    [vote] = geo.predict(
        [photo], top_k=3, strategy="sample+retrieval", num_samples=4, retrieved=3, select="vote"
    )
    assert vote.select == "vote" and -90 <= vote.lat <= 90
    # what a new bundle runs by default (`default_search`): greedy + samples + neighbours' cells, gate
    assert (geo.options.strategy, geo.options.select) == ("greedy+sample+retrieval", "gate")
    assert geo.options.retrieved == geo.model.cfg.k
    [gate] = geo.predict([photo], top_k=3)
    assert gate.select == "gate" and gate.note in ("model sure of the region", "neighbours voted")


def test_a_photos_samples_follow_the_photo_not_its_place_in_the_list(bundle, photo):
    geo = Geolocator.from_bundle(bundle)
    other = photo.transpose(0)  # another photo (mirrored)
    options = dict(top_k=5, strategy="sample", num_samples=8, select="logp", temperature=2.0)

    def cells(pred):
        return [c.cell for c in pred.candidates]

    alone = cells(geo.predict([photo], **options)[0])
    among = [cells(p) for p in geo.predict([other, other, photo, other, photo], batch_size=2, **options)]
    assert among[2] == among[4] == alone  # the same photo, at rows 2 and 4, in two batches
    assert among[0] == among[1] == among[3] != alone  # another photo draws its own samples
    assert cells(geo.predict([photo], seed=1, **options)[0]) != alone  # the seed still moves them


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_k=2.5), "top_k must be a whole number"),
        (dict(top_k=0), "top_k must be a whole number"),
        (dict(top_k=5000), r"in 1..1000"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(batch_size=-1), "batch_size must be"),
        (dict(constrain="no"), "search option constrain must be bool, got 'no'"),  # "no" would be truthy
        (dict(num_samples=0, strategy="sample"), "num_samples must be a whole number >= 1"),
        (dict(beam_width=2.5), "beam_width must be int, got 2.5"),
        (dict(strategy="bem"), "strategy 'bem': choose one of greedy, beam"),
        (dict(dtype="fp16"), "dtype 'fp16': choose one of fp32, bf16"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(seed=2**70, strategy="sample"), r"seed must be a whole number in 0..4611686018427387904"),
    ],  # fmt: skip
)
def test_bad_predict_arguments_are_named(bundle, photo, options, message):
    with pytest.raises(GeoTokenError, match=message):
        Geolocator.from_bundle(bundle).predict([photo], **options)


def test_bf16_predictions_follow_fp32(bundle, photo):
    geo = Geolocator.from_bundle(bundle)
    [fp32] = geo.predict([photo], top_k=3, strategy="beam", beam_width=3)
    [bf16] = geo.predict([photo], top_k=3, strategy="beam", beam_width=3, dtype="bf16")
    assert bf16.candidates[0].cell[:4] == fp32.candidates[0].cell[:4]  # same coarse cell
    assert abs(bf16.candidates[0].probability - fp32.candidates[0].probability) < 0.1
    with pytest.raises(GeoTokenError, match="dtype 'fp16'"):
        geo.predict([photo], dtype="fp16")


def test_cli_predict_reports_bad_files_and_keeps_going(bundle, tmp_path, capsys):
    good = tmp_path / "good.png"
    shutil.copy(assets.sample_image(), good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    code = main(
        ["predict", str(good), str(bad), str(truncated), "--model", str(bundle), "--top-k", "2", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 1
    rows = json.loads(out)
    assert [r["file"] for r in rows if "error" in r] == [str(bad), str(truncated)]
    ok = [r for r in rows if "error" not in r]
    assert len(ok) == 1 and len(ok[0]["candidates"]) == 2
    assert len(err.strip().splitlines()) == 2 and "bad.jpg" in err
    # text output
    assert (
        main(["predict", str(good), "--model", str(bundle), "--strategy", "greedy", "--dtype", "bf16"]) == 0
    )
    out, _ = capsys.readouterr()
    assert "good.png" in out and "cell" in out


def test_cli_gate_options_reach_the_selector(bundle, capsys):
    photo = str(assets.sample_image())
    notes = {}
    for p in ("0", "1"):  # gate_p 0: always sure of the region; 1: only a certain model is
        args = ["predict", photo, "--model", str(bundle), "--select", "gate", "--gate-p", p, "--json"]
        assert main([*args, "--gate-tokens", "3"]) == 0
        notes[p] = json.loads(capsys.readouterr().out)[0]["note"]
    assert notes == {"0": "model sure of the region", "1": "neighbours voted"}
    assert main(["predict", photo, "--model", str(bundle), "--select", "gate", "--gate-p", "1.5"]) != 0
    assert "gate_p must be in [0, 1]" in capsys.readouterr().err


def test_cli_says_when_an_option_is_not_read_by_the_strategy(bundle, capsys):
    photo = str(assets.sample_image())
    args = ["predict", photo, "--model", str(bundle), "--strategy", "beam", "--json"]
    with pytest.warns(
        UserWarning, match="--num-samples applies to sample strategies; the search is beam, so it"
    ):
        assert main([*args, "--num-samples", "4"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read by beam: no word
        assert main([*args, "--beam-width", "3"]) == 0


def test_bad_bundles(bundle, tmp_path, capsys):
    with pytest.raises(GeoTokenError, match="no bundle.json"):
        Geolocator.from_bundle(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    spec = json.loads((broken / "bundle.json").read_text())
    spec["model"] = "nowhere"
    (broken / "bundle.json").write_text(json.dumps(spec))
    with pytest.raises(GeoTokenError, match="'model' names 'nowhere'"):
        Geolocator.from_bundle(broken)
    assert main(["predict", str(assets.sample_image()), "--model", str(broken)]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_train_reward_and_calibrate_commands(bundle, tmp_path, capsys, photo):
    from geotoken.features import FeatureStore
    from geotoken.retrieval import NeighbourIndex, neighbour_table

    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    gallery = FeatureStore.open(work / "gallery")
    index = NeighbourIndex.load(work / "gallery" / "index")
    neighbour_table(gallery, index, 3, tmp_path / "nbrs", gallery_store=gallery, progress=False)
    args = ["--model", str(work), "--queries", str(work / "gallery")]
    code = main(
        [
            "train-reward",
            *args,
            "--neighbours",
            str(tmp_path / "nbrs"),
            "--epochs",
            "1",
            "--num-samples",
            "2",
            "--beam-width",
            "2",
            "--retrieved",
            "2",
            "--max-images",
            "20",
        ]
    )
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["train_images"] == 18 and metrics["val_images"] == 2
    assert main(["calibrate", *args, "--strategy", "greedy", "--plot", str(tmp_path / "rel.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"within_25km", "within_200km", "within_750km", "levels"}
    assert (tmp_path / "rel.png").is_file()
    spec = json.loads((work / "bundle.json").read_text())
    assert spec["reward"] == "reward" and spec["calibration"] == "calibration.json"
    geo = Geolocator.from_bundle(work)
    assert geo.reward is not None and geo.calibration is not None
    [pred] = geo.predict([photo], top_k=2, strategy="beam", select="reward")
    assert pred.select == "reward" and 0 <= pred.candidates[0].probability <= 1
    # fitted under greedy (and the bundle's selector): another search says its probabilities are not calibrated
    fitted = json.loads((work / "calibration.json").read_text())["search"]
    assert fitted["strategy"] == "greedy" and "num_samples" not in fitted  # (greedy reads no sample options)
    assert "probabilities not calibrated for this search: strategy 'beam' (calibrated: 'greedy')" in pred.note
    assert (
        "beam_width" not in pred.note and "select" not in pred.note
    )  # (options greedy's search has none of)
    [same] = geo.predict([photo], top_k=2, strategy="greedy", num_samples=3)  # num_samples: no part of greedy
    assert "not calibrated" not in same.note
    with pytest.warns(UserWarning, match="replacing its calibration with this one, fitted on"):
        assert main(["calibrate", *args, "--strategy", "beam"]) == 0  # (a test split's calibration, say)
    capsys.readouterr()
    [pooled] = geo.predict([photo], top_k=4, strategy="sample+retrieval", num_samples=2, retrieved=2)
    assert pooled.strategy == "sample+retrieval" and len(pooled.candidates) <= 4
    assert main(["train-reward", *args, "--neighbours", str(tmp_path / "nbrs"), "--retrieved", "-1"]) == 2


def test_a_bundle_never_overwrites_other_files_and_a_failed_rebundle_keeps_the_old_one(
    bundle, tmp_path, monkeypatch
):
    from geotoken import testing
    from geotoken.bundle import set_bundle_part
    from geotoken.model import GeoToken
    from geotoken.search.calibration import Calibration

    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(GeoTokenError, match="not a model bundle"):
        testing.random_bundle(other, gallery_rows=16)
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]

    target = tmp_path / "b"
    shutil.copytree(bundle, target)
    before = (target / "bundle.json").read_text()

    def crash(self, directory):
        raise OSError("disk full")

    Calibration().save(target / "calibration.json")
    set_bundle_part(target, "calibration", "calibration.json")  # fitted into the bundle after it was written
    with pytest.raises(GeoTokenError, match="holds a model bundle already; replacing it would drop it whole "
                       "with its calibration: write to a new folder, or pass --overwrite"):  # fmt: skip
        testing.random_bundle(target, gallery_rows=16)
    before = (target / "bundle.json").read_text()
    monkeypatch.setattr(GeoToken, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        testing.random_bundle(target, gallery_rows=16, overwrite=True)
    assert (target / "bundle.json").read_text() == before
    assert Geolocator.from_bundle(target) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "photos"]


def test_parts_made_for_other_parts_are_refused_at_bundle_time(bundle, tmp_path):
    from geotoken.align import AlignHeads
    from geotoken.bundle import save_bundle
    from geotoken.features import FeatureStore
    from geotoken.model import GeoToken, preset
    from geotoken.retrieval import NeighbourIndex

    parts = dict(
        model=GeoToken.load(bundle / "model"),
        backbone_config=json.loads((bundle / "backbone.json").read_text()),
        heads=AlignHeads.load(bundle / "align"),
        gallery_store=FeatureStore.open(bundle / "gallery"),
        index=NeighbourIndex.load(bundle / "gallery" / "index"),
        query_modalities=["visual"],
    )
    out = tmp_path / "b"
    with pytest.raises(GeoTokenError, match="heads were trained on backbone"):
        save_bundle(out, **{**parts, "backbone_config": {"name": "clip", "model": "elsewhere"}})
    with pytest.raises(GeoTokenError, match="index holds 32-d vectors, the heads' visual\\+gps is 64-d"):
        save_bundle(out, **{**parts, "query_modalities": ["visual", "gps"]})
    with pytest.raises(GeoTokenError, match="'location'"):
        save_bundle(out, **{**parts, "query_modalities": ["location"]})
    wide = GeoToken(preset("tiny", modalities={"visual": 48, "gps": 32, "text": 32}, k=5))
    with pytest.raises(GeoTokenError, match="reads a 48-d 'visual' embedding, the alignment heads give 32-d"):
        save_bundle(out, **{**parts, "model": wide})
    stale = tmp_path / "stale"  # a gallery aligned by other (say, retrained) heads
    shutil.copytree(bundle / "gallery", stale)
    header = json.loads((stale / "store.json").read_text())
    header["arrays"]["visual"]["heads"] = "0123456789abcdef"
    (stale / "store.json").write_text(json.dumps(header))
    with pytest.raises(
        GeoTokenError, match=r"'visual' embeddings were written by alignment heads 0123456789ab, the bundle's"
    ):
        save_bundle(out, **{**parts, "gallery_store": FeatureStore.open(stale)})
    assert not out.exists()
    save_bundle(out, **parts)
    assert Geolocator.from_bundle(out) is not None


def _truncate(path, size=100):
    with open(path, "r+b") as f:
        f.truncate(size)


def _edit_spec(**fields):
    def edit(root):
        spec = json.loads((root / "bundle.json").read_text())
        (root / "bundle.json").write_text(json.dumps({**spec, **fields}))

    return edit


def _edit_backbone(**fields):
    def edit(root):
        config = json.loads((root / "backbone.json").read_text())
        (root / "backbone.json").write_text(json.dumps({**config, **fields}))

    return edit


def test_a_bundle_from_before_one_name_for_the_probability_radius_loads(bundle, tmp_path, photo):
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    spec = json.loads((old / "bundle.json").read_text())
    spec.pop("probability_within_km", None)
    spec["probability_radius_km"] = 750.0  # its name then
    (old / "bundle.json").write_text(json.dumps(spec))
    [pred] = Geolocator.from_bundle(old).predict([photo], top_k=1)
    assert pred.candidates[0].probability_within_km == 750.0


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda r: _truncate(r / "model" / "model.safetensors"),
            "model.safetensors: not a readable safetensors",
        ),
        (
            lambda r: _truncate(r / "align" / "model.safetensors"),
            "model.safetensors: not a readable safetensors",
        ),
        (
            lambda r: _truncate(r / "gallery" / "index" / "index.faiss"),
            "index.faiss: not a readable FAISS index",
        ),
        (lambda r: (r / "bundle.json").write_text("[1, 2]"), "bundle.json: not a bundle description"),
        (lambda r: (r / "bundle.json").write_text('{"format": '), "bundle.json: not valid JSON \\(line 1"),
        (_edit_spec(query_modalities=["location"]), "bundle.json: query embedding\\(s\\) \\['location'\\]"),
        (_edit_spec(query_modalities=["visual", "gps"]), "bundle.json: the index holds 32-d vectors"),
        (lambda r: (r / "backbone.json").write_text("{}"), "backbone.json: a backbone description is"),
        (lambda r: (r / "backbone.json").write_text("[]"), "backbone.json: a backbone description is"),
        (lambda r: _truncate(r / "gallery" / "tokens.npy"), "tokens.npy: damaged"),
        (lambda r: _truncate(r / "gallery" / "visual.npy", 1000), "visual.npy: damaged"),
        (lambda r: _truncate(r / "gallery" / "coords.npy", 100), "coords.npy: damaged"),
        (
            _edit_spec(version=2),
            "bundle version 2 is newer than this geotoken reads \\(1\\); upgrade geotoken",
        ),
        (
            _edit_spec(probability_within_km="abc"),
            "field 'probability_within_km' is 'abc', expected a number",
        ),
        (
            _edit_backbone(image_size=64),
            "align\\) were trained on backbone .*backbone.json says .*'image_size': 64",
        ),
    ],
)
def test_a_damaged_bundle_is_one_error_naming_the_part(bundle, tmp_path, capsys, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    damage(broken)
    with pytest.raises(GeoTokenError, match=message):
        Geolocator.from_bundle(broken)
    assert main(["predict", str(assets.sample_image()), "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(broken) in err


def test_running_out_of_memory_is_one_line_that_says_what_to_lower(bundle, capsys, monkeypatch):
    def too_big(self, *args, **kwargs):
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 563200000000 bytes"
        )

    monkeypatch.setattr(Geolocator, "predict", too_big)
    assert main(["predict", str(assets.sample_image()), "--model", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size" in err and "Traceback" not in err


def test_a_compressed_index_re_ranks_by_the_gallery_vectors(tmp_path):
    """Neighbour tables re-rank an IVF-PQ index's REFINE x k candidates by exact vectors; prediction must
    too, or the model meets at test time neighbours ordered otherwise than those it was trained on."""
    import numpy as np

    from geotoken import testing
    from geotoken.retrieval import REFINE, StoreEmbeddings

    root = testing.random_bundle(tmp_path / "b", gallery_rows=512, k=5, index_kind="ivfpq")
    geo = Geolocator.from_bundle(root)
    assert isinstance(geo.gallery_vectors, StoreEmbeddings) and geo.gallery_vectors.spec == "visual"
    rng = np.random.default_rng(1)
    queries = geo.gallery.embeddings["visual"][:40] + 0.3 * rng.standard_normal((40, 32))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    got = geo.neighbours({"visual": queries})
    exact = np.asarray(geo.gallery.embeddings["visual"], dtype=np.float32)
    want, _ = geo.index.search(queries, 5, exact=exact, refine=REFINE)
    np.testing.assert_array_equal(got, want)
    assert (got != geo.index.search(queries, 5)[0]).any()  # the PQ order alone differs here
    flat = Geolocator.from_bundle(testing.random_bundle(tmp_path / "flat", gallery_rows=64, k=3))
    assert flat.gallery_vectors is None  # a flat index is exact already


def test_a_calibration_at_other_radii_keeps_the_headline_radius_and_evaluate_scores_its_radii(
    bundle, tmp_path
):
    from geotoken.evaluate import load_split
    from geotoken.evaluate.evaluate import EvalConfig, GeoTokenMethodConfig, evaluate
    from geotoken.fit import calibrate_bundle

    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    geo = Geolocator.from_bundle(work)
    calibrate_bundle(geo, work / "gallery", strategy="greedy", radii_km=[100, 500], progress=False)
    cal = Geolocator.from_bundle(work).calibration
    assert cal.radii_km == [100.0, 200.0, 500.0]  # 200: the bundle's probability_within_km
    split = load_split(work, name="gallery")
    model = GeoTokenMethodConfig(model=str(work), strategies=("greedy",))
    res = evaluate(split, split, tmp_path / "e", EvalConfig(methods=("geotoken",), n_boot=10, limit=8, plots=False,
                   geotoken=model), log=lambda *a: None)  # fmt: skip
    scored = json.loads((tmp_path / "e" / "metrics.json").read_text())["methods"]["geotoken greedy+gallery"]
    assert {"within_100km", "within_500km", "within_200km", "within_25km"} <= set(scored["calibration"])
    assert res.runs
