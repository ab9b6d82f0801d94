"""Offline reverse geocoding into place descriptions."""

import numpy as np
import pytest

from geotoken.errors import GeoTokenError
from geotoken.places import describe, format_place, place_names


def test_known_cities_vectorized():
    lat = np.array([48.8566, 35.6895, -33.8688, 21.9])
    lon = np.array([2.3522, 139.6917, 151.2093, -159.6])
    places = place_names(lat, lon)
    assert [p["city"] for p in places[:3]] == ["Paris", "Tokyo", "Sydney"]
    assert [p["country_code"] for p in places] == ["FR", "JP", "AU", "US"]
    assert places[2]["region"] == "New South Wales" and places[3]["region"] == "Hawaii"
    assert all(p["distance_km"] < 25 for p in places)
    assert describe(48.8566, 2.3522) == ["a photo taken in Paris, Île-de-France, France"]
    assert place_names([], []) == []


def test_far_from_any_city_keeps_only_the_country():
    (open_sea,) = place_names(0.0, -140.0)
    assert open_sea["city"] and open_sea["distance_km"] > 500  # the nearest city, however far
    assert describe(0.0, -140.0, max_km=100) == [f"a photo taken in {open_sea['country']}"]
    assert describe(0.0, -140.0, max_km=100, template="{city}") == ["a photo"]


@pytest.mark.parametrize(
    "place, template, want",
    [
        ({"city": "Paris", "region": "Île-de-France", "country": "France"}, None, "a photo taken in Paris, Île-de-France, France"),
        ({"city": "Singapore", "region": "", "country": "Singapore"}, None, "a photo taken in Singapore"),
        ({"city": "", "region": "Bavaria", "country": "Germany"}, None, "a photo taken in Bavaria, Germany"),
        ({"city": "Lyon", "region": "", "country": "France", "country_code": "FR"}, "{city} ({country_code})", "Lyon (FR)"),
        ({"city": "Lyon", "region": "", "country": "France", "country_code": "FR"}, "{city}, {region}", "Lyon"),
        ({}, None, "a photo"),
    ],
)  # fmt: skip
def test_format_place_skips_empty_and_repeated_parts(place, template, want):
    assert format_place(place, *([template] if template else [])) == want


def test_bad_input_names_the_row_or_field():
    with pytest.raises(GeoTokenError, match="row 1"):
        place_names([10.0, 95.0], [0.0, 0.0])
    with pytest.raises(GeoTokenError, match="equal-length"):
        place_names([1.0, 2.0], [3.0])
    with pytest.raises(GeoTokenError, match="unknown fields"):
        describe(48.85, 2.35, template="a photo in {town}")
