"""Training options of the paper's recipe: gradient accumulation, clipping off, AdamW's betas and weight-decay
groups, named recipes (YAML package data) with flags over them, `train --print-config`, the model stage."""

import json

import numpy as np
import pytest
import torch

from geotoken.cli import main
from geotoken.errors import GeoTokenError
from geotoken.model import GeoToken, preset
from geotoken.stages import ModelStageConfig, config_identity
from geotoken.stages.method import model_train_config
from geotoken.train import TrainConfig, TrainData, clip_gradients, grad_accum_for, train
from geotoken.train.loop import make_optimizer
from geotoken.train.recipes import RECIPE_DIR, RECIPES, load_recipe, resolve_train_config
from helpers import write_store

torch.set_num_threads(1)
MODS = {"visual": 12, "gps": 8}


def synthetic(n: int = 64, k: int = 6, seed: int = 0) -> TrainData:
    from geotoken.gallery import Gallery

    rng = np.random.default_rng(seed)
    emb = {m: rng.standard_normal((n, D)).astype(np.float16) for m, D in MODS.items()}
    face = np.arange(n) % 6
    tokens = np.concatenate([face[:, None], rng.integers(0, 16, (n, 3))], axis=1)  # level 6, group 2
    nbr = (np.arange(n)[:, None] + 6 * rng.integers(1, n // 6, (n, k))) % n
    return TrainData(emb, Gallery(emb, tokens), nbr.astype(np.int64), tokens)


def model_cfg(**kw):
    return preset(
        "tiny", **{**dict(d_model=32, n_heads=2, d_ff=64, level=6, group=2, k=4, modalities=MODS), **kw}
    )


def quiet(**kw) -> TrainConfig:
    base = dict(
        batch_size=8, warmup_steps=2, lr=1e-3, val_every=0, tensorboard=False, progress=False, log_every=1
    )
    return TrainConfig(**{**base, **kw})


def params(model: GeoToken) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


# ------------------------------------------------------------------------------ gradient accumulation
@pytest.mark.parametrize("arch", ["ours", "authors"])
def test_n_micro_batches_give_the_update_of_one_batch_n_times_larger(tmp_path, arch):
    """One optimizer step: the gradients (AdamW's first moment after one step, (1 - beta1) x gradient) and the
    parameters match. Where the true gradient is zero (the key biases: softmax ignores a shift) Adam turns
    rounding noise into +-lr, so parameters are compared where the gradient is not rounding noise."""
    from safetensors.torch import load_file

    data, mc = synthetic(), model_cfg(dropout=0.0, arch=arch, attn_dropout=0.0)  # no random masks
    runs = {
        "big": quiet(batch_size=16, max_steps=1),
        "acc": quiet(batch_size=4, grad_accum=4, max_steps=1),
        "small": quiet(batch_size=4, max_steps=1),  # a quarter of the rows: the comparison can fail
    }
    models = {name: params(train(mc, cfg, data, tmp_path / name)) for name, cfg in runs.items()}
    grads = {
        name: {
            k: t for k, t in load_file(tmp_path / name / "last/state.safetensors").items() if "exp_avg" in k
        }
        for name in runs
    }
    assert grads["big"].keys() == grads["acc"].keys() and len(grads["big"]) > 10
    peak = max(g.abs().max().item() for g in grads["big"].values())
    for key, g in grads["big"].items():
        torch.testing.assert_close(grads["acc"][key], g, atol=1e-6 * peak, rtol=1e-4, msg=key)
    assert any(not torch.allclose(grads["small"][k], g, atol=1e-3 * peak) for k, g in grads["big"].items())
    model = GeoToken(mc)
    names = [n for n, _ in model.named_parameters()]  # the optimizer's order (one group per kind, in order)
    order = [id(p) for g in make_optimizer(model, runs["big"]).param_groups for p in g["params"]]
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert sorted(by_id[i] for i in order) == sorted(names)
    for i, pid in enumerate(order):
        name, g = by_id[pid], grads["big"][f"opt.{i}.exp_avg"]
        real = g.abs() > 1e-5 * peak  # gradients that are not rounding noise
        a, b = models["big"][name][real], models["acc"][name][real]
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    logs = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("big", "acc")
    ]
    np.testing.assert_allclose(logs[1], logs[0], rtol=1e-5)  # the logged loss is the whole step's mean
    run = json.loads((tmp_path / "acc" / "run.json").read_text())
    assert (run["grad_accum"], run["effective_batch_size"]) == (4, 16)


def test_resume_with_accumulation_is_bit_identical(tmp_path):
    data, mc = synthetic(), model_cfg()  # dropout on: RNG state restored across micro-batches too
    cfg = quiet(batch_size=4, grad_accum=2, max_steps=8, checkpoint_every=3)
    full = train(mc, cfg, data, tmp_path / "full")
    train(mc, cfg, data, tmp_path / "part", stop_at=5)
    resumed = train(mc, cfg, data, tmp_path / "part", resume=True)
    a, b = params(full), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_effective_batch_size_derives_the_accumulation():
    cfg = TrainConfig(batch_size=128, effective_batch_size=2048)
    assert grad_accum_for(cfg, rows=20_000) == 16
    assert grad_accum_for(cfg, rows=20_000, world=4) == 4
    assert grad_accum_for(TrainConfig(batch_size=300, effective_batch_size=2048), 20_000) == 7  # rounded up
    assert grad_accum_for(cfg, rows=600) == 4  # more than the data: one step over 4 x 128 of the 600 rows
    assert grad_accum_for(cfg, rows=100) == 1  # fewer rows than a micro-batch: the loop says so
    assert grad_accum_for(TrainConfig(grad_accum=3), rows=10) == 3
    with pytest.raises(GeoTokenError, match="set one"):
        TrainConfig(grad_accum=2, effective_batch_size=2048)
    with pytest.raises(GeoTokenError, match="grad_accum 0"):
        TrainConfig(grad_accum=0)


def test_a_recipe_batch_larger_than_the_data_trains_one_step_per_epoch(tmp_path):
    data, mc = synthetic(n=40), model_cfg()
    with pytest.warns(UserWarning, match="effective batch size 2,048 asked, 40 taken"):  # and said so
        train(mc, quiet(batch_size=8, effective_batch_size=2048, epochs=2), data, tmp_path)
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["grad_accum"], run["effective_batch_size"]) == (5, 40)
    assert json.loads((tmp_path / "last" / "state.json").read_text())["step"] == 2


# ------------------------------------------------------------------------------ clipping, optimizer
def test_grad_clip_0_is_off_and_negative_is_refused(tmp_path):
    data, mc = synthetic(), model_cfg()
    off = train(mc, quiet(max_steps=3, grad_clip=0.0, weight_decay=0.0), data, tmp_path / "off")
    huge = train(mc, quiet(max_steps=3, grad_clip=1e12, weight_decay=0.0), data, tmp_path / "huge")
    init = GeoToken(mc).state_dict()
    a, b = params(off), params(huge)
    assert all(torch.equal(a[n], b[n]) for n in a)  # 0 = no clipping, not zero gradients
    assert any(not torch.equal(a[n], init[n]) for n in a if not n.startswith("head"))
    logs = [json.loads(line) for line in (tmp_path / "off" / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in logs)
    for bad in (-1.0, float("nan")):
        with pytest.raises(GeoTokenError, match="grad_clip"):
            TrainConfig(grad_clip=bad)


def test_clip_gradients_scales_only_when_asked():
    lin = torch.nn.Linear(3, 2)
    lin.weight.grad, lin.bias.grad = torch.full((2, 3), 2.0), torch.full((2,), 2.0)
    norm = clip_gradients(lin, 0.0)
    assert norm.item() == pytest.approx(np.sqrt(8 * 4.0)) and torch.equal(
        lin.weight.grad, torch.full((2, 3), 2.0)
    )
    clip_gradients(lin, 1.0)
    assert torch.cat([lin.weight.grad.flatten(), lin.bias.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)


def test_betas_and_weight_decay_groups():
    model = GeoToken(model_cfg())
    opt = make_optimizer(model, TrainConfig(betas=[0.9, 0.999], weight_decay=1e-6, weight_decay_on="all"))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert opt.param_groups[0]["weight_decay"] == 1e-6
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    ours = make_optimizer(model, TrainConfig())
    assert [g["weight_decay"] for g in ours.param_groups] == [0.01, 0.0] and ours.param_groups[0][
        "betas"
    ] == (0.9, 0.98)
    with pytest.raises(GeoTokenError, match="weight_decay_on"):
        TrainConfig(weight_decay_on="biases")
    with pytest.raises(GeoTokenError, match="betas"):
        TrainConfig(betas=(0.9, 1.5))


# ------------------------------------------------------------------------------ recipes
def test_the_paper_recipe_is_package_data_with_the_authors_values():
    assert "paper" in RECIPES and (RECIPE_DIR / "paper.yaml").is_file()
    cfg = resolve_train_config("paper")
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.weight_decay_on) == (5e-5, (0.9, 0.999), 1e-6, "all")
    assert (cfg.schedule, cfg.step_gamma, cfg.warmup_steps, cfg.grad_clip) == ("step", 0.9, 0, 0.0)
    assert (cfg.epochs, cfg.effective_batch_size, cfg.dtype, cfg.label_smoothing) == (50, 2048, "bf16", 0.0)
    assert "arch" not in load_recipe("paper")  # the model's layers are a separate choice


def test_overrides_win_over_the_recipe_and_bad_recipes_are_named(tmp_path):
    cfg = resolve_train_config("paper", epochs=3, lr=None, grad_accum=4)  # None: not given
    assert (cfg.epochs, cfg.lr, cfg.grad_accum, cfg.effective_batch_size) == (3, 5e-5, 4, 0)
    own = tmp_path / "mine.yaml"
    own.write_text("lr: 0.01\nbetas: [0.8, 0.9]\n")
    assert resolve_train_config(own).betas == (0.8, 0.9) and load_recipe(str(own))["lr"] == 0.01
    cases = {"lr: [1]\n": "field 'lr'", "learning_rate: 1\n": "learning_rate", "- 1\n": "mapping",
             "grad_clip: -1\n": "grad_clip", "schedule: linear\n": "schedule"}  # fmt: skip
    for text, message in cases.items():
        own.write_text(text)
        with pytest.raises(GeoTokenError, match=message):
            load_recipe(own)
    with pytest.raises(GeoTokenError, match="neither a YAML file nor one of paper"):
        load_recipe("papr")


# ------------------------------------------------------------------------------ CLI and the model stage
def test_print_config_resolves_recipe_flags_and_store_dims(tmp_path, capsys):
    write_store(
        tmp_path / "store", {"visual": np.zeros((4, 16), np.float16), "gps": np.zeros((4, 8), np.float16)}
    )
    args = ["train", "--recipe", "paper", "--arch", "authors", "--preset", "paper", "--epochs", "3"]
    args += ["--grad-clip", "0.5", "--features", str(tmp_path / "store"), "--modalities", "visual,gps"]
    assert main([*args, "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"] == "paper"
    assert out["model"]["arch"] == "authors" and out["model"]["d_model"] == 512
    assert out["model"]["modalities"] == {"visual": 16, "gps": 8} and out["model"]["attn_dropout"] == 0.1
    train = out["train"]
    assert (train["epochs"], train["grad_clip"], train["lr"], train["effective_batch_size"]) == (
        3,
        0.5,
        5e-5,
        2048,
    )
    assert main(["train", "--print-config"]) == 0  # no recipe, no store: the library's defaults
    out = json.loads(capsys.readouterr().out)
    assert out["train"] == json.loads(json.dumps(TrainConfig().__dict__)) and out["model"]["arch"] == "ours"
    assert main(["train", "--preset", "tiny"]) == 2  # training without data: one line naming the flags
    assert "--features, --neighbours, --out" in capsys.readouterr().err
    assert main(["train", "--grad-clip", "-1", "--print-config"]) == 2
    assert "grad_clip -1.0 must be >= 0" in capsys.readouterr().err


def test_model_stage_applies_arch_recipe_and_its_own_fields():
    plain = ModelStageConfig(epochs=6, batch_size=128, lr=1e-3, dtype="fp32")
    assert "arch" not in config_identity(plain) and "recipe" not in config_identity(plain)  # old folders stay
    paper = ModelStageConfig(epochs=6, batch_size=128, arch="authors", recipe="paper")
    assert config_identity(paper)["arch"] == "authors" and config_identity(paper)["recipe"] == "paper"
    cfg = model_train_config(paper, rows=20_000)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.dtype, cfg.warmup_steps) == (6, 128, 5e-5, "bf16", 0)
    assert grad_accum_for(cfg, 20_000) == 16 and cfg.grad_clip == 0.0 and cfg.weight_decay_on == "all"
    assert model_train_config(ModelStageConfig(recipe="paper", lr=1e-4, dtype="fp32"), 1000).lr == 1e-4
    ours = model_train_config(plain, rows=20_000)
    assert (ours.lr, ours.warmup_steps, ours.grad_clip, ours.checkpoint_every) == (1e-3, None, 1.0, 156)
    from geotoken.train.data import steps_per_epoch
    from geotoken.train.loop import warmup_steps

    assert (
        warmup_steps(ours, 6 * steps_per_epoch(20_000, 128)) == 93
    )  # the loop's own count: 156 steps an epoch
    # a checkpoint at least once an epoch (156 steps here), so a killed run loses less than one
    mp16 = model_train_config(ModelStageConfig(epochs=50, batch_size=2048, dtype="fp32"), rows=4_700_000)
    assert (
        mp16.checkpoint_every == 2294
    )  # 4.7M // 2048 steps an epoch (as the loop), not a quarter of 50 epochs
    short = model_train_config(ModelStageConfig(epochs=2, batch_size=128, dtype="fp32"), rows=1000)
    assert short.checkpoint_every == 50  # short runs: not more often than every 50 steps


@pytest.mark.slow  # timed loops
def test_bench_train_times_both_archs_side_by_side(capsys):
    args = ["bench", "train", "--preset", "tiny", "--batch-size", "2", "--iters", "1", "--threads", "1"]
    assert main([*args, "--gallery-rows", "300", "--arch", "authors", "--compare-archs", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["arch"] == "authors" and set(res["arch_samples_per_s"]) == {"ours", "authors"}
    assert res["ratio_authors_to_ours"] == pytest.approx(
        res["arch_samples_per_s"]["authors"] / res["arch_samples_per_s"]["ours"]
    )


def test_demo_passes_arch_and_recipe_to_the_model_stage():
    from geotoken.pipeline import demo_config, demo_pipeline

    plain = demo_pipeline(demo_config("demo"))["model"].config
    assert (plain.arch, plain.recipe, plain.lr, plain.dtype) == ("ours", "", 1e-3, "fp32")  # as before
    paper = demo_pipeline(demo_config("demo", arch="authors", recipe="paper", epochs=2))["model"].config
    assert (paper.arch, paper.recipe, paper.lr, paper.dtype, paper.epochs) == (
        "authors",
        "paper",
        None,
        None,
        2,
    )
    cfg = model_train_config(
        paper, rows=20_000
    )  # the recipe's lr and bf16, the demo's epochs and micro-batch
    assert (cfg.lr, cfg.dtype, cfg.epochs, cfg.batch_size, grad_accum_for(cfg, 20_000)) == (
        5e-5,
        "bf16",
        2,
        128,
        16,
    )
    own = demo_pipeline(demo_config("demo", recipe="paper", lr=1e-3, dtype="fp32"))["model"].config
    assert model_train_config(own, 20_000).lr == 1e-3 and model_train_config(own, 20_000).dtype == "fp32"
