"""Calibration: temperature fitting, ECE, reliability plots, confidences from candidate pools."""

import numpy as np
import pytest

from geotoken.errors import GeoTokenError
from geotoken.search.calibration import (
    Calibration,
    apply_temperature,
    calibration_data,
    calibration_report,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    prefix_confidence,
    prefix_correct,
    reliability_plot,
    within_confidence,
)
from geotoken.search.candidates import Candidates
from geotoken.search.select import select


def test_ece_by_hand():
    conf = np.array([0.05, 0.05, 0.95, 0.95])
    assert expected_calibration_error(conf, np.array([0, 0, 1, 1])) == pytest.approx(0.05)
    # all in one bin at 0.9 with 50% right: |0.5 - 0.9|
    assert expected_calibration_error(np.full(4, 0.9), np.array([1, 0, 1, 0])) == pytest.approx(0.4)


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.02, 0.98, 20000)
    outcome = rng.random(20000) < true_p
    overconfident = apply_temperature(true_p, 1 / 2.5)  # logits x 2.5
    t = fit_temperature(overconfident, outcome)
    assert t == pytest.approx(2.5, rel=0.08)
    fixed = apply_temperature(overconfident, t)
    assert (
        expected_calibration_error(fixed, outcome) < 0.02 < expected_calibration_error(overconfident, outcome)
    )
    assert fit_temperature(true_p, outcome) == pytest.approx(1.0, rel=0.08)
    with pytest.raises(GeoTokenError):
        fit_temperature(np.ones(3), np.ones(2))


def test_prefix_confidence_and_correctness():
    probs = np.array([[0.9, 0.5, 0.5]])
    np.testing.assert_allclose(prefix_confidence(probs), [[0.9, 0.45, 0.225]])
    assert prefix_correct(np.array([[1, 2, 3]]), np.array([[1, 5, 3]])).tolist() == [[True, False, False]]


def _pool():
    # image 0: mass 0.6 near Paris, 0.3 in Tokyo; image 1: scattered
    lat = np.array([[48.85, 48.95, 35.68, 10.0], [0.0, 20.0, 40.0, -40.0]])
    lon = np.array([[2.35, 2.45, 139.65, 10.0], [0.0, 20.0, 40.0, -40.0]])
    p = np.array([[0.4, 0.2, 0.3, 0.1], [0.3, 0.3, 0.2, 0.2]])
    tokens = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    level_probs = np.repeat(p[:, :, None] ** (1 / 3), 3, axis=2)  # prefix probabilities p^(t+1)/3
    return Candidates(tokens, np.log(p), lat, lon, level_probs)


def test_within_confidence_and_calibration_roundtrip(tmp_path):
    pool = _pool()
    sel = select(pool, "logp")
    # 50 km: cells of the last token (T = 3); the two Paris candidates count, Tokyo does not
    np.testing.assert_allclose(within_confidence(pool, sel.lat, sel.lon, 50.0), [0.6, 0.3])
    # 2500 km: the prefix of tokens 0..1 (S2 level 2 with group 2): p ** (2/3) each
    np.testing.assert_allclose(
        within_confidence(pool, sel.lat, sel.lon, 2500.0), [0.4 ** (2 / 3) + 0.2 ** (2 / 3), 0.3 ** (2 / 3)]
    )
    np.testing.assert_allclose(within_confidence(pool, sel.lat, sel.lon, 25000.0), [1.0, 1.0])
    # candidates sharing the prefix count once
    shared = Candidates(
        np.zeros((1, 2, 3), int) + [[[0], [0]]],
        np.log([[0.5, 0.4]]),
        np.zeros((1, 2)),
        np.zeros((1, 2)),
        np.full((1, 2, 3), 0.5),
    )
    np.testing.assert_allclose(within_confidence(shared, np.zeros(1), np.zeros(1), 50.0), [0.125])
    true_lat, true_lon = np.array([48.9, 50.0]), np.array([2.4, 50.0])
    data = calibration_data(pool, sel, true_lat, true_lon, pool.tokens[:, 0], radii_km=(25, 200))
    assert data["within"][25.0][1].tolist() == [True, False]
    cal = fit_calibration(data)
    assert len(cal.within) == 2 and len(cal.levels) == 3
    cal.save(tmp_path / "cal.json")
    again = Calibration.load(tmp_path / "cal.json")
    assert again == cal
    probs = again.within_probs(pool, sel.lat, sel.lon)
    assert set(probs) == {"25km", "200km"}
    levels = again.level_probs(pool.level_probs[:, 0])
    assert (np.diff(levels, axis=1) <= 0).all()
    report = calibration_report(data, cal, plot=tmp_path / "rel.png")
    assert set(report) == {"within_25km", "within_200km", "levels"}
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text('{"radii_km": [25], "within": []}')
    with pytest.raises(GeoTokenError, match="bad.json"):
        Calibration.load(tmp_path / "bad.json")


def test_reliability_plot_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    c = rng.random(500)
    reliability_plot({"a": (c, rng.random(500) < c)}, tmp_path / "r.png", title="t")
    assert (tmp_path / "r.png").stat().st_size > 1000
