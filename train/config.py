"""Run configuration: small dataclasses built from the composed Hydra config and validated
before any process group, directory or file is created."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.stream import DataConfig, DataConfigError, GlobalBatchLoader
from model.config import ConfigError, ModelConfig, config_from_dict
from train.parallel.dims import PP_PARTITIONS, validate_layout

SECTIONS = ("model", "data", "parallel", "optim", "sched", "logging", "train", "run_dir")


@dataclass
class ParallelConfig:
    name: str = "zero2"
    zero_stage: int = 2
    tp: int = 1
    pp: int = 1
    ep: int = 1
    # Context parallelism: each of cp ranks holds a contiguous part of every sequence (train.parallel.cp).
    cp: int = 1
    # How pipeline stages split the layers: parameters (balance parameter counts), uniform (layer counts),
    # blocks (balance decoder blocks; embedding and head ride on the first and last stage). See train.parallel.pp.
    pp_partition: str = "parameters"
    # Norms and residuals on 1/tp of the sequence between the tensor-parallel matmuls; null = on when tp > 1.
    sequence_parallel: bool | None = None

    @property
    def sp(self) -> bool:
        """Whether sequence parallelism is on."""
        return self.tp > 1 and self.sequence_parallel is not False

    def validate(self, world_size: int, model: ModelConfig | None = None) -> int:
        """Checks the layout against the model and the world size (train.parallel.validate_layout, before any
        process group exists); returns the data-parallel size."""
        if self.pp_partition not in PP_PARTITIONS:
            raise ConfigError(
                "parallel.pp_partition", f"got {self.pp_partition!r}; use one of {', '.join(PP_PARTITIONS)}"
            )
        return validate_layout(self, model if model is not None else ModelConfig(), world_size).dp


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1

    def validate(self) -> None:
        if self.name != "adamw":
            raise ConfigError("optim.name", f"got {self.name!r}; only adamw (torch.optim.AdamW) is provided")
        if self.lr <= 0:
            raise ConfigError("optim.lr", f"must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optim.betas", f"need two values in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError("optim.eps", f"must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 1.0

    def validate(self, steps: int) -> None:
        if self.name not in ("cosine", "wsd", "constant"):
            raise ConfigError("sched.name", f"got {self.name!r}; use sched=cosine, sched=wsd or sched=constant")
        if not 0 <= self.warmup_steps <= steps:
            raise ConfigError("sched.warmup_steps", f"must be in [0, train.steps={steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("sched.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError("sched.decay_fraction", f"must be in [0, 1], got {self.decay_fraction}")


@dataclass
class LoggingConfig:
    backend: str = "wandb"
    project: str = "pretrain"
    entity: str | None = None
    mode: str = "offline"
    log_every: int = 10

    def validate(self) -> None:
        if self.backend not in ("wandb", "none"):
            raise ConfigError("logging.backend", f"got {self.backend!r}; use logging=wandb or logging=none")
        if self.backend == "wandb" and self.mode not in ("offline", "online", "disabled"):
            raise ConfigError("logging.mode", f"got {self.mode!r}; use offline, online or disabled")
        if self.log_every < 1:
            raise ConfigError("logging.log_every", f"must be >= 1, got {self.log_every}")


@dataclass
class TrainConfig:
    steps: int = 300
    stop_at: int | None = None
    seed: int = 1234
    micro_batch_size: int = 8
    global_batch_size: int = 16
    seq_len: int = 128
    resume: str = "auto"
    ckpt_every: int = 100
    keep_last: int = 2
    eval_every: int = 0
    eval_batches: int = 8
    grad_clip: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    peak_flops: float | None = None
    # torch.compile each decoder block, MoE layers left eager (`model.compile.compile_blocks`); the first steps pay the
    # compilation.
    compile: bool = False
    # A NaN/inf loss or gradient on any rank: no rank applies that update, then "stop" (exit, save nothing),
    # "skip" (go on; the step and the lr schedule advance) or "rollback" (reload the last checkpoint and skip
    # the offending batch, at most max_rollbacks times per launch).
    on_nan: Literal["stop", "skip", "rollback"] = "stop"
    max_rollbacks: int = 3
    skip_batches: tuple[int, ...] = ()  # global batch indices (metrics' "batch") never trained on
    # A loss more than spike_zscore standard deviations above the mean of the last spike_window losses is
    # reported (console, metrics.jsonl, W&B).
    spike_window: int = 100
    spike_zscore: float = 6.0
    # A rank whose main thread makes no progress for this long (its peers stalled in a collective) names the
    # stalled rank and exits; set it above the longest checkpoint save. The process groups time out 60 s later.
    collective_timeout_s: float = 300.0

    def validate(self, dp_size: int, model: ModelConfig, parallel: ParallelConfig) -> None:
        for key in ("steps", "micro_batch_size", "global_batch_size", "seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("seed", "eval_every", "eval_batches"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError("train.peak_flops", f"must be positive or null (estimated), got {self.peak_flops}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ConfigError("train.stop_at", f"must be in [1, train.steps={self.steps}] or null, got {self.stop_at}")
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step != 0:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.global_batch_size} is not divisible by micro_batch_size*dp_size = "
                f"{self.micro_batch_size}*{dp_size}; pick a multiple of {per_step}",
            )
        if self.seq_len > model.max_seq_len:
            raise ConfigError("train.seq_len", f"{self.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
        if parallel.sp and self.seq_len % parallel.tp != 0:
            raise ConfigError(
                "train.seq_len",
                f"{self.seq_len} is not divisible by parallel.tp={parallel.tp}: sequence "
                "parallelism splits the sequence; pick a multiple of tp or parallel.sequence_parallel=false",
            )
        if parallel.cp > 1:
            split = parallel.cp * (parallel.tp if parallel.sp else 1)
            if self.seq_len % split != 0:
                raise ConfigError(
                    "train.seq_len",
                    f"{self.seq_len} is not divisible by parallel.cp={parallel.cp}"
                    + (f" x tp={parallel.tp} (sequence parallel)" if parallel.sp else "")
                    + f": context parallelism gives each rank an equal part of the sequence; pick a multiple of {split}",
                )
            if model.family == "hybrid" and self.seq_len // parallel.cp < model.mamba_d_conv - 1:
                raise ConfigError("train.seq_len", f"{self.seq_len} / cp={parallel.cp} positions per rank are fewer than "
                                  f"the Mamba conv1d's {model.mamba_d_conv - 1} inputs of left context; lower parallel.cp")
            if self.compile:
                raise ConfigError("train.compile", "is not supported with context parallelism yet (parallel.cp > 1); "
                                  "use train.compile=false or parallel.cp=1")
        if self.resume not in ("auto", "never"):
            raise ConfigError("train.resume", f"got {self.resume!r}; use auto or never")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("train.precision", f"got {self.precision!r}; use auto, fp32 or bf16")
        if self.compile and parallel.zero_stage == 3:
            raise ConfigError(
                "train.compile",
                "is not supported with ZeRO-3 (its parameter gathering hooks run inside "
                "the compiled blocks); use parallel.zero_stage<=2 or train.compile=false",
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("train.device", f"got {self.device!r}; use auto, cpu or cuda")
        for key in ("ckpt_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.grad_clip < 0:
            raise ConfigError("train.grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.max_rollbacks < 0:
            raise ConfigError("train.max_rollbacks", f"must be >= 0, got {self.max_rollbacks}")
        if any(b < 0 for b in self.skip_batches):
            raise ConfigError("train.skip_batches", f"batch indices start at 0, got {list(self.skip_batches)}")
        if self.spike_window < 2:
            raise ConfigError("train.spike_window", f"must be >= 2, got {self.spike_window}")
        if self.collective_timeout_s < 5:
            raise ConfigError("train.collective_timeout_s", f"must be >= 5 seconds, got {self.collective_timeout_s}")
        if self.spike_zscore <= 0:
            raise ConfigError("train.spike_zscore", f"must be positive, got {self.spike_zscore}")


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig
    optim: OptimConfig
    sched: SchedConfig
    logging: LoggingConfig
    train: TrainConfig
    run_dir: Path
    world_size: int = 1
    dp_size: int = 1
    raw: dict[str, Any] = field(default_factory=dict)  # the resolved config, as saved in the run dir

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.dp_size)


def build_run_config(cfg: dict[str, Any], world_size: int | None = None) -> RunConfig:
    """Turns a resolved config mapping into validated dataclasses.

    Raises ConfigError (model.config) or DataConfigError with the offending key; never
    touches the file system except to read the data index.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    missing = [k for k in SECTIONS if k not in cfg]
    if missing:
        raise ConfigError(missing[0], "missing config section")
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown top-level key; known: {', '.join(SECTIONS)}")
    for key in SECTIONS[:-1]:
        if not isinstance(cfg[key], Mapping):
            raise ConfigError(key, f"expected a config group (e.g. {key}=NAME or {key}.KEY=VALUE), got {cfg[key]!r}")
    if not isinstance(cfg["run_dir"], str | os.PathLike) or not str(cfg["run_dir"]):
        raise ConfigError("run_dir", f"expected a directory path, got {cfg['run_dir']!r}")
    model = ModelConfig.from_dict(cfg["model"])
    parallel = config_from_dict(ParallelConfig, cfg["parallel"], "parallel")
    optim = config_from_dict(OptimConfig, cfg["optim"], "optim")
    sched = config_from_dict(SchedConfig, cfg["sched"], "sched")
    logging_cfg = config_from_dict(LoggingConfig, cfg["logging"], "logging")
    train = config_from_dict(TrainConfig, cfg["train"], "train")

    dp_size = parallel.validate(world_size, model)
    optim.validate()
    train.validate(dp_size, model, parallel)
    sched.validate(train.steps)
    logging_cfg.validate()
    data = DataConfig.from_dict(dict(cfg["data"]))
    _check_data(data, model, train, dp_size)
    if train.resume == "auto":
        _check_resume(Path(cfg["run_dir"]), model)
    return RunConfig(
        model=model,
        data=data,
        parallel=parallel,
        optim=optim,
        sched=sched,
        logging=logging_cfg,
        train=train,
        run_dir=Path(cfg["run_dir"]),
        world_size=world_size,
        dp_size=dp_size,
        raw=cfg,
    )


def _check_data(data: DataConfig, model: ModelConfig, train: TrainConfig, dp_size: int) -> None:
    """Opens the sources as rank 0's loader will (index, shard sizes, one tokenizer, a sample of seq_len + 1
    tokens, mixture weights) and checks that every token id fits the model's embedding table."""
    try:
        loader = GlobalBatchLoader(
            data,
            seq_len=train.seq_len,
            global_batch_size=train.global_batch_size,
            micro_batch_size=train.micro_batch_size,
            dp_rank=0,
            dp_size=dp_size,
            seed=train.seed,
        )
    except DataConfigError:
        raise
    except RuntimeError as e:  # a corrupt or truncated shard: the message names it and the command to rebuild it
        raise DataConfigError("data.sources", str(e).splitlines()[0]) from e
    except (ValueError, KeyError, TypeError) as e:  # an unreadable index.json
        raise DataConfigError(
            "data.sources",
            f"cannot read the prepared data ({str(e).splitlines()[0]}); re-run python -m data.prepare for it",
        ) from e
    for i, src in enumerate(loader.sources):
        if src.vocab_size > model.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                f"{model.vocab_size} is smaller than the tokenizer vocabulary ({src.vocab_size}) of data.sources[{i}] "
                f"({src.path}); set model.vocab_size={src.vocab_size}",
            )


# Fields that decide the shapes (or the set) of the model's parameters: a checkpoint of another value cannot load.
SHAPE_FIELDS = (
    "family",
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_hidden",
    "tie_embeddings",
    "num_experts",
    "expert_layer_period",
    "expert_layer_offset",
    "attn_layer_period",
    "attn_layer_offset",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_expand",
    "mamba_dt_rank",
    "mamba_conv_bias",
    "mamba_proj_bias",
)


def _check_resume(run_dir: Path, model: ModelConfig) -> None:
    """With train.resume=auto the run continues from run_dir's latest checkpoint: its model must have this shape.
    Reads the resolved config saved beside the checkpoint."""
    saved = run_dir / "checkpoints" / "latest" / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text())["model"]
        old = ModelConfig.from_dict(old)
    except (yaml.YAMLError, KeyError, TypeError, ConfigError):
        return  # not a config this code wrote; the checkpoint loader reports what it finds
    for key in SHAPE_FIELDS:
        if getattr(old, key) != getattr(model, key):
            raise ConfigError(
                f"model.{key}",
                f"is {getattr(model, key)!r} but {saved.parent.resolve()} (resumed by train.resume=auto) holds a "
                f"model with {key}={getattr(old, key)!r}; use that model, another run_dir, or train.resume=never",
            )


__all__ = [
    "ConfigError",
    "DataConfigError",
    "LoggingConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "SchedConfig",
    "TrainConfig",
    "build_run_config",
]
