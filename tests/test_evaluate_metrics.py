"""Bootstrap metrics and paired comparisons on hand-made cases."""

import numpy as np
import pytest

from geotoken.errors import GeoTokenError
from geotoken.evaluate.metrics import (
    MethodMetrics,
    PairedComparison,
    bootstrap_metrics,
    markdown_table,
    metrics_markdown,
    paired_comparison,
    table_rows,
)

T = (1, 25, 200, 750, 2500)


def test_all_or_none_correct_keeps_an_interval_of_real_width():
    # Wilson at 30 of 30: [n / (n + z^2), 1] = [0.8865, 1]; at 0 of 30: [0, z^2 / (n + z^2)] = [0, 0.1135]
    m = bootstrap_metrics(np.zeros(30), T, n_boot=200)
    for t in T:
        assert (m.accuracy[t].value, m.accuracy[t].hi) == (1.0, 1.0)
        assert m.accuracy[t].lo == pytest.approx(30 / (30 + 1.959964**2), abs=1e-6)
    assert (m.median_km.value, m.median_km.lo, m.median_km.hi) == (0.0, 0.0, 0.0)
    assert m.n == 30
    none = bootstrap_metrics(np.full(30, 5000.0), T, n_boot=200).accuracy[1.0]
    assert (none.value, none.lo) == (0.0, 0.0) and none.hi == pytest.approx(0.113513, abs=1e-6)
    one = bootstrap_metrics(np.array([5000.0] * 29 + [0.1]), T, n_boot=200).accuracy[1.0]
    assert (round(one.lo, 4), round(one.hi, 4)) == (0.0059, 0.1667)  # Wilson's 1 of 30, by hand
    with pytest.raises(GeoTokenError, match="n_boot .* must be a whole number >= 1, got 0"):
        bootstrap_metrics(np.zeros(3), T, n_boot=0)


def test_score_intervals_cover_the_true_share_and_difference():
    """Coverage of the 95% intervals over simulated evaluations of 40 images, near 0 % where a percentile
    bootstrap misses: each must hold the truth in 93-98 % of 2,000 draws."""
    from geotoken.evaluate.metrics import paired_share_interval, wilson_interval

    rng = np.random.default_rng(0)
    n, draws = 40, 2000
    for p in (0.03, 0.3):
        hits = rng.random((draws, n)) < p
        lo, hi = wilson_interval(hits.sum(1), n)
        assert 0.93 <= np.mean((lo <= p) & (p <= hi)) <= 0.98
    # two correlated methods: b hits where a does, and more (true difference -0.1)
    covered = 0
    for _ in range(draws):
        u = rng.random((n, 1))
        a, b = u < 0.2, u < 0.3
        d, lo, hi = paired_share_interval(a, b)
        covered += lo[0] <= -0.1 <= hi[0]
        assert lo[0] <= d[0] <= hi[0]
    assert 0.93 <= covered / draws <= 0.99


def test_known_shares_and_medians():
    # 10 images: 1 within 1 km, 3 within 25, 5 within 200, 8 within 750, 9 within 2500, one at 10000 km
    e = np.array([0.5, 10, 20, 100, 150, 300, 400, 700, 2000, 10000.0])
    m = bootstrap_metrics(e, T, n_boot=300, seed=1)
    assert [m.accuracy[t].value for t in T] == [0.1, 0.3, 0.5, 0.8, 0.9]
    assert m.median_km.value == 225.0  # even n: mean of 150 and 300
    assert m.mean_km.value == pytest.approx(e.mean())
    for est in [*m.accuracy.values(), m.median_km, m.mean_km]:
        assert est.lo <= est.value <= est.hi
    # a threshold exactly on an error counts as within (<=)
    assert bootstrap_metrics(np.array([25.0, 26.0]), (25,), n_boot=10).accuracy[25].value == 0.5


def test_odd_median_and_determinism():
    e = np.array([5.0, 1.0, 9.0])
    assert bootstrap_metrics(e, T, n_boot=50).median_km.value == 5.0
    a = bootstrap_metrics(np.arange(500.0), T, n_boot=200, seed=3)
    b = bootstrap_metrics(np.arange(500.0), T, n_boot=200, seed=3)
    c = bootstrap_metrics(np.arange(500.0), T, n_boot=200, seed=4)
    assert a == b
    assert a.median_km != c.median_km


def test_interval_covers_truth_and_has_binomial_width():
    rng = np.random.default_rng(0)
    n, scale = 20000, 500.0
    e = rng.exponential(scale, n)  # P(e <= t) = 1 - exp(-t / scale), median = scale ln 2
    m = bootstrap_metrics(e, T, n_boot=400, seed=0)
    for t in T:
        p = 1 - np.exp(-t / scale)
        est = m.accuracy[t]
        assert est.lo <= p <= est.hi, (t, p, est)
        if 0.01 < p < 0.99:
            expected = 2 * 1.96 * np.sqrt(p * (1 - p) / n)
            assert 0.75 * expected < est.hi - est.lo < 1.25 * expected
    assert m.median_km.lo <= scale * np.log(2) <= m.median_km.hi
    assert m.mean_km.lo <= scale <= m.mean_km.hi


def test_point_values_are_the_plain_statistics():
    e = np.random.default_rng(5).lognormal(5, 2, 777)
    m = bootstrap_metrics(e, T, n_boot=20)
    assert all(m.accuracy[t].value == pytest.approx((e <= t).mean()) for t in T)
    assert m.median_km.value == pytest.approx(np.median(e))
    assert m.mean_km.value == pytest.approx(e.mean())


def test_bad_errors_name_the_row():
    with pytest.raises(GeoTokenError, match="row 2"):
        bootstrap_metrics(np.array([1.0, 2.0, np.nan]), T)
    with pytest.raises(GeoTokenError, match="row 0"):
        bootstrap_metrics(np.array([-1.0]), T)
    with pytest.raises(GeoTokenError, match="0 images"):
        bootstrap_metrics(np.array([]), T)


def test_paired_comparison_sign_and_symmetry():
    rng = np.random.default_rng(2)
    b = rng.exponential(800, 3000)
    a = b * 0.5  # a is better on every image
    ab = paired_comparison(a, b, ("a", "b"), T, n_boot=300)
    ba = paired_comparison(b, a, ("b", "a"), T, n_boot=300)
    for t in (25, 200, 750):
        assert ab.accuracy[t].value > 0 and ab.accuracy[t].lo > 0  # significant improvement
        assert ba.accuracy[t].value == -ab.accuracy[t].value
        assert ba.accuracy[t].hi == pytest.approx(-ab.accuracy[t].lo)
    assert ab.median_km.hi < 0 and ab.mean_km.hi < 0
    same = paired_comparison(b, b, ("b", "b"), T, n_boot=50)
    assert all(
        e.value == 0 and e.lo < 0 < e.hi for e in same.accuracy.values()
    )  # no difference, not certainty
    # paired intervals are narrower than the difference of two independent intervals
    ma, mb = bootstrap_metrics(a, T, n_boot=300), bootstrap_metrics(b, T, n_boot=300)
    width_indep = (ma.accuracy[200].hi - ma.accuracy[200].lo) + (mb.accuracy[200].hi - mb.accuracy[200].lo)
    assert ab.accuracy[200].hi - ab.accuracy[200].lo < width_indep


def test_paired_needs_same_images():
    with pytest.raises(GeoTokenError, match="same images"):
        paired_comparison(np.ones(3), np.ones(4), ("x", "y"), T)


def test_tables_and_json_round_trip():
    m = bootstrap_metrics(np.array([0.5, 10, 300, 5000.0]), T, n_boot=50)
    assert MethodMetrics.from_dict(m.to_dict()) == m
    assert list(m.to_dict()["accuracy"]) == ["1", "25", "200", "750", "2500"]
    header, rows = table_rows({"nn": m})
    assert header[:3] == ["method", "n", "1 km %"]
    assert rows[0][0] == "nn" and rows[0][2].startswith("25.0 [")
    md = metrics_markdown({"nn": m}, [paired_comparison(np.zeros(4), np.ones(4), ("a", "b"), T, n_boot=20)])
    assert "| nn | 4 | 25.0 [" in md and "| a - b | 4 |" in md
    assert markdown_table(["x", "y"], [["1", "2"]]) == "| x | y |\n|---|---|\n| 1 | 2 |\n"


def test_from_dict_round_trips_and_names_the_bad_field():
    p = paired_comparison(np.zeros(4), np.ones(4), ("a", "b"), T, n_boot=20)
    assert PairedComparison.from_dict(p.to_dict()) == p
    entry = bootstrap_metrics(np.array([0.5, 10, 300, 5000.0]), T, n_boot=20).to_dict()
    del entry["mean_km"]
    with pytest.raises(GeoTokenError, match=r"missing field 'methods\.nn\.mean_km'"):
        MethodMetrics.from_dict(entry, "methods.nn")
    entry["mean_km"] = {"value": 1.0, "lo": None, "hi": 2.0}
    with pytest.raises(GeoTokenError, match=r"field 'methods\.nn\.mean_km\.lo' should be a number"):
        MethodMetrics.from_dict(entry, "methods.nn")
    with pytest.raises(GeoTokenError, match=r"missing field 'paired\[0\]\.a'"):
        PairedComparison.from_dict({"b": "x"}, "paired[0]")


def test_a_narrow_console_keeps_every_column():
    """`geotoken demo` prints into a 150-column console when not on a terminal; rich shrank the short `n`
    column to nothing there rather than wrap a line."""
    import io

    from rich.console import Console

    from geotoken.evaluate.metrics import print_tables

    results = {
        f"method-{name}-with-a-long-label": bootstrap_metrics(np.arange(1234.0), T, n_boot=20)
        for name in "ab"
    }
    buffer = io.StringIO()
    print_tables(results, console=Console(file=buffer, width=60, color_system=None))
    header = next(line for line in buffer.getvalue().splitlines() if "method" in line)
    assert "┃┃" not in header and " n " in header
    assert "1234" in buffer.getvalue() or "1,234" in buffer.getvalue()  # the count is shown


def test_paired_intervals_hold_on_a_test_set_of_osv5m_size():
    """The 2 x 2 table's margin product is ~n^4 / 16: in int64 it wrapped from n ~ 55,000 (OSV-5M's test set
    is 210,000), giving zero-width intervals. The width shrinks as 1 / sqrt(n), nothing else."""
    rng = np.random.default_rng(0)
    n = 200_000
    a = rng.random(n) * 3000
    b = np.where(rng.random(n) < 0.05, rng.random(n) * 3000, a)
    big = paired_comparison(a, b, n_boot=10).accuracy
    small = paired_comparison(a[: n // 10], b[: n // 10], n_boot=10).accuracy
    for t in (200.0, 750.0, 2500.0):
        assert big[t].lo < big[t].value < big[t].hi
        ratio = (small[t].hi - small[t].lo) / (big[t].hi - big[t].lo)
        assert 2.5 < ratio < 4.0, (t, ratio)  # sqrt(10) = 3.16
