"""How a global batch becomes an optimizer step, behind one interface for every parallel layout.

``build_train_module`` is the only place that knows the layout: it builds the single-device model, applies
expert and tensor parallelism from outside (``train.parallel``), and wraps the result in a DeepSpeed engine, or
in DeepSpeed's pipeline engine when the layout has pipeline stages. The training loop and the checkpoint code use
the ``TrainModule`` methods only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.compile import compile_blocks
from model.transformer import Transformer
from train.config import RunConfig
from train.engine import build_optimizer, build_scheduler, deepspeed_config, zero3_master_weights_shared
from train.numerics import NonFiniteGuard
from train.parallel.cp import split_sequence
from train.parallel.dims import Layout
from train.parallel.grad import install_clipping
from train.parallel.groups import ParallelGroups
from train.parallel.init import build_parallel_model


def build_model(cfg: RunConfig) -> Transformer:
    """Same seed on every rank, so every rank starts from the single-device model's weights."""
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model)


class TrainModule(ABC):
    """A model under some parallel layout, its optimizer and lr schedule, stepped one global batch at a time.

    Batches are this data-parallel rank's slice of the global batch, ``[micro_batches, micro_bs, seq_len + 1]``.
    """

    engine: Any
    layout: Layout
    groups: ParallelGroups
    sequence_parallel: bool
    guard: NonFiniteGuard
    vocab_size: int

    def train_batch(self, batch: torch.Tensor, step: int | None = None) -> dict[str, Any]:
        """Optimizer step ``step`` (1-based; default: the one after the previous call). ``ce_loss`` and
        ``aux_loss``: means over this rank's micro-batches (the trainer averages them over ranks); ``grad_norm``:
        the global norm before clipping (None if unknown); ``nonfinite_ranks``: the ranks that saw a NaN/inf gradient or loss (the same list on every rank), in
        which case no rank applied the update and the lr schedule still advanced."""
        self.guard.begin_step(self.guard.step + 1 if step is None else step)
        self._nonfinite: list[int] = []
        out = self._train_batch(self.guard.watch_batch(batch, self.vocab_size))
        if self.guard.skip_update and not self.engine.was_step_applied():
            # DeepSpeed skipped the step itself (its fp32 ZeRO-1/2 overflow check) and, with it, the schedule.
            self.engine.lr_scheduler.step()
        return {**out, "nonfinite_ranks": list(self._nonfinite)}

    @abstractmethod
    def _train_batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The step itself; calls ``self._agree()`` between the last backward and the optimizer step."""

    def _agree(self) -> None:
        self._nonfinite = self.guard.agree()

    @abstractmethod
    def eval_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss over the micro-batches (no step); its mean over all ranks is the global mean."""

    @abstractmethod
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(single-device model name, this rank's local tensor) for every parameter held here."""

    @abstractmethod
    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """(single-device model name, buffer) for every persistent buffer held here."""

    @abstractmethod
    def moe_layers(self) -> list[tuple[int, nn.Module]]:
        """(MoE layer ordinal in the whole model, module) for the MoE layers held here."""

    def _inputs(self, micro: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) of a micro-batch of samples [B, T + 1] for this rank: its part of the positions under
        context parallelism (`train.parallel.cp.split_sequence`), else all of them."""
        return split_sequence(micro, self.layout.cp_rank, self.layout.cp)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def post_batch(self) -> dict[str, float]:
        """After a step: per-layer expert load (averaged over the step's micro-batches and the data-parallel
        group) and the aux-loss-free bias update. Collective; every rank returns every layer's statistics."""
        stats: dict[str, float] = {}
        for ordinal, moe in self.moe_layers():
            load = moe.pop_step_load()
            if load is None:
                continue
            load = load.float().clone()
            if self.layout.dp_cp > 1:
                dist.all_reduce(load, group=self.groups.dp_group)
                load /= self.layout.dp_cp
            moe.update_bias(load)  # the same global load on every rank: the biases stay in sync
            mean = load.mean().clamp_min(1e-12)
            stats[f"moe/layer{ordinal}/max_over_mean_load"] = float(load.max() / mean)
            for e, frac in enumerate(load.tolist()):
                stats[f"moe/layer{ordinal}/load_e{e}"] = frac
        if self.layout.pp > 1:  # each stage holds its own layers: collect them all
            parts: list[dict[str, float] | None] = [None] * self.layout.world
            dist.all_gather_object(parts, stats)
            for part in parts:
                stats.update(part or {})
        return stats

    def discard_step_stats(self) -> None:
        """After a step whose update was dropped: forget its expert load, so the aux-free bias never learns from it."""
        for _, moe in self.moe_layers():
            moe.pop_step_load()

    def save_engine_state(self, path: Path, tag: str, step: int) -> None:
        """DeepSpeed's own files (bound to this layout; bit-exact resume)."""
        self.engine.save_checkpoint(str(path), tag=tag, client_state={"step": step}, save_latest=False)

    def load_engine_state(self, path: Path, tag: str) -> bool:
        load_path, _ = self.engine.load_checkpoint(
            str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        return load_path is not None

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)


class _NormRecorder:
    """Holds the norm computed by ``train.parallel.grad.install_clipping`` for the step's metrics."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, norm: torch.Tensor) -> None:
        self.value = norm.detach()


def _step_norm(engine: Any, recorder: _NormRecorder) -> torch.Tensor | None:
    if recorder.value is not None:
        return recorder.value
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.tensor(float(norm))


def _initialize(module: nn.Module, cfg: RunConfig, groups: ParallelGroups, precision: str, mpu: Any,
                extra_config: dict[str, Any], device: torch.device) -> tuple[Any, _NormRecorder, NonFiniteGuard]:
    """deepspeed.initialize with torch AdamW (expert parameters in DeepSpeed's MoE groups) and our schedule.
    fp32 ZeRO-0 clips with train.parallel.grad (DeepSpeed's averages per-rank norms there)."""
    import deepspeed

    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg)
    ds_config = deepspeed_config(cfg, precision) | extra_config
    recorder = _NormRecorder()
    if cfg.parallel.zero_stage == 0 and precision == "fp32":
        ds_config["gradient_clipping"] = 0.0
        install_clipping(optimizer, module, groups, cfg.train.grad_clip, recorder)
    guard = NonFiniteGuard(module.parameters(), optimizer, device)
    with zero3_master_weights_shared():
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu,
            dist_init_required=False,
        )
    return engine, recorder, guard


class DeepSpeedTrainModule(TrainModule):
    """The whole model on every rank of a data-parallel group (its parameters possibly TP/EP-sharded)."""

    def __init__(self, model: Transformer, cfg: RunConfig, groups: ParallelGroups, precision: str,
                 device: torch.device, extra_config: dict[str, Any]) -> None:
        self.layout, self.groups, self.device = groups.layout, groups, device
        self.sequence_parallel = cfg.parallel.sp
        mpu = groups if self.layout.tp > 1 else None
        self.engine, self._norm, self.guard = _initialize(model, cfg, groups, precision, mpu, extra_config, device)
        if self.layout.dp_cp == 1 and cfg.parallel.zero_stage == 0 and precision == "fp32":
            # Averaging over a data-parallel group of one rank changes nothing, yet DeepSpeed would still copy every
            # gradient into its buckets and back (~4% of a small MoE step on CPU). Expert gradients reduce over a
            # subgroup of the data-parallel group, sequence-parallel ones through their own hooks (train/parallel).
            self.engine.enable_backward_allreduce = False
        self.vocab_size = cfg.model.vocab_size

    def _train_batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor | None]:
        self._norm.value = None
        ce_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for i, micro in enumerate(batch):
            tokens, labels = self._inputs(micro.to(self.device, non_blocking=True))
            out = self.engine(tokens, labels=labels)
            self.engine.backward(self.guard.watch_loss(out.loss))
            if i == len(batch) - 1:
                self._agree()
            self.engine.step()  # DeepSpeed accumulates and steps the optimizer at the last micro-batch
            ce_sum += out.ce_loss.detach().float()
            aux_sum += out.aux_loss.detach().float()
        n = batch.shape[0]
        return {"ce_loss": ce_sum / n, "aux_loss": aux_sum / n, "grad_norm": _step_norm(self.engine, self._norm)}

    @torch.no_grad()
    def eval_batch(self, batch: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for micro in batch:
            tokens, labels = self._inputs(micro.to(self.device))
            total += self.engine(tokens, labels=labels).ce_loss.float()
        return total / batch.shape[0]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.engine.module.named_parameters())

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.engine.module.named_buffers())

    def moe_layers(self) -> list[tuple[int, nn.Module]]:
        return list(enumerate(self.engine.module.moe_layers()))


class PipelineTrainModule(TrainModule):
    """DeepSpeed's pipeline engine (1F1B) over the model's layers, split into ``layout.pp`` stages."""

    def __init__(self, model: Transformer, cfg: RunConfig, groups: ParallelGroups, precision: str,
                 device: torch.device, extra_config: dict[str, Any]) -> None:
        from deepspeed.runtime.pipe.schedule import OptimizerStep

        from train.parallel.pp import build_pipeline_module

        self.layout, self.groups, self.device = groups.layout, groups, device
        self.sequence_parallel = cfg.parallel.sp
        seq_shards = self.layout.tp if cfg.parallel.sp else 1
        pipe = build_pipeline_module(model, groups, cfg.parallel.pp_partition, seq_shards)
        self.engine, self._norm, self.guard = _initialize(pipe, cfg, groups, precision, None, extra_config, device)
        self.vocab_size = cfg.model.vocab_size
        # The schedule's optimizer step is the one point every stage reaches after its last backward.
        instructions = dict(type(self.engine)._INSTRUCTION_MAP)
        optimizer_step = instructions[OptimizerStep]

        def agree_then_step(engine: Any, *args: Any, **kwargs: Any) -> Any:
            self._agree()
            return optimizer_step(engine, *args, **kwargs)

        instructions[OptimizerStep] = agree_then_step
        self.engine._INSTRUCTION_MAP = instructions

    def _micro_batches(self, batch: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # DeepSpeed feeds the first element to the first stage and the second (labels) to the last.
        for micro in batch:
            yield self._inputs(micro)

    def _train_batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if batch.shape[0] != self.engine.micro_batches:
            raise ValueError(f"batch has {batch.shape[0]} micro-batches, the pipeline expects {self.engine.micro_batches}")
        self._norm.value = None
        self.engine.train_batch(data_iter=self._micro_batches(batch))
        # Averaged over micro-batches and data-parallel ranks on the last stage, broadcast along the pipeline.
        losses = self.engine.agg_additional_losses
        return {"ce_loss": losses["ce_loss"].float(), "aux_loss": losses["aux_loss"].float(),
                "grad_norm": _step_norm(self.engine, self._norm)}

    @torch.no_grad()
    def eval_batch(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.engine.eval_batch(data_iter=self._micro_batches(batch), num_micro_batches=batch.shape[0])
        self.engine.module.train()
        return loss.float().reshape(())  # averaged over the data-parallel ranks already

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.engine.module.model_named_parameters()

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return self.engine.module.model_named_buffers()

    def moe_layers(self) -> list[tuple[int, nn.Module]]:
        return self.engine.module.local_moe_layers()


def build_train_module(cfg: RunConfig, groups: ParallelGroups, precision: str, device: torch.device) -> TrainModule:
    """The single-device model with this layout's parallelism applied (experts split over the EP group, then
    everything over the TP group), in the engine that steps it."""
    layout = groups.layout
    # Never the whole model on a rank when tp, pp or ep > 1 or under ZeRO-3 (partitioned as it is generated).
    model = build_parallel_model(cfg, groups, deepspeed_config(cfg, precision))
    if cfg.train.compile:
        compile_blocks(model)
    extra: dict[str, Any] = {}
    if layout.pp > 1:
        # DeepSpeed's partitioned sends (1/tp of a stage's output from each TP rank, all-gathered on arrival)
        # assume the TP ranks hold the same activations, which sequence parallelism breaks, and a stage output
        # of one tensor (ours also carries the running MoE aux loss).
        extra["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        return PipelineTrainModule(model, cfg, groups, precision, device, extra)
    return DeepSpeedTrainModule(model, cfg, groups, precision, device, extra)
