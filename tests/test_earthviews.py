"""EarthViews: exact geometry (wrap, poles, true point inside), determinism, splits, formats, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from geotoken.data import earthviews as ev
from geotoken.errors import GeoTokenError

R = ev.EARTH_RADIUS_KM


def unit(lat, lon):
    lat, lon = np.broadcast_arrays(
        np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    )
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def great_circle_km(lat1, lon1, lat2, lon2):
    dot = np.clip((unit(lat1, lon1) * unit(lat2, lon2)).sum(-1), -1.0, 1.0)
    return R * np.arccos(dot)


def smooth_layer(H=180, W=360):
    """A synthetic equirectangular layer whose colour is a smooth function of the 3D point: no seams."""
    lat = 90.0 - (np.arange(H) + 0.5) * 180.0 / H
    lon = -180.0 + (np.arange(W) + 0.5) * 360.0 / W
    xyz = unit(lat[:, None], lon[None, :])  # (H, W, 3)
    return np.clip(np.rint(127.5 * (1.0 + xyz)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- geometry


def test_sample_equirect_is_exact_at_pixel_centres():
    img = np.random.default_rng(0).integers(0, 256, (6, 12, 3), dtype=np.uint8)
    rows, cols = np.meshgrid(np.arange(6), np.arange(12), indexing="ij")
    lat = 90.0 - (rows + 0.5) * 180.0 / 6
    lon = -180.0 + (cols + 0.5) * 360.0 / 12
    np.testing.assert_allclose(ev.sample_equirect(img, lat, lon), img, atol=1e-3)
    # halfway between the last and the first column: the average of both (longitude wraps)
    mid = ev.sample_equirect(img, np.array([lat[2, 0]]), np.array([180.0]))
    np.testing.assert_allclose(mid[0], (img[2, 0].astype(float) + img[2, 11]) / 2, atol=1e-3)


def test_every_pixel_is_at_its_planar_distance_and_the_true_point_is_at_its_pixel():
    """Azimuthal equidistant: the great-circle distance from the true point to each pixel is the pixel's
    distance in the view plane, so nothing is stretched, also across the antimeridian and the poles."""
    S, km = 15, 400.0  # odd: offsets k / S fall on pixel centres
    lat = np.array([0.0, 45.0, -33.9, 89.5, -90.0, 10.0, 64.1])
    lon = np.array([179.9, -179.95, 151.2, 20.0, 0.0, -180.0, -21.9])
    B = len(lat)
    offset = np.array([[4, -3], [0, 0], [-4, 4], [2, 1], [-1, -4], [3, 3], [-4, -4]]) / S  # on pixel centres
    rotation = np.radians([0.0, 90.0, 33.0, -120.0, 180.0, 7.0, 271.0])
    vlat, vlon = ev.view_latlon(lat, lon, np.full(B, km), rotation, offset, S)
    assert vlat.shape == (B, S, S) and np.isfinite(vlat).all() and np.isfinite(vlon).all()
    assert np.abs(vlat).max() <= 90.0 and np.abs(vlon).max() <= 180.0
    t = (np.arange(S) - (S - 1) / 2) / S
    du = t[None, None, :] - offset[:, 0, None, None]
    dv = -t[None, :, None] - offset[:, 1, None, None]
    planar = np.hypot(du, dv) * km  # (B, S, S)
    sphere = great_circle_km(lat[:, None, None], lon[:, None, None], vlat, vlon)
    np.testing.assert_allclose(sphere, planar, atol=0.5)  # float32 grid: well under a 25 km pixel
    row, col = ev.view_offsets_to_pixel(offset, S)
    at_pixel = sphere[np.arange(B), np.rint(row).astype(int), np.rint(col).astype(int)]
    assert at_pixel.max() < 0.5


def test_true_point_never_leaves_the_view():
    cfg = ev.EarthViewsConfig(max_offset=0.25, image_size=64)
    ids = np.array([f"v{i}" for i in range(1000)])
    for style in (cfg.gallery_style, *ev.TEST_STYLES.values()):
        p = ev.draw_view_params(ids, seed=7, style=style, cfg=cfg)
        assert np.abs(p["offset"]).max() <= 0.25
        row, col = ev.view_offsets_to_pixel(p["offset"], 64)
        lo, hi = 31.5 - 16, 31.5 + 16  # the central half of the view
        assert row.min() >= lo and row.max() <= hi and col.min() >= lo and col.max() <= hi


def test_antimeridian_view_equals_greenwich_view_of_the_rolled_earth():
    bmng = ev.load_layer("bmng")
    rolled = np.roll(bmng, bmng.shape[1] // 2, axis=1)  # rolled[:, c] = bmng[:, c - W/2]: longitude + 180
    lat, rot, off = np.array([-17.0, 65.0]), np.radians([0.0, 40.0]), np.array([[0.2, -0.1], [-0.25, 0.25]])
    km = np.array([600.0, 300.0])
    a_lat, a_lon = ev.view_latlon(lat, np.array([180.0, -179.5]), km, rot, off, 48)
    b_lat, b_lon = ev.view_latlon(lat, np.array([0.0, 0.5]), km, rot, off, 48)
    a = ev.sample_equirect(bmng, a_lat, a_lon)
    b = ev.sample_equirect(rolled, b_lat, b_lon)
    assert np.abs(a - b).max() < 1.0
    # the views do straddle the antimeridian: both signs of longitude appear
    assert (a_lon > 170).any() and (a_lon < -170).any()


@pytest.mark.parametrize("pole", [90.0, -90.0, 89.99])
def test_views_at_the_poles_are_round_not_stretched(pole):
    """A layer that depends on latitude only looks, from above a pole, like concentric rings: the view must
    be symmetric under a quarter turn and a transpose (a plain equirectangular crop would be stripes)."""
    H, W = 900, 1800
    colat = np.radians((np.arange(H) + 0.5) * 180.0 / H)  # (H,) from the north pole
    ring = 127.5 * (1.0 + np.cos(30.0 * colat))[:, None, None] * np.ones((1, W, 3))  # rings every 12 degrees
    layer = np.clip(np.rint(ring), 0, 255).astype(np.uint8)
    S = 32
    vlat, vlon = ev.view_latlon(
        np.array([pole]), np.array([33.0]), np.array([2000.0]), np.zeros(1), np.zeros((1, 2)), S
    )
    img = ev.sample_equirect(layer, vlat, vlon)[0, ..., 0]
    assert img.std() > 30  # not flat
    np.testing.assert_allclose(img, np.rot90(img), atol=2.0)
    np.testing.assert_allclose(img, img.T, atol=2.0)


def test_rendered_colours_match_the_smooth_earth_at_the_antimeridian_and_poles(monkeypatch):
    layer = smooth_layer()
    monkeypatch.setitem(ev.render._LAYER_CACHE, "bmng", layer)
    cfg = ev.EarthViewsConfig(image_size=24, view_km=3000.0, other_layers=())
    plain = ev.ViewStyle(rotation_deg=180.0)
    ids = np.array(["a", "b", "c", "d"])
    lat, lon = np.array([0.0, 88.0, -89.0, 45.0]), np.array([180.0, -179.0, 10.0, -180.0])
    p = ev.draw_view_params(ids, 0, plain, cfg)
    img = ev.render_views(lat, lon, p, cfg).astype(float)
    vlat, vlon = ev.view_latlon(lat, lon, p["width_km"], p["rotation"], p["offset"], 24)
    expected = 127.5 * (1.0 + unit(vlat, vlon))
    assert np.abs(img - expected).max() < 4.0  # one source pixel of a 1-degree layer, plus rounding


# ---------------------------------------------------------------- views and splits


def test_views_depend_only_on_seed_and_id():
    cfg = dataclasses.replace(ev.PRESETS["tiny"], other_layers=("etopo1",))
    style = cfg.test_style
    ids = np.array(["x1", "x2", "x3", "x4"])
    a = ev.draw_view_params(ids, 5, style, cfg)
    b = ev.draw_view_params(ids[::-1], 5, style, cfg)
    c = ev.draw_view_params(ids, 6, style, cfg)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k][::-1])
    assert not np.allclose(a["rotation"], c["rotation"])
    lat, lon = np.array([48.0, -33.0, 35.0, 60.0]), np.array([2.0, 151.0, 139.0, 25.0])
    pa = ev.render_views(lat, lon, a, cfg)
    pb = ev.render_views(lat[::-1], lon[::-1], b, cfg)
    np.testing.assert_array_equal(pa, pb[::-1])


def test_a_test_view_is_never_a_copy_of_the_gallery_view_of_the_same_point():
    cfg = dataclasses.replace(ev.PRESETS["tiny"], image_size=48)
    ids = np.array([f"p{i}" for i in range(16)])
    lat = np.linspace(-60, 70, 16)
    lon = np.linspace(-170, 170, 16)
    g = ev.render_views(lat, lon, ev.draw_view_params(ids, 0, cfg.gallery_style, cfg), cfg).astype(float)
    t = ev.render_views(lat, lon, ev.draw_view_params(ids, 0, cfg.test_style, cfg), cfg).astype(float)
    assert np.abs(g - t).mean(axis=(1, 2, 3)).min() > 3.0


def test_splits_are_disjoint_and_the_disjoint_split_is_held_out():
    coords = ev.load_coordinates()
    assert len(coords.ids) > 90_000 and len(np.unique(np.stack([coords.lat, coords.lon], 1), axis=0)) == len(
        coords.ids
    )
    cfg = ev.EarthViewsConfig(size=5000, n_val=300, n_test=300, n_test_disjoint=300)
    splits = ev.make_splits(coords, cfg)
    # the train split is every gallery place again, as views ID-t0, ID-t1; the other splits are disjoint
    g, t = splits["gallery"], splits["train"]
    np.testing.assert_array_equal(t.ids, [f"{i}-t{j}" for i in g.ids for j in range(2)])
    np.testing.assert_array_equal(t.coord_rows, np.repeat(g.coord_rows, 2))
    rows = [set(splits[s].coord_rows.tolist()) for s in ev.SPLITS if s not in ("train", "test_shift")]
    assert [len(r) for r in rows] == [5000, 300, 300, 300]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not rows[i] & rows[j]
    held = ev.holdout_mask(coords.lat, coords.lon, cfg.holdout_deg, cfg.holdout_fraction, cfg.seed)
    assert held[splits["test_disjoint"].coord_rows].all()
    assert not held[splits["gallery"].coord_rows].any() and not held[splits["test"].coord_rows].any()
    # a different seed holds out different bins
    other = ev.holdout_mask(coords.lat, coords.lon, cfg.holdout_deg, cfg.holdout_fraction, 1)
    assert (held != other).mean() > 0.05


def test_the_shift_split_comes_from_geonames_country_balanced_and_is_deterministic():
    coords = ev.load_coordinates()
    cfg = ev.EarthViewsConfig(size=5000, n_val=300, n_test=300, n_test_disjoint=300, n_test_shift=500)
    splits = ev.make_splits(coords, cfg)
    shift, places = splits["test_shift"], ev.geonames_coordinates()
    np.testing.assert_array_equal(shift.ids, places.ids[shift.coord_rows])
    np.testing.assert_array_equal(shift.lat, places.lat[shift.coord_rows])
    np.testing.assert_array_equal(shift.lon, places.lon[shift.coord_rows])
    assert len(set(shift.ids.tolist())) == 500
    # never an MP16 coordinate, and not MP16's distribution: far more countries, little of North America
    mp16 = set(zip(coords.lat.tolist(), coords.lon.tolist()))
    assert not mp16 & set(zip(shift.lat.tolist(), shift.lon.tolist()))
    countries = places.country[shift.coord_rows]
    assert len(set(countries.tolist())) > 150 and np.mean(countries == "US") < 0.02
    g = splits["gallery"]
    us_box = lambda lat, lon: ((lat > 24) & (lat < 50) & (lon > -125) & (lon < -66)).mean()  # noqa: E731
    assert us_box(g.lat, g.lon) > 0.15 and us_box(shift.lat, shift.lon) < 0.05
    # the other splits do not depend on it; it depends only on (seed, n)
    none = ev.make_splits(coords, dataclasses.replace(cfg, n_test_shift=0))
    for name in ("gallery", "train", "val", "test", "test_disjoint"):
        np.testing.assert_array_equal(none[name].ids, splits[name].ids)
    assert len(none["test_shift"].ids) == 0
    np.testing.assert_array_equal(ev.make_splits(coords, cfg)["test_shift"].ids, shift.ids)
    other = ev.make_splits(coords, dataclasses.replace(cfg, seed=1))["test_shift"]
    assert len(set(other.ids.tolist()) & set(shift.ids.tolist())) < 50


def test_shift_rows_weighs_every_country_alike_and_avoids_given_coordinates():
    lat = np.arange(1100, dtype=np.float64) / 100
    country = np.array(["AA"] * 1000 + ["BB"] * 100)
    places = ev.Coordinates(np.array([f"p{i}" for i in range(1100)]), lat, lat.copy(), {}, country)
    rows = ev.shift_rows(places, 200, seed=0)
    share_b = np.mean(country[rows] == "BB")
    assert 0.35 < share_b < 0.65  # by place count it would be 0.09
    avoid = ev.Coordinates(np.array(["x"]), lat[1000:1050], lat[1000:1050], {})
    assert not set(ev.shift_rows(places, 200, 0, avoid=avoid).tolist()) & set(range(1000, 1050))
    with pytest.raises(GeoTokenError, match="n-test-shift"):
        ev.shift_rows(places, 1060, 0, avoid=avoid)


def write_coords(path, rows, header="id,lat,lon"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_gallery_reuses_coordinates_with_new_view_ids_when_asked_for_more(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"pt{i}", round(rng.uniform(-60, 60), 4), round(rng.uniform(-180, 180), 4)) for i in range(60)]
    coords = ev.load_coordinates(write_coords(tmp_path / "c.csv", rows))
    cfg = ev.EarthViewsConfig(size=100, n_val=5, n_test=5, n_test_disjoint=0, holdout_fraction=0.0)
    g = ev.make_splits(coords, cfg)["gallery"]
    assert len(g.ids) == 100 and len(set(g.ids)) == 100
    assert len(set(g.coord_rows.tolist())) == 50
    assert sum(i.endswith("-v1") for i in g.ids) == 50
    t = ev.make_splits(coords, dataclasses.replace(cfg, train_views=1))["train"]
    assert sorted(t.ids) == sorted(f"{i}-t0" for i in g.ids) and len(set(t.coord_rows.tolist())) == 50
    no_train = ev.make_splits(coords, dataclasses.replace(cfg, train_views=0))
    assert len(no_train["train"].ids) == 0 and len(no_train["gallery"].ids) == 100


@pytest.mark.parametrize(
    "rows, header, message",
    [
        ([("a", 10, 20), ("b", 95.5, 0)], "id,lat,lon", "line 3"),
        ([("a", 10, "east")], "id,lat,lon", "east"),
        ([("a", 10, 20), ("a", 11, 21)], "id,lat,lon", "duplicate id 'a'"),
        ([("a", 10, 20), ("a b", 10, 20)], "id,lat,lon", "data row 2, field 'id': value 'a b'"),
        ([("a", 10, 20)], "name,x,y", "bad.csv"),
    ],
)
def test_bad_coordinates_name_the_file_row_field_and_value(tmp_path, rows, header, message):
    path = write_coords(tmp_path / "bad.csv", rows, header)
    with pytest.raises(GeoTokenError) as err:
        ev.load_coordinates(path)
    assert message in str(err.value) and "bad.csv" in str(err.value)


# ---------------------------------------------------------------- the build


TINY = dataclasses.replace(
    ev.PRESETS["tiny"], size=60, n_val=6, n_test=6, n_test_disjoint=6, n_test_shift=6, shard_size=25
)


def read_shard(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.slow  # workers=2: a process pool
def test_build_is_byte_identical_resumable_and_a_rerun_is_a_no_op(tmp_path):
    a = ev.build_earthviews(tmp_path / "a", TINY, workers=1)
    b = ev.build_earthviews(tmp_path / "b", TINY, workers=2)
    assert a["content_hash"] == b["content_hash"] and a["files"] == b["files"]
    assert a["sizes"] == {
        "gallery": 60,
        "train": 120,
        "val": 6,
        "test": 6,
        "test_disjoint": 6,
        "test_shift": 6,
    }
    for name in a["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a complete build is a no-op
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    assert ev.build_earthviews(tmp_path / "a", TINY)["reused"]
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    # an interrupted build resumes and ends with the same bytes
    calls = []

    def stop_after_first_shard(done, total):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ev.build_earthviews(tmp_path / "c", TINY, progress=stop_after_first_shard)
    assert (tmp_path / "c" / "build.json").exists() and not (tmp_path / "c" / "dataset.json").exists()
    (tmp_path / "c" / ".train-00001.tar.x1y2.tmp").write_bytes(b"half a shard")  # as a SIGKILL leaves it
    c = ev.build_earthviews(tmp_path / "c", TINY)
    assert not list((tmp_path / "c").glob(".*.tmp")) and not list(tmp_path.glob(".c.*lock"))
    assert c["timings"]["rendered_views"] == 204 - 25
    assert c["content_hash"] == a["content_hash"]
    # another config does not silently mix with an existing build
    with pytest.raises(GeoTokenError, match="another config"):
        ev.build_earthviews(tmp_path / "a", dataclasses.replace(TINY, seed=1))
    d = ev.build_earthviews(tmp_path / "a", dataclasses.replace(TINY, seed=1), overwrite=True)
    assert d["content_hash"] != a["content_hash"]


def test_shards_and_manifests_follow_the_webdataset_and_manifest_formats(tmp_path):
    info = ev.build_earthviews(tmp_path, TINY)
    gallery_jpgs = set()
    for split in ev.SPLITS:
        lines = (tmp_path / f"{split}.csv").read_text().splitlines()
        assert lines[0] == "id,lat,lon,image" and len(lines) == 1 + info["sizes"][split]
        members = {}
        for shard in info["shards"][split]:
            members.update(read_shard(tmp_path / shard))
        for line in lines[1:]:
            vid, lat, lon, image = line.split(",")
            shard, member = image.split("#")
            assert member == f"{vid}.jpg" and shard in info["shards"][split]
            meta = json.loads(members[f"{vid}.json"])
            assert meta["key"] == vid and meta["status"] == "success" and meta["split"] == split
            assert (meta["latitude"], meta["longitude"]) == (float(lat), float(lon))
            with Image.open(io.BytesIO(members[member])) as im:
                assert im.format == "JPEG" and im.size == (meta["width"], meta["height"]) == (32, 32)
            digest = hashlib.sha256(members[member]).hexdigest()
            if split == "gallery":
                gallery_jpgs.add(digest)
            else:
                assert digest not in gallery_jpgs


def test_output_reads_back_through_the_manifest_and_image_readers(tmp_path):
    from geotoken.data.images import open_image
    from geotoken.data.manifest import manifest_from_shards, read_manifest

    info = ev.build_earthviews(tmp_path, TINY)
    m = read_manifest(tmp_path / "test_disjoint.csv", check_images="decode")
    assert len(m.ids) == 6 and m.lat.dtype == np.float64
    im = open_image(m.images[0])
    assert im.size == (32, 32)
    # the shards alone give the same table (ids, coordinates) from their json sidecars
    g = read_manifest(tmp_path / "gallery.csv")
    s = manifest_from_shards([tmp_path / f for f in info["shards"]["gallery"]])
    np.testing.assert_array_equal(s.ids, g.ids)
    np.testing.assert_array_equal(np.stack([s.lat, s.lon]), np.stack([g.lat, g.lon]))


def test_cli_builds_from_a_coords_file_and_reports_bad_input_in_one_line(tmp_path, capsys):
    from geotoken.cli import main

    rng = np.random.default_rng(1)
    rows = [
        (f"site_{i}", round(rng.uniform(-80, 80), 5), round(rng.uniform(-180, 180), 5)) for i in range(80)
    ]
    coords = write_coords(tmp_path / "sites.csv", rows)
    argv = ["data", "earthviews", "--out", str(tmp_path / "ev"), "--preset", "tiny", "--coords", str(coords)]
    argv += ["--size", "30", "--n-val", "4", "--n-test", "4", "--n-test-disjoint", "4", "--n-test-shift", "3"]
    argv += ["--workers", "1"]
    assert main(argv) == 0
    info = json.loads((tmp_path / "ev" / "dataset.json").read_text())
    assert info["sizes"] == {
        "gallery": 30,
        "train": 60,
        "val": 4,
        "test": 4,
        "test_disjoint": 4,
        "test_shift": 3,
    }
    assert info["sources"]["shift_coordinates"]["name"] == "geonames"
    assert info["sources"]["coordinates"]["file"] == "sites.csv"
    assert (tmp_path / "ev" / "test.csv").read_text().count("\nsite_") == 4
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    few = ["data", "earthviews", "--out", str(tmp_path / "few"), "--coords", str(coords), "--size", "10"]
    assert main(few) == 2  # the defaults' 1,000 val + 1,000 test from 80 places: every flag that helps, named
    assert "not enough for --n-val 1000 + --n-test 1000 and a gallery" in capsys.readouterr().err
    write_coords(tmp_path / "bad.csv", [("a", 10, 20), ("b", 10, 200)])
    argv[argv.index(str(coords))] = str(tmp_path / "bad.csv")
    argv[argv.index(str(tmp_path / "ev"))] = str(tmp_path / "ev2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.csv" in err and "line 3" in err
    # --train-views 0: no train split; --train-style: a named style
    argv[argv.index(str(tmp_path / "bad.csv"))] = str(coords)
    argv[argv.index(str(tmp_path / "ev2"))] = str(tmp_path / "ev3")
    assert main([*argv, "--train-views", "0"]) == 0
    info = json.loads((tmp_path / "ev3" / "dataset.json").read_text())
    assert info["sizes"]["train"] == 0 and info["sizes"]["gallery"] == 30
    assert main([*argv, "--train-style", "sunny"]) == 2 and "--train-style 'sunny'" in capsys.readouterr().err
    assert main([*argv, "--train-views", "-1"]) == 2 and "train_views must be >= 0" in capsys.readouterr().err
    # too few coordinates for the splits: refused before anything is written, so a fixed command starts clean
    few = tmp_path / "ev4"
    assert main([*argv[:3], str(few), *argv[4:], "--n-val", "400"]) == 2
    assert "lower --n-val / --n-test" in capsys.readouterr().err and not few.exists()
    assert main([*argv[:3], str(few), *argv[4:]]) == 0 and (few / "dataset.json").exists()


def test_train_views_show_gallery_places_in_other_views(tmp_path):
    info = ev.build_earthviews(tmp_path, TINY)
    assert info["sizes"]["train"] == 2 * info["sizes"]["gallery"]
    place = {
        r.split(",")[0]: r.split(",")[1:3] for r in (tmp_path / "gallery.csv").read_text().splitlines()[1:]
    }
    train_rows = [r.split(",") for r in (tmp_path / "train.csv").read_text().splitlines()[1:]]
    assert sorted(r[0] for r in train_rows) == sorted(f"{i}-t{j}" for i in place for j in range(2))
    assert all(r[1:3] == place[r[0].rsplit("-t", 1)[0]] for r in train_rows)
    gallery = {k: v for f in info["shards"]["gallery"] for k, v in read_shard(tmp_path / f).items()}
    train = {k: v for f in info["shards"]["train"] for k, v in read_shard(tmp_path / f).items()}
    views = {}  # gallery id -> its own view and its train views (json + jpg)
    for key in train:
        if key.endswith(".json"):
            gid = key[:-5].rsplit("-t", 1)[0]
            views.setdefault(gid, [json.loads(gallery[f"{gid}.json"])["view"]]).append(
                json.loads(train[key])["view"]
            )
    offsets = [tuple(map(tuple, (v["offset"] for v in vs))) for vs in views.values()]
    assert all(len(set(o)) == 3 for o in offsets)  # three views of one place: three random draws
    assert any(v["jpeg_quality"] != 90 for vs in views.values() for v in vs[1:])  # test-style JPEG range
    assert not {v for k, v in train.items() if k.endswith(".jpg")} & set(gallery.values())


def test_a_changed_shard_in_a_complete_build_is_reported_not_reused(tmp_path):
    info = ev.build_earthviews(tmp_path, TINY)
    shard = tmp_path / info["shards"]["test"][0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(GeoTokenError, match=r"test-00000\.tar: missing or changed"):
        ev.build_earthviews(tmp_path, TINY)
    assert ev.build_earthviews(tmp_path, TINY, overwrite=True)["content_hash"] == info["content_hash"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scale": (1.3, 0.5)}, r"view style scale must be \(lo, hi\) with 0 < lo <= hi"),
        ({"haze": -3.0}, r"view style haze must be in \[0, 1\], got -3.0"),
        (
            {"jpeg_quality": (40, 200)},
            r"view style jpeg_quality must be \(lo, hi\) with 1 <= lo <= hi <= 100",
        ),
        ({"other_layer_p": 7.0}, r"view style other_layer_p must be in \[0, 1\]"),
        ({"colour": -1.0}, r"view style colour must be >= 0"),
    ],
)
def test_a_view_style_is_checked_where_it_is_set(change, message):
    with pytest.raises(GeoTokenError, match=message):
        ev.ViewStyle(**change)


def test_a_config_names_a_style_or_gives_its_fields_and_sizes_are_checked_at_once():
    from geotoken.stages.runner import config_from_dict

    cfg = config_from_dict(ev.EarthViewsConfig, {"test_style": "strong", "train_style": {"haze": 0.1}}, "s")
    assert cfg.test_style == ev.TEST_STYLES["strong"] and cfg.train_style.haze == 0.1
    with pytest.raises(
        GeoTokenError, match="s.test_style: view style 'strongest': choose from light, medium"
    ):
        config_from_dict(ev.EarthViewsConfig, {"test_style": "strongest"}, "s")
    with pytest.raises(GeoTokenError, match="s: EarthViews config: size of split 'gallery' must be positive"):
        config_from_dict(ev.EarthViewsConfig, {"size": -5}, "s")  # (a dry run says it, not the build)
