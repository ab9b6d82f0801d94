"""`geotoken train` end to end on a small feature store and neighbour folder."""

import json

import numpy as np
import pytest

from geotoken.cli import main
from geotoken.model import GeoToken
from helpers import write_store


def make_store(root, n=64, seed=0):
    """Rows in 4 clusters; embeddings carry the cluster, so neighbours and targets are learnable."""
    rng = np.random.default_rng(seed)
    centres = np.array([[48.8, 2.3], [40.7, -74.0], [-33.9, 151.2], [35.7, 139.7]])
    cluster = np.arange(n) % 4
    coords = centres[cluster] + rng.normal(0, 0.5, (n, 2))
    arrays = {}
    for name, dim in {"visual": 16, "gps": 8}.items():
        x = rng.normal(0, 0.3, (n, dim))
        x[np.arange(n), cluster] += 1.0
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        arrays[name] = x.astype(np.float16)
    write_store(root, arrays, ids=[f"r{i}" for i in range(n)], coords=coords)
    return cluster


def make_neighbours(folder, cluster, k=5, seed=0):
    rng = np.random.default_rng(seed)
    n = len(cluster)
    rows = np.arange(n)
    nbr = (rows[:, None] + 4 * rng.integers(1, n // 4, (n, k))) % n  # same cluster, never itself
    folder.mkdir(parents=True)
    np.save(folder / "index.npy", nbr.astype(np.int64))
    np.save(folder / "sims.npy", np.ones((n, k), np.float32))


def test_train_command(tmp_path, capsys):
    pytest.importorskip("geotoken.s2")
    cluster = make_store(tmp_path / "store")
    make_neighbours(tmp_path / "nbr", cluster)
    args = ["train", "--features", str(tmp_path / "store"), "--neighbours", str(tmp_path / "nbr")]
    args += ["--out", str(tmp_path / "run"), "--preset", "tiny", "--modalities", "visual,gps", "--k", "3"]
    args += [
        "--level",
        "10",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--warmup-steps",
        "2",
        "--val-fraction",
        "0.25",
    ]
    args += ["--no-tensorboard", "--threads", "1"]
    assert main(args) == 0
    model = GeoToken.load(tmp_path / "run/best")
    assert model.cfg.modalities == {"visual": 16, "gps": 8} and model.cfg.k == 3 and model.cfg.n_tokens == 6
    logs = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    val = [r for r in logs if "val_loss" in r]
    assert len(val) == 2 and "val_acc_2500km" in val[-1]
    run = json.loads((tmp_path / "run/run.json").read_text())
    assert run["sources"]["features"] == str(tmp_path / "store")

    # a missing checkpoint with --resume, and a neighbour table pointing outside the gallery: one-line errors
    assert main(args[:-2] + ["--out", str(tmp_path / "other"), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = np.load(tmp_path / "nbr/index.npy")
    bad[3, 1] = 999
    np.save(tmp_path / "nbr/index.npy", bad)
    assert main(args[:-2] + ["--out", str(tmp_path / "bad")]) == 2
    assert "row 3 column 1 is 999" in capsys.readouterr().err
    np.save(tmp_path / "nbr/index.npy", np.load(tmp_path / "nbr/index.npy").clip(0, 63))
    # validating on the training store: said (best/ would be chosen by memorisation)
    same = [*args, "--out", str(tmp_path / "same"), "--val-features", str(tmp_path / "store"),
            "--val-neighbours", str(tmp_path / "nbr"), "--epochs", "1"]  # fmt: skip
    same.remove("--val-fraction"), same.remove("0.25")
    with pytest.warns(UserWarning, match="is the training store: validation measures memorisation"):
        assert main(same) == 0


@pytest.mark.slow  # timed loops
def test_bench_train_prints_one_json_object(capsys):
    args = ["bench", "train", "--preset", "tiny", "--batch-size", "2", "--iters", "1", "--threads", "1"]
    assert main(args + ["--gallery-rows", "300", "--json", "--reference"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in (
        "train_samples_per_s",
        "peak_rss_mb",
        "matmul_gflops_fp32",
        "matmul_gflops_bf16",
        "share_of_matmul_peak",
    ):
        assert res[key] > 0
    assert res["ratio_side_by_side"] == pytest.approx(
        res["train_samples_per_s"] / res["reference_samples_per_s"]
    )
    assert res["flops_per_step"] > 2 * 3 * 1e6 * 2  # forward + backward of a ~1M-parameter model on 2 samples
    assert 0 < res["attention_flops_per_step"] < res["flops_per_step"]
    shares = [  # one probe after each timed step; the share is the median of the pairs
        res["flops_per_step"] / s / (p * 1e9) for s, p in zip(res["step_seconds"], res["paired_peaks"])
    ]
    assert len(shares) == 1 and res["share_of_matmul_peak"] == pytest.approx(shares[0])
    assert res["matmul_gflops_fp32"] == pytest.approx(res["paired_peaks"][0])
    assert 0 < res["share_of_best_probe"] <= res["achieved_gflops"] / res["matmul_gflops_fp32"] + 1e-9
    from geotoken.devices import retain_freed_memory

    assert res["malloc_retains_freed_memory"] is retain_freed_memory()  # recorded as this machine applies it
    peak_s = res["flops_per_step"] / (res["matmul_gflops_fp32"] * 1e9)
    rest_s = (res["flops_per_step"] - res["attention_flops_per_step"]) / (res["matmul_gflops_fp32"] * 1e9)
    assert res["share_of_matmul_peak_bound"] == pytest.approx(
        peak_s / (res["attention_seconds_per_step"] + rest_s)
    )
    assert main(args + ["--gallery-rows", "0"]) == 2


def test_attention_cost_counts_every_layer_and_scales_with_the_batch():
    from geotoken.bench.train import attention_cost
    from geotoken.model import preset

    one, two = (attention_cost("tiny", b, iters=1) for b in (1, 2))
    assert two["flops"] == 2 * one["flops"] and one["seconds"] > 0
    cfg = preset("tiny", level=20, group=2, k=15)
    hd, S, T = cfg.d_model // cfg.n_heads, cfg.seq_len, cfg.n_tokens
    forward = 4 * cfg.n_heads * hd * (cfg.n_encoder_layers * S * S + cfg.n_decoder_layers * (T * T + T * S))
    assert 2 * forward < one["flops"] < 5 * forward  # forward plus a backward of 1-2.5x the forward
