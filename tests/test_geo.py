"""geotoken.geo: distances against hand-computed values and geographiclib; metrics, tables, JSON."""

import json
import math

import numpy as np
import pytest
from geographiclib.geodesic import Geodesic

from geotoken.errors import GeoTokenError
from geotoken.geo import (
    EARTH_RADIUS_KM,
    THRESHOLDS_KM,
    GeoMetrics,
    format_table,
    geo_metrics,
    geodesic_km,
    haversine_km,
)

DEGREE_KM = 2 * math.pi * EARTH_RADIUS_KM / 360  # 111.19492664... km of great circle per degree
PARIS, LONDON = (48.8566, 2.3522), (51.5074, -0.1278)


def test_haversine_hand_computed_distances():
    # Paris-London: equirectangular estimate sqrt(2.6508^2 + (2.4800 cos 50.18)^2) deg = 0.05393 rad -> 343.6 km
    assert haversine_km(*PARIS, *LONDON) == pytest.approx(343.556, abs=1e-3)
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_KM, rel=1e-15)  # antipodes
    assert haversine_km(30, 40, -30, -140) == pytest.approx(math.pi * EARTH_RADIUS_KM, rel=1e-12)
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(DEGREE_KM, rel=1e-12)  # across the antimeridian
    assert haversine_km(10, -180, 10, 180) == pytest.approx(0, abs=1e-9)
    assert haversine_km(90, 0, 90, 123) == pytest.approx(0, abs=1e-9)  # the pole, any longitude
    assert haversine_km(89, 0, 89, 180) == pytest.approx(2 * DEGREE_KM, rel=1e-12)  # over the pole
    assert haversine_km(90, 0, -90, 0) == pytest.approx(math.pi * EARTH_RADIUS_KM, rel=1e-15)
    assert haversine_km(0, 0, 0, 0) == 0


def test_haversine_broadcasts_and_is_symmetric():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-90, 90, 50), rng.uniform(-180, 180, 50)
    matrix = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])  # (50, 50)
    assert matrix.shape == (50, 50)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-9)
    np.testing.assert_allclose(np.diag(matrix), 0, atol=1e-9)
    assert haversine_km(lat, lon, 0.0, 0.0).shape == (50,)


def test_geodesic_hand_computed_distances():
    a_km = 6378.137
    assert geodesic_km(0, 0, 0, 1) == pytest.approx(
        a_km * math.pi / 180, rel=1e-12
    )  # 1 deg along the equator
    assert geodesic_km(90, 0, -90, 0) == pytest.approx(20003.931458623, abs=1e-6)  # pole to pole (meridian)
    assert geodesic_km(0, 0, 90, 0) == pytest.approx(20003.931458623 / 2, abs=1e-6)
    assert geodesic_km(0, 0, 0, 180) == pytest.approx(
        20003.931458623, abs=1e-6
    )  # shortest path is via a pole
    assert geodesic_km(0, 179.5, 0, -179.5) == pytest.approx(a_km * math.pi / 180, rel=1e-12)
    assert geodesic_km(*PARIS, *LONDON) == pytest.approx(343.923, abs=1e-3)
    assert geodesic_km(12, 34, 12, 34) == 0


def test_geodesic_matches_geographiclib_including_nearly_antipodal_pairs():
    rng = np.random.default_rng(1)
    lat1, lon1 = np.degrees(np.arcsin(rng.uniform(-1, 1, 400))), rng.uniform(-180, 180, 400)
    lat2, lon2 = np.degrees(np.arcsin(rng.uniform(-1, 1, 400))), rng.uniform(-180, 180, 400)
    lat2[:40] = -lat1[:40] + rng.normal(0, 1e-3, 40)  # nearly antipodal: Vincenty alone does not converge
    lon2[:40] = np.remainder(lon1[:40] + rng.normal(0, 1e-3, 40), 360) - 180
    expected = [
        Geodesic.WGS84.Inverse(*pair, Geodesic.DISTANCE)["s12"] / 1000 for pair in zip(lat1, lon1, lat2, lon2)
    ]
    np.testing.assert_allclose(geodesic_km(lat1, lon1, lat2, lon2), expected, rtol=0, atol=1e-6)  # 1 mm
    assert geodesic_km(lat1.reshape(20, 20), lon1.reshape(20, 20), 0, 0).shape == (20, 20)


@pytest.mark.parametrize("distance", [haversine_km, geodesic_km])
def test_distances_reject_bad_coordinates_by_name_and_index(distance):
    with pytest.raises(GeoTokenError, match=r"lat2\[1\] = 91\.0 is outside \[-90, 90\]"):
        distance([0, 0], [0, 0], [0, 91], [0, 0])
    with pytest.raises(GeoTokenError, match=r"lon1\[0\] = nan is not a finite number"):
        distance([0], [np.nan], [0], [0])
    with pytest.raises(GeoTokenError, match="do not broadcast"):
        distance([0, 1], [0, 1], [0, 1, 2], [0, 1, 2])


def test_geo_metrics_counts_errors_at_or_below_each_threshold():
    m = geo_metrics([0.5, 25.0, 100.0, 1000.0, 3000.0])
    assert m.n == 5
    assert m.thresholds == tuple(float(t) for t in THRESHOLDS_KM)
    assert [m.accuracy[t] for t in THRESHOLDS_KM] == [0.2, 0.4, 0.6, 0.6, 0.8]
    assert m.median_km == 100.0
    assert m.mean_km == pytest.approx(825.1)
    custom = geo_metrics([0.2, 0.7, 3.0, 8.0], thresholds=(0.5, 5))
    assert custom.accuracy == {0.5: 0.25, 5.0: 0.75}
    assert custom.median_km == pytest.approx(1.85)


def test_geo_metrics_round_trips_through_json_and_prints_as_a_table():
    m = geo_metrics(np.random.default_rng(2).lognormal(5, 2, 1001), thresholds=(0.5, 25, 200))
    text = json.dumps(m.to_dict())
    assert json.loads(text)["accuracy"].keys() == {"0.5", "25", "200"}
    assert GeoMetrics.from_dict(json.loads(text)) == m
    table = format_table({"GeoToken": m, "baseline": geo_metrics([1.0, 30.0], thresholds=(25, 2500))})
    lines = table.splitlines()
    assert lines[0].split() == [
        "n",
        "0.5",
        "km",
        "25",
        "km",
        "200",
        "km",
        "2500",
        "km",
        "median",
        "km",
        "mean",
        "km",
    ]
    assert lines[1].split()[:2] == ["GeoToken", "1001"]
    assert lines[2].split() == ["baseline", "2", "-", "50.0%", "-", "100.0%", "15.5", "15.5"]
    assert f"{100 * m.accuracy[25.0]:.1f}%" in lines[1]
    assert str(m).splitlines()[1].startswith("result")


def test_geo_metrics_rejects_bad_errors_and_thresholds():
    with pytest.raises(GeoTokenError, match=r"row 2 = nan"):
        geo_metrics([1.0, 2.0, np.nan])
    with pytest.raises(GeoTokenError, match=r"row 0 = -1\.0"):
        geo_metrics([-1.0])
    with pytest.raises(GeoTokenError, match="0 images"):
        geo_metrics([])
    with pytest.raises(GeoTokenError, match="increasing"):
        geo_metrics([1.0], thresholds=(25, 1))
    with pytest.raises(GeoTokenError, match="positive"):
        geo_metrics([1.0], thresholds=(0, 1))
    with pytest.raises(GeoTokenError, match="not a GeoMetrics"):
        GeoMetrics.from_dict({"n": 3})
