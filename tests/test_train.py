"""Training: batch assembly, data order, schedule, checkpoints that resume to the bit, validation, DDP."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from geotoken.cli.train import training_summary
from geotoken.errors import GeoTokenError
from geotoken.gallery import Gallery
from geotoken.model import GeoToken, preset
from geotoken.train import (
    VAL_DECODER,
    TrainConfig,
    TrainData,
    batch_rows,
    epoch_order,
    lr_at,
    steps_per_epoch,
    train,
)

torch.set_num_threads(1)
MODS = {"visual": 12, "gps": 8}


def synthetic(n: int = 64, k: int = 6, seed: int = 0, coords: bool = False) -> TrainData:
    """Queries = gallery (as on MP16). The neighbours share the query's face token, so a model that reads
    the retrieved tokens can predict it; the finer tokens are noise."""
    rng = np.random.default_rng(seed)
    emb = {m: rng.standard_normal((n, D)).astype(np.float16) for m, D in MODS.items()}
    face = np.arange(n) % 6
    tokens = np.concatenate([face[:, None], rng.integers(0, 16, (n, 3))], axis=1)  # level 6, group 2
    nbr = (np.arange(n)[:, None] + 6 * rng.integers(1, n // 6, (n, k))) % n  # same face, never itself
    xy = np.stack([rng.uniform(-80, 80, n), rng.uniform(-180, 180, n)], 1) if coords else None
    return TrainData(emb, Gallery(emb, tokens), nbr.astype(np.int64), tokens, xy)


def model_cfg(**kw):
    base = dict(d_model=32, n_heads=2, d_ff=64, level=6, group=2, k=4, modalities=MODS)
    return preset("tiny", **{**base, **kw})


def quiet(**kw) -> TrainConfig:
    base = dict(
        batch_size=8, warmup_steps=2, lr=1e-3, val_every=0, tensorboard=False, progress=False, log_every=1
    )
    return TrainConfig(**{**base, **kw})


def weights_hash(model: GeoToken) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_batch_is_gathered_by_indexing():
    data = synthetic()
    rows = np.array([5, 0, 63])
    b = data.batch(rows, model_cfg(k=4))
    assert b.query["visual"].shape == (3, 12) and b.query["visual"].dtype == torch.float32
    assert b.nbr["gps"].shape == (3, 4, 8) and b.nbr_tokens.shape == (3, 4, 4) and b.targets.shape == (3, 4)
    n = data.neighbours[63, 2]
    np.testing.assert_array_equal(
        b.nbr["gps"][2, 2].numpy(), data.gallery.embeddings["gps"][n].astype(np.float32)
    )
    np.testing.assert_array_equal(b.nbr_tokens[2, 2].numpy(), data.gallery.tokens[n])
    np.testing.assert_array_equal(b.targets.numpy(), data.query_tokens[rows])


def test_check_names_the_bad_field():
    data = synthetic()
    data.neighbours[7, 1] = 10_000
    with pytest.raises(GeoTokenError, match="row 7 column 1 is 10000"):
        data.check(model_cfg())
    data.neighbours[7, 1] = -1  # a row the retrieval stage skipped: not an error, just not used
    data.check(model_cfg())
    assert not data.usable(4)[7] and data.usable(4).sum() == 63
    with pytest.raises(GeoTokenError, match="'text'"):
        synthetic().check(preset("tiny", level=6, group=2, k=4, modalities={**MODS, "text": 4}))
    with pytest.raises(GeoTokenError, match="k=9"):
        synthetic().check(model_cfg(k=9))


def test_rows_without_k_neighbours_are_counted_and_all_of_them_is_an_error(tmp_path, capsys):
    data, mc = synthetic(), model_cfg()
    data.neighbours[:5, 1] = -1
    train(mc, quiet(max_steps=1), data, tmp_path / "some")
    assert "5 of 64 training rows have fewer than k = 4 neighbours" in capsys.readouterr().out
    data.neighbours[:, 3] = -1
    with pytest.raises(GeoTokenError, match="64 of 64 training rows .* train with a smaller k"):
        train(mc, quiet(max_steps=1), data, tmp_path / "none")


def test_bf16_on_a_cpu_without_bf16_units_is_said(tmp_path, capsys, monkeypatch):
    import geotoken.train.loop as loop

    data, mc = synthetic(), model_cfg()
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    train(mc, quiet(max_steps=1, dtype="bf16"), data, tmp_path / "emulated")
    assert "bf16 on a CPU without bf16 units" in capsys.readouterr().out
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    train(mc, quiet(max_steps=1, dtype="bf16"), data, tmp_path / "native")
    train(mc, quiet(max_steps=1), data, tmp_path / "fp32")
    assert "bf16 units" not in capsys.readouterr().out


def test_data_order_is_a_disjoint_deterministic_shard_per_rank():
    order = epoch_order(100, seed=3, epoch=2)
    np.testing.assert_array_equal(order, epoch_order(100, seed=3, epoch=2))
    assert not np.array_equal(order, epoch_order(100, seed=3, epoch=1))
    assert steps_per_epoch(100, 8, world=3) == 4
    shards = [batch_rows(order, s, 8, r, 3) for s in range(4) for r in range(3)]
    seen = np.concatenate(shards)
    assert len(seen) == 96 and len(np.unique(seen)) == 96
    with pytest.raises(GeoTokenError, match="fewer than one batch"):
        steps_per_epoch(5, 8)


def test_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 110, 20) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 110, 20) == pytest.approx(1.0)
    assert lr_at(cfg, 60, 110, 20) == pytest.approx(0.55)
    assert lr_at(cfg, 110, 110, 20) == pytest.approx(0.1)
    short = TrainConfig(lr=1.0)  # default warm-up: a tenth of a short run, at most 100 steps
    assert lr_at(short, 4, 50, 10) == pytest.approx(1.0) and lr_at(short, 49, 1000, 10) == pytest.approx(0.5)
    step = TrainConfig(lr=1.0, warmup_steps=0, schedule="step", step_gamma=0.9)
    assert lr_at(step, 45, 100, 20) == pytest.approx(0.81)
    with pytest.raises(GeoTokenError, match="schedule"):
        TrainConfig(schedule="linear")
    for bad, message in (
        ({"epochs": 0}, "epochs 0 must be >= 1"),
        ({"checkpoint_every": 0}, "checkpoint_every 0 must be >= 1"),
        ({"label_smoothing": 1.5}, "label_smoothing 1.5 must be in"),
        ({"weight_decay": -1}, "weight_decay -1"),
        ({"warmup_steps": -5}, "warmup_steps -5"),
        ({"lr": float("nan")}, "lr nan must be > 0"),
    ):
        with pytest.raises(GeoTokenError, match=message):
            TrainConfig(**bad)
    assert TrainConfig(epochs=0, max_steps=10).max_steps == 10
    # as a user passes them: NumPy scalars become Python numbers (they go to JSON), a string is named
    cfg = TrainConfig(lr=np.float32(1e-3), batch_size=np.int64(8))
    assert type(cfg.lr) is float and type(cfg.batch_size) is int
    with pytest.raises(GeoTokenError, match="training option lr must be float, got '1e-3'"):
        TrainConfig(lr="1e-3")


def test_resume_is_bit_identical(tmp_path):
    data, mc = synthetic(), model_cfg()
    cfg = quiet(max_steps=8, checkpoint_every=4)  # dropout 0.1 is on: RNG state must be restored too
    full = train(mc, cfg, data, tmp_path / "full")
    part = train(mc, cfg, data, tmp_path / "part", stop_at=4)
    assert json.loads((tmp_path / "part/last/state.json").read_text())["step"] == 4
    assert training_summary(tmp_path / "part").startswith("stopped at step 4 of 8: ")
    assert "rerun with --resume" in training_summary(tmp_path / "part")
    assert weights_hash(part) != weights_hash(full)
    resumed = train(mc, cfg, data, tmp_path / "part", resume=True)
    assert training_summary(tmp_path / "part").startswith("trained model: ")
    assert weights_hash(resumed) == weights_hash(full)
    from safetensors.torch import load_file

    sa, sb = (
        load_file(tmp_path / "full/last/state.safetensors"),
        load_file(tmp_path / "part/last/state.safetensors"),
    )
    assert sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)
    logs = [json.loads(line) for line in (tmp_path / "part/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 9))
    fresh = train(mc, cfg, data, tmp_path / "fresh", resume=True)  # nothing to resume: starts from scratch
    assert weights_hash(fresh) == weights_hash(full)


def test_a_resume_continues_the_same_run_only(tmp_path):
    data, mc = synthetic(), model_cfg()
    cfg = quiet(max_steps=8, checkpoint_every=4)
    train(mc, cfg, data, tmp_path / "run", stop_at=4)
    with pytest.raises(GeoTokenError, match="already holds a training run"):
        train(mc, cfg, data, tmp_path / "run")  # not silently retrained over
    with pytest.raises(GeoTokenError, match=r"lr 0.001 -> 0.01.*max_steps 8 -> 16"):
        train(mc, dataclasses.replace(cfg, lr=1e-2, max_steps=16), data, tmp_path / "run", resume=True)
    # a kill after step 6's log line but before its checkpoint: the resumed run logs steps 5-8 once
    with open(tmp_path / "run/log.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + json.dumps({"step": 6, "loss": 9.0}) + '\n{"st')
    train(mc, dataclasses.replace(cfg, checkpoint_every=2), data, tmp_path / "run", resume=True)
    logs = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 9)) and 9.0 not in [r["loss"] for r in logs]


def test_a_resume_on_other_rows_is_refused_and_a_validation_set_without_rows_is_validated(tmp_path):
    """Another holdout (--val-fraction / --val-max) or another store on resume trained on rows that were
    held out, with exit 0; a `val_data` given without `val_rows` ran no validation, and said nothing."""
    data, mc = synthetic(), model_cfg()
    cfg = quiet(max_steps=8, checkpoint_every=4)
    rows = np.arange(64)
    train(mc, cfg, data, tmp_path / "run", train_rows=rows[:56], val_rows=rows[56:], stop_at=4)
    with pytest.raises(GeoTokenError, match="its training rows were others"):
        train(mc, cfg, data, tmp_path / "run", train_rows=rows[:50], val_rows=rows[50:], resume=True)
    with pytest.raises(GeoTokenError, match="its training rows were others"):
        train(
            mc,
            cfg,
            synthetic(seed=1),
            tmp_path / "run",
            train_rows=rows[:56],
            val_rows=rows[56:],
            resume=True,
        )
    train(
        mc, cfg, data, tmp_path / "run", train_rows=rows[:56], val_rows=rows[56:], resume=True
    )  # the same: fine
    train(mc, quiet(max_steps=4, val_every=2), data, tmp_path / "val", val_data=synthetic(n=16, seed=2))
    logs = [json.loads(line) for line in (tmp_path / "val" / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in logs) and (tmp_path / "val" / "best").is_dir()


def test_training_learns_and_keeps_the_best_checkpoint(tmp_path):
    data, mc = synthetic(n=96), model_cfg(dropout=0.0)
    cfg = quiet(max_steps=60, checkpoint_every=1000, val_every=1, lr=3e-3, log_every=10)
    rows = np.arange(96)
    model = train(mc, cfg, data, tmp_path, train_rows=rows[:80], val_rows=rows[80:])
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    vals = [r for r in logs if "val_loss" in r]
    assert len(vals) == 6  # 10 steps per epoch, validation after each
    assert losses[-1] < losses[0] - 0.2  # the face token is learnable, the rest is noise (floor 1.85)
    assert vals[-1]["val_face_acc"] > 0.5  # copied from the first neighbour (chance 1/6)
    best = json.loads((tmp_path / "best/metrics.json").read_text())
    assert best["val_score"] == max(v["val_score"] for v in vals)
    assert GeoToken.load(tmp_path / "best").cfg == model.cfg
    assert {"model.safetensors", "config.json", "state.safetensors", "state.json"} <= {
        p.name for p in (tmp_path / "last").iterdir()
    }


@pytest.mark.slow
def test_compiled_training_follows_eager_training(tmp_path):
    """`--compile` (torch.compile, ~30 s to compile here) trains the same model: no dropout, so the only
    difference is the order of floating-point operations in the fused kernels."""
    data, mc = synthetic(), model_cfg(dropout=0.0)
    from torch._dynamo.utils import counters

    eager = train(mc, quiet(max_steps=3), data, tmp_path / "eager")
    counters.clear()
    compiled = train(mc, quiet(max_steps=3, compile=True), data, tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did capture the model
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("eager", "compiled")
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_validation_reports_km_accuracy(tmp_path):
    pytest.importorskip("geotoken.s2")
    pytest.importorskip("geotoken.geo")
    from geotoken.s2 import latlon_to_tokens

    data = synthetic(coords=True)
    data.query_tokens = data.gallery.tokens = latlon_to_tokens(
        data.query_coords[:, 0], data.query_coords[:, 1], 6, 2
    )
    cfg = quiet(max_steps=8, val_every=1)
    train(model_cfg(), cfg, data, tmp_path, train_rows=np.arange(48), val_rows=np.arange(48, 64))
    val = [
        json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "val_loss" in line
    ]
    assert 0.0 <= val[-1]["val_acc_2500km"] <= 1.0 and val[-1]["val_median_km"] > 0
    # which decoder validation uses is written beside its figures (free greedy, unlike +gallery rows)
    assert val[-1]["val_decoder"] == VAL_DECODER == "greedy, unconstrained"
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["val_decoder"] == VAL_DECODER
    assert json.loads((tmp_path / "run.json").read_text())["val_decoder"] == VAL_DECODER


def test_validation_can_use_the_test_decoder(tmp_path):
    """val_constrain: validation greedy-decodes under the gallery constraint, as evaluate's +gallery rows."""
    from geotoken.s2 import latlon_to_tokens, vocab_sizes
    from geotoken.search.decode import PrefixConstraint, greedy, sample
    from geotoken.train import VAL_DECODERS

    data = synthetic(coords=True)
    data.query_tokens = data.gallery.tokens = latlon_to_tokens(
        data.query_coords[:, 0], data.query_coords[:, 1], 6, 2
    )  # 64 gallery cells of the 24,576 at level 6: free greedy leaves them, constrained greedy cannot
    cfg = quiet(max_steps=4, val_every=1, val_constrain=True)
    train(model_cfg(), cfg, data, tmp_path, train_rows=np.arange(48), val_rows=np.arange(48, 64))
    val = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines() if "val_loss" in s]
    assert val[-1]["val_decoder"] == VAL_DECODERS[True] == "greedy, gallery-constrained"
    model = GeoToken.load(tmp_path / "last").eval()
    constraint = PrefixConstraint(data.gallery.tokens, vocab_sizes(6, 2))
    with torch.no_grad():
        batch = data.batch(np.arange(48, 64), model.cfg)
        free, _ = greedy(model, batch)
        tokens, logp = greedy(model, batch, constraint)
        pool = sample(model, model.encode(batch), 1, temperature=0.0, constraint=constraint)
    assert constraint.contains(tokens.numpy()).all() and not constraint.contains(free.numpy()).all()
    np.testing.assert_array_equal(tokens.numpy(), pool.tokens[:, 0])
    np.testing.assert_allclose(logp.numpy(), pool.logp[:, 0], rtol=1e-5, atol=1e-5)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    model = train(model_cfg(), quiet(max_steps=4, checkpoint_every=2), synthetic(), out)
    with open(os.path.join(out, f"rank{rank}.sha"), "w") as f:
        f.write(weights_hash(model))
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # 2 processes (gloo)
def test_ddp_two_processes_stay_identical(tmp_path, free_port):
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, free_port, str(tmp_path)), nprocs=2, start_method="fork"
    )
    h0, h1 = (tmp_path / "rank0.sha").read_text(), (tmp_path / "rank1.sha").read_text()
    assert h0 == h1
    assert weights_hash(GeoToken.load(tmp_path / "last")) == h0  # rank 0 wrote the checkpoint
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["world"] == 2
    state = json.loads((tmp_path / "last/state.json").read_text())
    assert state["step"] == 4 and state["world"] == 2


def _ddp_half_run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train(model_cfg(dropout=0.0), quiet(max_steps=4, checkpoint_every=2), synthetic(), out, stop_at=2)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # 2 processes (gloo)
def test_a_ddp_run_logs_the_global_loss_and_resumes_in_one_process_at_the_same_global_batch(
    tmp_path, free_port
):
    """2 processes x batch 8 is one process x batch 16: the logged loss is the mean over the global batch
    (it was rank 0's half), and one process resumes the run only at that global batch (at 8 it silently
    took twice the steps and reread rows)."""
    torch.multiprocessing.start_processes(
        _ddp_half_run, args=(2, free_port, str(tmp_path / "ddp")), nprocs=2, start_method="fork"
    )
    mc, data = model_cfg(dropout=0.0), synthetic()
    one = train(mc, quiet(max_steps=4, checkpoint_every=2, batch_size=16), data, tmp_path / "one")
    logs = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("ddp", "one")}  # fmt: skip
    np.testing.assert_allclose(
        [r["loss"] for r in logs["ddp"]], [r["loss"] for r in logs["one"][:2]], rtol=1e-5
    )
    with pytest.raises(GeoTokenError, match=r"global batches of 16 rows a step \(2 process\(es\) x 8 rows\)"):
        train(mc, quiet(max_steps=4, checkpoint_every=2), data, tmp_path / "ddp", resume=True)
    resumed = train(
        mc, quiet(max_steps=4, checkpoint_every=2, batch_size=16), data, tmp_path / "ddp", resume=True
    )
    for a, b in zip(resumed.state_dict().values(), one.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_effective_batch_size_that_cannot_be_met_is_said(tmp_path):
    data, mc = synthetic(), model_cfg()
    with pytest.warns(
        UserWarning, match=r"effective batch size 20 asked, 24 taken \(1 process\(es\) x batch size 8 x 3"
    ):
        train(mc, quiet(max_steps=1, effective_batch_size=20), data, tmp_path / "a")
    with pytest.warns(UserWarning, match=r"256 asked, 64 taken .*at most one step over the 64 training rows"):
        train(mc, quiet(max_steps=1, effective_batch_size=256), data, tmp_path / "b")


def test_non_finite_inputs_stop_training_before_they_reach_the_weights(tmp_path):
    """A NaN query row (an unreadable image's, say) makes a NaN loss: the run stops at that step, naming
    the inputs, and the model it checkpointed before stays finite; a finished run is in eval mode."""
    data, mc = synthetic(), model_cfg()
    good = train(mc, quiet(max_steps=2), data, tmp_path / "good")
    assert not good.training
    data.query["visual"][5] = np.nan  # in a batch of the first epoch (8 batches of 8)
    with pytest.raises(
        GeoTokenError, match=r"training step \d+: the loss is nan .* check the inputs for NaN rows"
    ):
        train(mc, quiet(max_steps=8, checkpoint_every=1), data, tmp_path / "bad")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "bad" / "last" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_training_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    train(
        model_cfg(), quiet(max_steps=1), synthetic(), tmp_path / "run"
    )  # seeds its own streams from cfg.seed
    assert torch.equal(torch.rand(3), want)


def test_lists_and_bad_row_numbers_as_a_user_passes_them(tmp_path):
    data = synthetic()
    as_lists = TrainData(data.query, data.gallery, data.neighbours.tolist(), data.query_tokens.tolist())
    assert as_lists.neighbours.dtype == np.int64 and as_lists.rows == data.rows
    with pytest.raises(GeoTokenError, match="train_rows: rows 0..99, but arrays has 64 rows"):
        train(model_cfg(), quiet(max_steps=1), data, tmp_path / "run", train_rows=np.arange(100))


def test_validation_options_that_would_be_ignored_or_swap_the_split_are_refused(capsys):
    from geotoken.cli import main
    from geotoken.train.data import holdout_rows

    base = ["train", "--features", "/nonexistent/f", "--neighbours", "/nonexistent/n", "-o", "/nonexistent/o"]
    with pytest.raises(SystemExit):
        main([*base, "--val-max", "-5"])  # held out 595 of 600 rows and trained on 5
    assert "--val-max: must be >= 0" in capsys.readouterr().err
    with pytest.raises(GeoTokenError, match=r"validation rows at most \(--val-max\) -5 must be >= 0"):
        holdout_rows(600, 0.05, -5, 0)
    with pytest.raises(GeoTokenError, match="neither their embeddings nor their tokens are read"):
        model_cfg(use_neighbour_embeddings=False, use_neighbour_tokens=False)


def test_best_breaks_a_tie_of_accuracies_by_the_validation_loss_and_refuses_a_nan_one(tmp_path, monkeypatch):
    import geotoken.train.loop as loop

    data, mc, rows = synthetic(), model_cfg(), np.arange(64)
    seen = iter([(0.5, 2.0), (0.5, 1.0), (0.5, 1.5)])  # one accuracy three times, the loss best second

    def validate(model, val_data, val_rows, cfg, dev):
        score, val_loss = next(seen)
        return {"val_loss": val_loss, "val_score": score}

    monkeypatch.setattr(loop, "validate", validate)
    cfg = quiet(max_steps=21, checkpoint_every=100, val_every=1, batch_size=8)  # 7 steps an epoch
    train(mc, cfg, data, tmp_path / "run", train_rows=rows[:56], val_rows=rows[56:])
    assert json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())["step"] == 14
    monkeypatch.setattr(loop, "validate", lambda *a: {"val_loss": float("nan"), "val_score": 0.1})
    with pytest.raises(GeoTokenError, match="the validation loss is nan: check the validation inputs"):
        train(mc, cfg, data, tmp_path / "nan", train_rows=rows[:56], val_rows=rows[56:])
