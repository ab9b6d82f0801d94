"""The training loop: AdamW, warm-up + cosine (or the paper's per-epoch step) schedule, clipping, bf16
autocast, gradient accumulation, checkpoints that resume to the bit, validation with greedy decoding, DDP
under torchrun. Named recipes (the paper's: `geotoken.train.recipes`) are sets of `TrainConfig` fields.

One optimizer step reads one global batch of `batch_size * grad_accum * world` rows: each process takes
its `batch_size * grad_accum` rows and runs them as `grad_accum` micro-batches of `batch_size`, each
micro-batch's loss weighted by its share of the rows, so the update equals one batch that large.

Output folder:
    run.json            model + training config, data sources
    last/               model.safetensors, config.json, state.safetensors, state.json (resume from here)
    best/               model.safetensors, config.json, metrics.json (best validation so far)
    log.jsonl           one JSON object per logged step and per validation
    tb/                 TensorBoard events
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from geotoken.devices import Dist, distributed, own_random_state, torch_device
from geotoken.encoders.base import cpu_has_bf16
from geotoken.errors import GeoTokenError
from geotoken.geo import THRESHOLDS_KM, haversine_km
from geotoken.io import (
    atomic_dir,
    atomic_path,
    check_types,
    load_optimizer,
    optimizer_tensors,
    read_json,
    read_safetensors,
    write_json,
)
from geotoken.model import DTYPES, GeoToken, ModelConfig, precision
from geotoken.s2 import tokens_to_latlon, vocab_sizes
from geotoken.search.decode import PrefixConstraint, greedy
from geotoken.train.data import TrainData, batch_rows, epoch_order, steps_per_epoch

SCHEDULES = ("cosine", "step")  # learning-rate decay after warm-up (see `lr_at`)
WEIGHT_DECAY_ON = ("matrices", "all")  # which parameters AdamW decays (see `make_optimizer`)


@dataclass
class TrainConfig:
    lr: float = 3e-4
    warmup_steps: int | None = None  # None: min(100, total steps // 10), so a short run still reaches lr
    schedule: str = "cosine"  # "cosine" to min_lr_ratio * lr, or "step": x step_gamma per epoch (the paper)
    min_lr_ratio: float = 0.05
    step_gamma: float = 0.9
    weight_decay: float = 0.01
    weight_decay_on: str = "matrices"  # "matrices" (not biases, norms, embeddings) or "all" (the paper)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's; the paper: PyTorch's default (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping (the norm is still logged)
    batch_size: int = 256  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    # > 0: the global batch to reach; grad_accum is then derived from it (`grad_accum_for`)
    effective_batch_size: int = 0
    epochs: int = 10
    max_steps: int = 0  # > 0: stop after this many steps (overrides epochs)
    label_smoothing: float = 0.0
    drop_near_km: float = 0.0  # > 0: a share of training queries lose their neighbours within this many km
    drop_near_share: float = 0.5  # ... this share (train.data.drop_near_neighbours)
    dtype: str = "fp32"  # "bf16": autocast (GPU or CPU); weights and optimizer stay fp32
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 500  # steps; and at the end
    val_every: int = 1  # epochs (0: never)
    val_batch_size: int = 512
    val_constrain: bool = (
        False  # validate with the gallery-constrained greedy decoder (evaluate's +gallery rows)
    )
    log_every: int = 20
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self, "training option")
        if self.schedule not in SCHEDULES:
            raise GeoTokenError(f"schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            raise GeoTokenError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise GeoTokenError(f"batch_size {self.batch_size} must be >= 1")
        if self.weight_decay_on not in WEIGHT_DECAY_ON:
            raise GeoTokenError(
                f"weight_decay_on {self.weight_decay_on!r}: choose one of {', '.join(WEIGHT_DECAY_ON)}"
            )
        if not self.grad_clip >= 0:  # NaN too
            raise GeoTokenError(f"grad_clip {self.grad_clip} must be >= 0 (0: no clipping)")
        if self.grad_accum < 1 or self.effective_batch_size < 0:
            raise GeoTokenError(
                f"grad_accum {self.grad_accum} must be >= 1 and effective_batch_size "
                f"{self.effective_batch_size} >= 0"
            )
        if self.effective_batch_size and self.grad_accum != 1:
            raise GeoTokenError(
                f"grad_accum {self.grad_accum} and effective_batch_size {self.effective_batch_size}: set one "
                "(effective_batch_size derives grad_accum from batch_size and the process count)"
            )
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise GeoTokenError(f"betas {self.betas}: two numbers in [0, 1)")
        self.betas = betas
        ranges = {  # field: (holds, what it must be)
            "lr": (self.lr > 0, "> 0"),
            "epochs": (self.epochs >= 1 or self.max_steps > 0, ">= 1 (or max_steps > 0)"),
            "max_steps": (self.max_steps >= 0, ">= 0 (0: epochs decide)"),
            "warmup_steps": (self.warmup_steps is None or self.warmup_steps >= 0, ">= 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "checkpoint_every": (self.checkpoint_every >= 1, ">= 1 step"),
            "val_every": (self.val_every >= 0, ">= 0 epochs (0: never)"),
            "val_batch_size": (self.val_batch_size >= 1, ">= 1"),
            "log_every": (self.log_every >= 1, ">= 1 step"),
            "drop_near_km": (self.drop_near_km >= 0, ">= 0"),
            "drop_near_share": (0 <= self.drop_near_share <= 1, "in [0, 1]"),
        }
        for name, (holds, must) in ranges.items():
            if not holds:  # NaN fails every comparison, so it lands here too
                raise GeoTokenError(f"{name} {getattr(self, name)!r} must be {must}")


def grad_accum_for(cfg: TrainConfig, rows: int, world: int = 1) -> int:
    """Micro-batches per optimizer step: `cfg.grad_accum`, or, with `effective_batch_size`, enough to reach
    it (rounded up to whole micro-batches of `batch_size` on each of `world` processes) but never more than
    the `rows` training rows fill: a recipe's 2048 on a smaller set gives one step per epoch over the
    largest whole number of micro-batches."""
    if cfg.effective_batch_size <= 0:
        return cfg.grad_accum
    per = cfg.batch_size * world
    return max(1, min(-(-cfg.effective_batch_size // per), rows // per))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """The warm-up length: the configured one, or by default min(100, total // 10)."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else min(100, total // 10)


def lr_at(cfg: TrainConfig, step: int, total: int, per_epoch: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine or step decay."""
    warmup = warmup_steps(cfg, total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** (step // per_epoch)
    t = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model: GeoToken, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW decaying the matrices only (biases, norms, embeddings not), or every parameter (the paper's
    `AdamW(model.parameters(), weight_decay=1e-6)`)."""
    if cfg.weight_decay_on == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    else:
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # fused: one kernel per parameter group instead of a dozen element-wise passes per tensor (CPU and GPU)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, fused=True)


def clip_gradients(model: GeoToken, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (global L2 norm) and return the norm before clipping; 0 leaves them as they are
    (`clip_grad_norm_` with 0 would scale every gradient to zero)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


# ------------------------------------------------------------------------------------------ distributed
# rank/world of the torchrun job; pins the process to its GPU (geotoken.devices)
init_distributed = distributed


# ------------------------------------------------------------------------------------------ checkpoints
def _rng_state() -> torch.Tensor:
    return torch.get_rng_state()


def _gather_rng(d: Dist) -> list[torch.Tensor]:
    """Every rank's CPU RNG state (dropout draws differ per rank), collected on all ranks."""
    mine = _rng_state()
    if d.world == 1:
        return [mine]
    out = [torch.empty_like(mine) for _ in range(d.world)]
    dist.all_gather(out, mine)
    return out


def save_checkpoint(
    folder: Path, model: GeoToken, opt: torch.optim.Optimizer, state: dict, rngs: list
) -> None:
    """Write a complete checkpoint beside `folder`, then swap it in: a crash leaves the old one whole."""
    with atomic_dir(folder) as tmp:
        model.save(tmp)
        tensors = {f"rng.cpu.{r}": s for r, s in enumerate(rngs)} | optimizer_tensors(opt)
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        with atomic_path(tmp / "state.safetensors") as p:
            save_file(tensors, str(p))
        groups = opt.state_dict()["param_groups"]
        write_json(tmp / "state.json", {**state, "param_groups": groups, "world": len(rngs)})


# training options a resumed run may change: how it is watched and saved, not what it computes
RESUME_MAY_CHANGE = frozenset(
    {"compile", "checkpoint_every", "val_every", "val_batch_size", "log_every", "tensorboard", "progress"}
)


def rows_identity(data: TrainData, rows: np.ndarray | None) -> str | None:
    """A short hash of which rows a run trains or validates on, and of their location tokens: a resumed run
    on other rows (another holdout, another store) would go on from weights that saw its validation rows."""
    if rows is None:
        return None
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    h = hashlib.sha256(rows.tobytes())
    tokens = np.asarray(data.query_tokens)
    for start in range(0, len(rows), 1 << 20):  # in blocks: MP16's tokens would be a 400 MB copy at start-up
        h.update(np.ascontiguousarray(tokens[rows[start : start + (1 << 20)]], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def check_resume_rows(out: Path, rows_seen: dict) -> None:
    """Refuse to resume on other training or validation rows than the run started with (runs that recorded
    them: since 2026-12-08)."""
    was = (read_json(out / "run.json").get("rows") or {}) if (out / "run.json").is_file() else {}
    for part, what in (("train", "training"), ("val", "validation")):
        if part in was and was[part] != rows_seen[part]:
            raise GeoTokenError(
                f"cannot resume {out}: its {what} rows were others (another --features, --val-fraction, "
                f"--val-max or --val-features?); resume with the same data and split, or train into a new folder"
            )


def check_resume_config(out: Path, cfg: TrainConfig, global_batch: int | None = None, world: int = 1) -> None:
    """A resumed run must be the run it continues: refuse changed options that alter the trajectory. The
    global batch (processes x batch_size x grad_accum rows a step) fixes the schedule: another process
    count may resume with a batch_size / grad_accum that keeps it, and only so."""
    path = out / "run.json"
    if not path.is_file():
        return
    run = read_json(path)
    saved = run.get("train", {})
    was = run.get("effective_batch_size")
    if global_batch is not None and was is not None and was != global_batch:
        world_was = run.get("world", 1)
        raise GeoTokenError(
            f"cannot resume {out}: it trained on global batches of {was:,} rows a step ({world_was} process(es) "
            f"x {was // world_was:,} rows), this run would take {global_batch:,} ({world} process(es) x "
            f"{global_batch // world:,}), which changes its schedule; resume with processes x batch size x "
            f"gradient accumulation = {was:,}"
        )
    may_change = RESUME_MAY_CHANGE | ({"batch_size", "grad_accum"} if global_batch is not None else set())
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as JSON lists, like the saved copy
    changed = [k for k, v in now.items() if k in saved and k not in may_change and saved[k] != v]
    if changed:
        diff = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise GeoTokenError(
            f"cannot resume {out}: training options changed since it started ({diff}); "
            "resume with the same options, or train into a new folder"
        )


def load_checkpoint(folder: Path, model: GeoToken, opt: torch.optim.Optimizer, d: Dist) -> dict:
    """Restore weights, optimizer and this rank's RNG; returns the JSON state (step, best, ...)."""
    if not (folder / "state.json").is_file() and folder.with_name(f".{folder.name}.old").is_dir():
        folder = folder.with_name(f".{folder.name}.old")  # a crash between the two renames
    for name in ("state.json", "state.safetensors", "model.safetensors"):
        if not (folder / name).is_file():
            raise GeoTokenError(f"cannot resume: {folder / name} is missing")
    state = read_json(folder / "state.json")
    saved = ModelConfig.from_dict(read_json(folder / "config.json"))
    if saved != model.cfg:
        raise GeoTokenError(
            f"cannot resume: {folder / 'config.json'} differs from the requested model config"
        )
    model.load_state_dict(read_safetensors(folder / "model.safetensors"))
    tensors = read_safetensors(folder / "state.safetensors")
    load_optimizer(opt, tensors, state.pop("param_groups"))
    if state["world"] == d.world:  # same process count: continue every rank's random stream exactly
        torch.set_rng_state(tensors[f"rng.cpu.{d.rank}"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    else:
        torch.manual_seed(state["step"] * 1000 + d.rank)
    return state


# ------------------------------------------------------------------------------------------ validation
# how validation decodes, written with its metrics (log.jsonl, best/metrics.json) and in run.json: free
# greedy decoding by default (the authors'), or with `val_constrain` the gallery-constrained greedy decoder
# of `geotoken evaluate`'s +gallery rows, so validation and test figures can come from the same decoder
VAL_DECODERS = {False: "greedy, unconstrained", True: "greedy, gallery-constrained"}
VAL_DECODER = VAL_DECODERS[False]


@torch.no_grad()
def validate(
    model: GeoToken, data: TrainData, rows: np.ndarray, cfg: TrainConfig, device: torch.device
) -> dict:
    """Greedy decoding of `rows` (free, or under the gallery constraint with `cfg.val_constrain`: see
    `VAL_DECODERS`): teacher-forced loss, token accuracy, and accuracy within each km threshold."""
    model.eval()
    T = model.cfg.n_tokens
    constraint = None
    if cfg.val_constrain:
        constraint = PrefixConstraint(
            np.asarray(data.gallery.tokens), vocab_sizes(model.cfg.level, model.cfg.group)
        )
    losses, pred = [], []
    for s in range(0, len(rows), cfg.val_batch_size):
        batch = data.batch(rows[s : s + cfg.val_batch_size], model.cfg).to(device)
        with precision(cfg.dtype, device):
            _, loss = model(batch)
            tokens, _ = greedy(model, batch, constraint)
        losses.append(loss.float().item() * batch.size)
        pred.append(tokens.cpu())
    pred = torch.cat(pred).numpy()  # (V, T)
    true = np.asarray(data.query_tokens[rows])
    prefix = np.cumprod(pred == true, axis=1).sum(1)  # correct leading tokens per row
    out = {
        "val_loss": sum(losses) / len(rows),
        "val_face_acc": float((prefix >= 1).mean()),
        "val_token_prefix": float(prefix.mean() / T),
    }
    if data.query_coords is not None:
        lat, lon = tokens_to_latlon(pred, model.cfg.level, model.cfg.group)
        coords = np.asarray(data.query_coords[rows])
        err = haversine_km(coords[:, 0], coords[:, 1], lat, lon)
        out["val_median_km"] = float(np.median(err))
        for t in THRESHOLDS_KM:
            out[f"val_acc_{t:g}km"] = float((err <= t).mean())
        out["val_score"] = float(np.mean([out[f"val_acc_{t:g}km"] for t in THRESHOLDS_KM]))
    else:
        out["val_score"] = -out["val_loss"]
    model.train()
    return out


# ------------------------------------------------------------------------------------------ the loop
@own_random_state
def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data: TrainData,
    out: str | Path,
    train_rows: np.ndarray | None = None,
    val_data: TrainData | None = None,
    val_rows: np.ndarray | None = None,
    resume: bool = False,
    device: str | None = None,
    sources: dict | None = None,
    stop_at: int | None = None,
) -> GeoToken:
    """Train (or resume) a GeoToken model; returns the model after the last step (unwrapped, in eval mode).

    `stop_at` ends this call early (after a checkpoint) without changing the schedule, which still
    runs to `max_steps` / `epochs`: a later call with `resume=True` continues exactly. `resume=True`
    on a folder without a checkpoint starts from scratch (so a pipeline stage can always pass it).
    The run seeds torch's random generators from `cfg.seed`; the caller's are restored afterwards.
    """
    out = Path(out)
    if stop_at is not None and stop_at < 1:
        raise GeoTokenError(f"stop_at {stop_at} must be >= 1 (a step after which a checkpoint is written)")
    d = init_distributed()
    dev = torch_device(device)  # this rank's GPU under torchrun
    data.check(model_cfg)
    if val_data is not None and val_rows is None:  # a validation set given without rows: all of it
        val_rows = np.arange(val_data.rows)
    val_data = val_data if val_data is not None else data
    if cfg.drop_near_km > 0:  # after val_data: validation keeps the neighbours test photos would see
        data = data.drop_near(cfg.drop_near_km, cfg.drop_near_share, model_cfg.k, cfg.seed)
    if val_rows is not None and len(val_rows):
        val_data.check(model_cfg)
    train_rows = np.arange(data.rows) if train_rows is None else np.asarray(train_rows, dtype=np.int64)
    for name, rows, of in (("train_rows", train_rows, data), ("val_rows", val_rows, val_data)):
        if rows is not None and len(rows) and not (0 <= np.min(rows) and np.max(rows) < of.rows):
            raise GeoTokenError(
                f"{name}: rows {np.min(rows)}..{np.max(rows)}, but {of.source} has {of.rows} rows"
            )
    given = len(train_rows)
    train_rows = train_rows[data.usable(model_cfg.k)[train_rows]]  # drop rows the retrieval stage skipped
    if len(train_rows) < given:
        short = (
            f"{given - len(train_rows)} of {given} training rows have fewer than k = {model_cfg.k} neighbours"
        )
        if not len(train_rows):  # on every rank: none may go on alone
            raise GeoTokenError(
                f"{short} (the table marks missing ones -1: unreadable images, or a gallery smaller than "
                "the table's width); train with a smaller k or build the table deeper"
            )
        if d.main:
            print(f"train: {short} (-1 in the table) and are left out", flush=True)
    if val_rows is not None:
        val_rows = np.asarray(val_rows, dtype=np.int64)
        val_rows = val_rows[val_data.usable(model_cfg.k)[val_rows]]

    if d.main and cfg.dtype == "bf16" and dev.type == "cpu" and not cpu_has_bf16():
        print("train: dtype bf16 on a CPU without bf16 units (AVX-512 BF16 / AMX) runs emulated, several "
              "times slower than fp32: train with dtype fp32 here", flush=True)  # fmt: skip
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = GeoToken(model_cfg).to(dev)
    opt = make_optimizer(model, cfg)
    accum = grad_accum_for(cfg, len(train_rows), d.world)
    step_rows = cfg.batch_size * accum  # this process's rows per optimizer step
    if d.main and cfg.effective_batch_size and step_rows * d.world != cfg.effective_batch_size:
        why = (
            f"at most one step over the {len(train_rows):,} training rows"
            if step_rows * d.world < cfg.effective_batch_size
            else f"whole micro-batches: pick a batch size that divides {cfg.effective_batch_size:,} / {d.world}"
        )
        warnings.warn(
            f"train: effective batch size {cfg.effective_batch_size:,} asked, {step_rows * d.world:,} taken "
            f"({d.world} process(es) x batch size {cfg.batch_size:,} x {accum} micro-batch(es); {why})",
            stacklevel=3,  # the caller of train (through own_random_state)
        )
    per_epoch = steps_per_epoch(len(train_rows), step_rows, d.world)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * per_epoch
    state = {"step": 0, "best_score": None, "best_step": None}
    resuming = (out / "last").exists() or (out / ".last.old").exists()
    if resuming and not resume:
        raise GeoTokenError(
            f"{out}: already holds a training run (last/); resume it (--resume, resume=True) or write to a new folder"
        )
    rows_seen = {"train": rows_identity(data, train_rows), "val": rows_identity(val_data, val_rows)}
    if resuming:
        check_resume_config(out, cfg, step_rows * d.world, d.world)
        check_resume_rows(out, rows_seen)
        state = load_checkpoint(out / "last", model, opt, d)
    else:
        torch.manual_seed(cfg.seed * 1000 + 1 + d.rank)  # dropout streams differ per rank
    if d.main:
        run = {
            "model": model_cfg.to_dict(),
            "train": dataclasses.asdict(cfg),
            "world": d.world,
            "grad_accum": accum,
            "effective_batch_size": step_rows * d.world,
            "sources": sources or {},
            "rows": rows_seen,
            "val_decoder": VAL_DECODERS[cfg.val_constrain],
        }
        write_json(out / "run.json", run)

    net = model
    if d.world > 1:
        unused = model_cfg.k == 0 or not model_cfg.use_neighbour_tokens  # retrieval table never read
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)
    ddp = net if d.world > 1 else None  # its no_sync() skips the all-reduce of all but the last micro-batch
    if cfg.compile:
        net = torch.compile(net)

    log = _Logger(out, cfg, d.main, resumed_at=state["step"] if resuming else None)
    model.train()
    step = state["step"]
    bar = _progress(cfg, d, total, step)
    t0, seen = time.perf_counter(), 0
    end = total if stop_at is None else min(stop_at, total)
    while step < end:
        epoch, i = divmod(step, per_epoch)
        rows = train_rows[
            batch_rows(epoch_order(len(train_rows), cfg.seed, epoch), i, step_rows, d.rank, d.world)
        ]
        lr = lr_at(cfg, step, total, per_epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=dev)  # this step's loss: the mean over all its rows
        for j in range(accum):
            part = rows[j * cfg.batch_size : (j + 1) * cfg.batch_size]
            batch = data.batch(part, model_cfg).to(dev, non_blocking=True)
            share = len(part) / len(rows)
            sync = ddp is None or j == accum - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with precision(cfg.dtype, dev):
                    _, micro = net(batch, cfg.label_smoothing)
                (micro if accum == 1 else micro * share).backward()
            loss += micro.detach().float() * share
        gnorm = clip_gradients(model, cfg.grad_clip)
        if not torch.isfinite(gnorm):  # before the step: the weights (and the last checkpoint) stay good
            kept = (
                f"the last checkpoint ({out / 'last'}) is from before it"
                if (out / "last").exists()
                else "no checkpoint was written yet"
            )
            raise GeoTokenError(
                f"training step {step + 1}: the loss is {loss.item()} and the gradient norm {float(gnorm)}: check "
                f"the inputs for NaN rows ({data.source}, and its gallery) or lower the learning rate ({lr:g}); "
                f"{kept}"
            )
        opt.step()
        step += 1
        seen += len(rows) * d.world

        if step % cfg.log_every == 0 or step == total:
            if d.world > 1:  # each rank holds the mean over its equal share: the step's is their mean
                dist.all_reduce(loss)
                loss /= d.world
            dt = time.perf_counter() - t0
            rec = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "grad_norm": float(gnorm)}
            rec["samples_per_s"] = seen / dt
            log.write(rec)
            t0, seen = time.perf_counter(), 0
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
        if bar is not None:
            bar.update(1)

        end_of_epoch = step % per_epoch == 0 or step == total
        if cfg.val_every and val_rows is not None and len(val_rows) and end_of_epoch:
            if (step // per_epoch) % cfg.val_every == 0 or step == total:
                if d.main:
                    metrics = {
                        "step": step,
                        "epoch": (step - 1) // per_epoch,
                        **validate(model, val_data, val_rows, cfg, dev),
                        "val_decoder": VAL_DECODERS[cfg.val_constrain],
                    }
                    # NaN validation rows would pick `best` blindly
                    if not math.isfinite(metrics["val_loss"]):
                        raise GeoTokenError(
                            f"step {step}: the validation loss is {metrics['val_loss']}: check the validation "
                            f"inputs for NaN rows ({val_data.source})"
                        )
                    log.write(metrics)
                    # ties (coarse accuracies often tie) go to the lower validation loss
                    key, best = (metrics["val_score"], -metrics["val_loss"]), state["best_score"]
                    if best is None or key > (best, -state.get("best_loss", math.inf)):
                        state["best_loss"] = metrics["val_loss"]
                        state["best_score"], state["best_step"] = metrics["val_score"], step
                        model.save(out / "best")
                        write_json(out / "best" / "metrics.json", metrics)
                if d.world > 1:
                    _sync_best(state, d)
        if step % cfg.checkpoint_every == 0 or step == end:
            rngs = _gather_rng(d)
            if d.main:
                save_checkpoint(out / "last", model, opt, {**state, "step": step, "total_steps": total}, rngs)
            if d.world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    log.close()
    return model.eval()  # ready to predict with: no dropout


def _sync_best(state: dict, d: Dist) -> None:
    """Rank 0 decides the best checkpoint; the others copy its bookkeeping (kept in their checkpoint state)."""
    t = torch.tensor(
        [-math.inf if state["best_score"] is None else state["best_score"], state["best_step"] or 0.0]
    )
    dist.broadcast(t, 0)
    if math.isfinite(t[0]):
        state["best_score"], state["best_step"] = float(t[0]), int(t[1])


def _progress(cfg: TrainConfig, d: Dist, total: int, step: int):
    if not (cfg.progress and d.main):
        return None
    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)


class _Logger:
    """JSON lines (appended, so a resumed run continues the same file) and TensorBoard scalars, rank 0 only."""

    def __init__(self, out: Path, cfg: TrainConfig, main: bool, resumed_at: int | None = None):
        """resumed_at: the checkpoint's step; records after it (written before a kill) are dropped, so the
        log holds each step once. None: a new run, a new log."""
        self.f = self.tb = None
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "log.jsonl"
        kept = []
        if resumed_at is not None and path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resumed_at:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (json.JSONDecodeError, AttributeError):
                        break  # a line cut short by the kill: nothing after it was written whole
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
        self.f = open(path, "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, rec: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for key, v in rec.items():
                if key not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(key, v, rec["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
