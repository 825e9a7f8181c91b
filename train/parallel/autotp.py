"""Tensor parallelism (TP) through DeepSpeed AutoTP, with an explicit partition plan for our module names.

Why AutoTP (probed before building on it, 2 ranks, gloo, fp32, dense_tiny, 10 steps against one process):
- DeepSpeed AutoTP with ``tensor_parallel.partition_config`` matched the single-process losses to ~1e-6 relative
  with ZeRO-1, ZeRO-2 and ZeRO-3. It shards the weights inside ``deepspeed.initialize`` and lets ZeRO partition
  the shards over the data-parallel group only; the grad-norm for clipping sums the shards over the TP group.
  Checkpoints and DeepSpeed's universal-checkpoint conversion know the sharded layout (it records it on the
  model), so one mechanism covers training, ZeRO and resharding.
- DTensor ``parallelize_module`` works on gloo, but ZeRO would see DTensor parameters it does not understand
  (ZeRO flattens ``param.data`` into buckets), so TP x ZeRO would need FSDP2 instead of DeepSpeed.
- megatron-core's Column/RowParallelLinear need ``use_cpu_initialization`` on CPU and own their weights (our
  model would have to be rebuilt from them), and importing megatron-core costs ~30 s per process here.
Our attention/MLP names are Llama's, so the plan is short; we give it explicitly instead of relying on AutoTP's
model-type detection (which keys on HuggingFace class names and refuses our ``Transformer``).

What is sharded (TP ranks hold 1/tp of each):
- attention: ``q_proj``/``k_proj``/``v_proj`` column-parallel (whole heads per rank; ``Attention`` infers the head
  count from the projection shape), ``o_proj`` row-parallel (all-reduce of the output);
- SwiGLU: ``gate_proj``/``up_proj`` column-parallel, ``down_proj`` row-parallel;
- LM head: column-parallel over the vocabulary with gathered logits (``gather_output``), so the loss stays the
  plain ``causal_lm_loss`` on full logits. A vocabulary-parallel cross entropy would avoid the gather, but it
  needs the loss outside the model's ``forward``; at our sizes the gather is cheap. With tied embeddings the
  head is left replicated (sharding it would untie it).
What stays replicated (identical on every TP rank, gradients identical since inputs are): the embedding, norms,
MoE routers and experts (stacked ``w1/w2/w3`` parameters, not ``nn.Linear``, which AutoTP cannot shard; use
expert parallelism for those) and Mamba mixers (``conv1d``/``A_log``/``D`` are per-channel, not linear layers).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig

# (regex on the parameter name, AutoTP partition type, dim of the weight that is split)
COLUMN = r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$"
ROW = r".*\.(o_proj|down_proj)\.weight$"
LM_HEAD = r"^lm_head\.weight$"


def autotp_config(model: ModelConfig, tp: int) -> dict[str, Any]:
    """The ``tensor_parallel`` section of the DeepSpeed config for ``tp`` ranks."""
    specs: list[dict[str, Any]] = [
        {"patterns": [COLUMN], "partition_type": "column"},
        {"patterns": [ROW], "partition_type": "row"},
    ]
    if not model.tie_embeddings:
        specs.append({"patterns": [LM_HEAD], "partition_type": "column", "gather_output": True})
    return {"autotp_size": tp, "partition_config": {"use_default_specs": False, "layer_specs": specs}}


def partition_dim(name: str, model: ModelConfig) -> int | None:
    """The dim along which AutoTP splits parameter ``name`` (0: output rows, 1: input columns), None if replicated."""
    if re.match(COLUMN, name) or (not model.tie_embeddings and re.match(LM_HEAD, name)):
        return 0
    if re.match(ROW, name):
        return 1
    return None


def gather_tp(tensor: torch.Tensor, dim: int | None, group: Any) -> torch.Tensor:
    """The full tensor from the TP shards along ``dim`` (collective over ``group``); ``dim=None``: unchanged."""
    if dim is None or group is None or dist.get_world_size(group) == 1:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_full(module: nn.Module, model: ModelConfig, group: Any, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) of an AutoTP-sharded ``module`` at full size, keyed like the unsharded
    model. Collective over the TP ``group``; parameters must not be ZeRO-3 partitioned (use it with ZeRO 0-2)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        t = p.grad if grads else p
        if t is None:
            continue
        out[name] = gather_tp(t, partition_dim(name, model), group)
    return out


def is_tensor_parallel(module: nn.Module) -> bool:
    """Whether AutoTP sharded some of ``module``'s weights."""
    return any(getattr(p, "tensor_model_parallel", False) for p in module.parameters())


def tp_grad_norm(module: nn.Module, group: Any = None) -> torch.Tensor:
    """Global L2 gradient norm of an AutoTP-sharded module (ZeRO-0: gradients live on the parameters).

    Sharded weights (``tensor_model_parallel``) add their squares over the TP group; replicated ones, identical on
    every TP rank, count once. Collective over the TP group (DeepSpeed's, when ``group`` is None).
    """
    if group is None:
        from deepspeed.utils import groups as ds_groups

        group = ds_groups.get_tensor_model_parallel_group()
    grads = [p for p in module.parameters() if p.grad is not None]
    device = grads[0].grad.device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    for p in grads:
        sq = p.grad.detach().float().square().sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    dist.all_reduce(sharded, group=group)
    return (sharded + replicated).sqrt()
