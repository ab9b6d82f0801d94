"""geotoken.geo: great-circle distances against hand-computed values; bad coordinates named."""

import math

import numpy as np
import pytest

from geotoken.errors import GeoTokenError
from geotoken.geo import EARTH_RADIUS_KM, haversine_km

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


def test_haversine_rejects_bad_coordinates_by_name_and_index():
    with pytest.raises(GeoTokenError, match=r"lat2\[1\] = 91\.0 is outside \[-90, 90\]"):
        haversine_km([0, 0], [0, 0], [0, 91], [0, 0])
    with pytest.raises(GeoTokenError, match=r"lon1\[0\] = nan is not a finite number"):
        haversine_km([0], [np.nan], [0], [0])
    with pytest.raises(GeoTokenError, match="do not broadcast"):
        haversine_km([0, 1], [0, 1], [0, 1, 2], [0, 1, 2])
