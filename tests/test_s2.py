"""geotoken.s2 against the official s2geometry library: bit-identical cell ids, exact inverses, clear errors."""

import math

import numpy as np
import pytest
import s2geometry as s2

from geotoken import s2 as gs2
from geotoken.errors import GeoTokenError

_from_degrees, _cell_id = s2.S2LatLng.FromDegrees, s2.S2CellId


def reference_ids(lat, lon) -> np.ndarray:
    """Leaf cell ids from s2geometry, one point at a time."""
    return np.fromiter(map(_cell_id.id, map(_cell_id, map(_from_degrees, lat, lon))), dtype=np.uint64)


def random_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half uniform on the sphere, half uniform in lat/lon (more points near the poles)."""
    rng = np.random.default_rng(seed)
    half = n // 2
    lat = np.concatenate([np.degrees(np.arcsin(rng.uniform(-1, 1, half))), rng.uniform(-90, 90, n - half)])
    return lat, rng.uniform(-180, 180, n)


def edge_points() -> tuple[np.ndarray, np.ndarray]:
    """Poles, +-180, zeros, face centres, cube edges and corners, and points on and within 1e-12 deg of the
    corners and edges of random cells at every level."""
    corner = math.degrees(math.atan(1 / math.sqrt(2)))  # latitude of the cube corners
    lat = [90, -90, 90, -90, 0, 0, 0, 0, 0, 0, 0, 0, corner, -corner, corner, -corner, 45, -45, 45, 1e-300]
    lon = [0, 0, 180, -180, 0, 180, -180, 90, -90, 45, 135, -45, 45, 135, -135, -45, 0, 90, 180, -1e-300]
    lat, lon = np.array(lat, float), np.array(lon, float)
    rng = np.random.default_rng(7)
    seeds_lat, seeds_lon = random_points(310, 3)
    levels = np.repeat(np.arange(1, 32) % 31, 10)
    cells = np.array([gs2.latlon_to_cell_ids(a, b, int(k)) for a, b, k in zip(seeds_lat, seeds_lon, levels)])
    vertices = gs2.cell_vertices(cells)  # (310, 4, 2)
    edges = (vertices + np.roll(vertices, 1, axis=1)) / 2  # midpoints of the four edges
    anchors = np.concatenate([vertices, edges], axis=1).reshape(-1, 2)  # (2480, 2)
    offsets = rng.choice([0.0, 1e-12, -1e-12, 3e-13, -3e-13, 1e-14], size=(len(anchors), 2))
    points = np.clip(anchors + offsets, [-90, -180], [90, 180])
    return np.concatenate([lat, points[:, 0]]), np.concatenate([lon, points[:, 1]])


@pytest.mark.slow
def test_a_million_random_points_match_s2geometry_bit_for_bit():
    lat, lon = random_points(1_000_000, seed=0)
    ids = gs2.latlon_to_cell_ids(lat, lon)
    mismatch = np.flatnonzero(ids != reference_ids(lat.tolist(), lon.tolist()))
    assert mismatch.size == 0, f"{mismatch.size} mismatches, first at {lat[mismatch[0]]}, {lon[mismatch[0]]}"


def test_edge_cases_match_s2geometry_at_every_level():
    lat, lon = edge_points()
    leaves = reference_ids(lat.tolist(), lon.tolist())
    for level in range(gs2.MAX_LEVEL + 1):
        expected = np.array([_cell_id(int(i)).parent(level).id() for i in leaves[::7]], dtype=np.uint64)
        assert np.array_equal(gs2.latlon_to_cell_ids(lat[::7], lon[::7], level), expected), level
    assert np.array_equal(gs2.latlon_to_cell_ids(lat, lon), leaves)


def _nudged(sincos):
    """`sincos` off by up to ~2 ulp more, like a sloppier SIMD sin/cos."""

    def noisy(x):
        rng = np.random.default_rng(x.size)
        return tuple(v * (1 + rng.uniform(-4.5e-16, 4.5e-16, x.shape)) for v in sincos(x))

    return noisy


def test_inexact_fast_trigonometry_cannot_change_a_cell(monkeypatch):
    lat, lon = edge_points()
    leaves = reference_ids(lat.tolist(), lon.tolist())
    monkeypatch.setattr(gs2, "_sincos", _nudged(gs2._sincos))
    assert np.array_equal(gs2.latlon_to_cell_ids(lat, lon), leaves)
    # The libm fallback is what saves these points: without it the inexact sin/cos flip some cells.
    monkeypatch.setattr(gs2, "_ST_TOLERANCE", 0.0)
    assert not np.array_equal(gs2.latlon_to_cell_ids(lat, lon), leaves)


def test_fast_sincos_is_within_the_error_the_tolerance_assumes():
    angles = np.concatenate(
        [np.linspace(-math.pi, math.pi, 200_001), np.radians([-180, -90, 0, 45, 90, 180])]
    )
    sin, cos = gs2._sincos(angles)
    assert np.abs(sin - [math.sin(a) for a in angles]).max() < 1e-15
    assert np.abs(cos - [math.cos(a) for a in angles]).max() < 1e-15


def test_cell_centres_round_trip_at_every_level_and_match_s2geometry():
    lat, lon = random_points(600, seed=1)
    for level in range(gs2.MAX_LEVEL + 1):
        cells = gs2.latlon_to_cell_ids(lat, lon, level)
        c_lat, c_lon = gs2.cell_center(cells)
        assert np.array_equal(gs2.latlon_to_cell_ids(c_lat, c_lon, level), cells), level
        tokens = gs2.latlon_to_tokens(lat, lon, level, group=3)
        assert np.array_equal(gs2.tokens_to_latlon(tokens, level, group=3), (c_lat, c_lon))
        assert np.array_equal(gs2.ungroup_tokens(tokens, level, 3), gs2.cell_ids_to_tokens(cells, level))
        assert np.array_equal(gs2.tokens_to_cell_ids(gs2.cell_ids_to_tokens(cells, level), level), cells)
        ref = [_cell_id(int(c)).ToLatLng() for c in cells[:20]]
        np.testing.assert_allclose(c_lat[:20], [p.lat().degrees() for p in ref], rtol=0, atol=1e-12)
        np.testing.assert_allclose(c_lon[:20], [p.lng().degrees() for p in ref], rtol=0, atol=1e-12)


def test_vertices_parent_level_and_hex_match_s2geometry():
    lat, lon = random_points(124, seed=2)
    levels = np.arange(124) % 31
    cells = np.array([gs2.latlon_to_cell_ids(a, b, int(k)) for a, b, k in zip(lat, lon, levels)])
    vertices = gs2.cell_vertices(cells)
    assert vertices.shape == (124, 4, 2)
    for cell, corners in zip(cells, vertices):
        ref = s2.S2Cell(_cell_id(int(cell)))
        for k in range(4):
            p = s2.S2LatLng(ref.GetVertex(k))
            np.testing.assert_allclose(corners[k], [p.lat().degrees(), p.lng().degrees()], rtol=0, atol=1e-12)
    assert np.array_equal(gs2.cell_level(cells), levels)
    parents = gs2.cell_parent(cells, 0)
    assert np.array_equal(parents, [_cell_id(int(c)).parent(0).id() for c in cells])
    tokens = gs2.cell_ids_to_hex(cells)
    assert tokens.tolist() == [_cell_id(int(c)).ToToken() for c in cells]
    assert np.array_equal(gs2.hex_to_cell_ids(tokens), cells)
    assert np.array_equal(gs2.hex_to_cell_ids(np.strings.upper(tokens)), cells)
    assert gs2.cell_ids_to_hex([0]).tolist() == ["X"] and gs2.hex_to_cell_ids(["X"]).tolist() == [0]


def test_cell_ids_from_python_ints_keep_every_bit():
    ids = [0x89C2594000000000, 0x1000000000000000]  # NumPy alone would make this list float64
    assert gs2.cell_level(ids).tolist() == [11, 0]
    assert gs2.cell_ids_to_hex(ids).tolist() == ["89c2594", "1"]
    assert gs2.hex_to_cell_ids("89c2594") == ids[0]
    assert np.array_equal(gs2.cell_level(np.array(ids, dtype=np.uint64).view(np.int64)), [11, 0])
    lat, lon = gs2.cell_center(ids[0])  # Brooklyn
    assert abs(lat - 40.732) < 1e-3 and abs(lon + 73.959) < 1e-3
    for bad in ([-1], [1.5], [True]):
        with pytest.raises(GeoTokenError, match="S2 cell ids"):
            gs2.cell_level(bad)


def test_tokens_are_face_then_child_positions_as_s2geometry_numbers_them():
    lat, lon = random_points(200, seed=4)
    cells = gs2.latlon_to_cell_ids(lat, lon, 20)
    tokens = gs2.cell_ids_to_tokens(cells, 20)
    assert tokens.shape == (200, 21) and tokens.dtype == np.int64
    for cell, row in zip(cells, tokens):
        ref = _cell_id(int(cell))
        assert row.tolist() == [ref.face()] + [ref.child_position(k) for k in range(1, 21)]
    assert np.array_equal(gs2.tokens_to_cell_ids(tokens, 20), cells)


def test_grouping_puts_the_first_child_in_the_most_significant_digit():
    lat, lon = random_points(500, seed=5)
    children = gs2.latlon_to_tokens(lat, lon, level=20, group=1)
    grouped = gs2.latlon_to_tokens(lat, lon)  # level 20, group 2: the paper's 11 tokens
    assert grouped.shape == (500, 11) and grouped.dtype == np.int64
    assert gs2.vocab_sizes(20, 2) == [6] + [16] * 10
    assert np.array_equal(grouped[:, 0], children[:, 0])
    assert np.array_equal(grouped[:, 1:], 4 * children[:, 1::2] + children[:, 2::2])
    assert np.array_equal(gs2.group_tokens(children, 2), grouped)
    assert np.array_equal(gs2.ungroup_tokens(grouped, 20, 2), children)
    four = gs2.latlon_to_tokens(lat, lon, level=20, group=4)
    assert np.array_equal(four[:, 1:], 16 * grouped[:, 1::2] + grouped[:, 2::2])


def test_a_level_that_is_not_a_multiple_of_the_group_ends_with_a_shorter_group():
    assert gs2.vocab_sizes(21, 2) == [6] + [16] * 10 + [4]
    assert gs2.vocab_sizes(7, 3) == [6, 64, 64, 4]
    assert gs2.vocab_sizes(0, 2) == [6]
    lat, lon = random_points(300, seed=6)
    tokens = gs2.latlon_to_tokens(lat, lon, level=21, group=2)
    assert tokens.shape == (300, 12) and tokens[:, -1].max() <= 3
    children = gs2.latlon_to_tokens(lat, lon, level=21, group=1)
    assert np.array_equal(tokens[:, -1], children[:, -1])
    assert np.array_equal(gs2.ungroup_tokens(tokens, 21, 2), children)


def test_tokens_decode_to_the_cell_centre_within_a_level_20_cell():
    lat, lon = random_points(5000, seed=8)
    c_lat, c_lon = gs2.tokens_to_latlon(gs2.latlon_to_tokens(lat, lon))
    cells = gs2.latlon_to_cell_ids(lat, lon, 20)
    assert np.array_equal((c_lat, c_lon), gs2.cell_center(cells))
    # A level-20 cell is at most ~13 m across, so the centre is within ~10 m of the point.
    dlat, dlon = np.radians(c_lat - lat), np.radians(c_lon - lon)
    a = np.sin(dlat / 2) ** 2 + np.cos(np.radians(lat)) * np.cos(np.radians(c_lat)) * np.sin(dlon / 2) ** 2
    assert (2 * 6371e3 * np.arcsin(np.sqrt(a))).max() < 10


def test_shapes_are_preserved_and_longitudes_wrap():
    assert gs2.latlon_to_cell_ids(48.85, 2.35).shape == ()
    lat, lon = random_points(12, seed=9)
    assert gs2.latlon_to_tokens(lat.reshape(3, 4), lon.reshape(3, 4)).shape == (3, 4, 11)
    assert gs2.tokens_to_latlon(gs2.latlon_to_tokens(lat, lon).reshape(3, 4, 11))[0].shape == (3, 4)
    assert gs2.latlon_to_cell_ids(10, 190) == gs2.latlon_to_cell_ids(10, -170)
    assert gs2.latlon_to_cell_ids(-33, -300.5) == gs2.latlon_to_cell_ids(-33, 59.5)
    assert gs2.latlon_to_cell_ids(0, 540) == gs2.latlon_to_cell_ids(0, -180)
    assert gs2.latlon_to_cell_ids(0, 720) == gs2.latlon_to_cell_ids(0, 0)
    assert gs2.latlon_to_cell_ids([], []).shape == (0,)
    assert gs2.latlon_to_tokens([], []).shape == (0, 11)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: gs2.latlon_to_cell_ids([0, 1, np.nan], [0, 0, 0]), r"lat\[2\] = nan is not a finite number"),
        (lambda: gs2.latlon_to_cell_ids([0, 90.5], [0, 0]), r"lat\[1\] = 90\.5 is outside \[-90, 90\]"),
        (lambda: gs2.latlon_to_tokens([[0, 0], [0, 0]], [[0, 0], [0, np.inf]]), r"lon\[\(1, 1\)\] = inf"),
        (lambda: gs2.latlon_to_cell_ids([0, 1], [0, 1, 2]), "shape"),
        (lambda: gs2.latlon_to_cell_ids(0, 0, 31), "level = 31"),
        (lambda: gs2.latlon_to_tokens(0, 0, -1), "level = -1"),
        (lambda: gs2.latlon_to_tokens(0, 0, 20, 0), "group size \\(child indices per token\\) 0"),
        (lambda: gs2.tokens_to_latlon([[0] * 11, [6] + [0] * 10]), r"tokens\[1, 0\] = 6 .* 0\.\.5"),
        (lambda: gs2.tokens_to_latlon([[0] * 10 + [16]]), r"tokens\[0, 10\] = 16 .* 0\.\.15"),
        (lambda: gs2.tokens_to_latlon([[0] * 12]), "needs 11 tokens"),
        (lambda: gs2.ungroup_tokens([[0] * 11 + [-1]], 21, 2), r"grouped\[0, 11\] = -1"),
        (lambda: gs2.tokens_to_cell_ids([[1, 4]], 1), r"tokens\[0, 1\] = 4"),
        (lambda: gs2.cell_center([0x1000000000000000, 0]), r"ids\[1\] = 0x0000000000000000 is not a valid"),
        (lambda: gs2.cell_level([0xE000000000000000 | 1]), r"ids\[0\] = 0xe000000000000001"),
        (lambda: gs2.cell_parent([0x1000000000000000], 1), "level-0 cell, coarser than level 1"),
        (lambda: gs2.hex_to_cell_ids(["89c25", "89g"]), r"tokens\[1\] = '89g'"),
        (lambda: gs2.hex_to_cell_ids(["1" * 17]), "not an S2 cell token"),
    ],
)
def test_bad_input_names_the_first_offending_index_and_value(call, message):
    with pytest.raises(GeoTokenError, match=message):
        call()
