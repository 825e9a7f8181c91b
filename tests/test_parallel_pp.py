"""Pipeline parallelism (DeepSpeed PipelineModule, 1F1B) against single-process PyTorch.

The stage wrappers are checked in one process; the rest runs the real trainer under torchrun (PP2, PP2xDP2)
and compares losses, gradients, exact resume and resume under another layout (PP2 -> PP1, PP1 -> PP2).
This file doubles as the torchrun worker of the gradient test (``python tests/test_parallel_pp.py grads ...``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train.__main__  # noqa: F401  (registers the run-dir resolver used by conf/config.yaml)
from data.stream import GlobalBatchLoader
from model.config import ConfigError
from model.loss import causal_lm_loss
from model.transformer import Transformer
from tests.reference import micro_batch_reference
from tests.rounding import mean_cross_entropy_error
from tests.utils import PYTHON, REPO, TINY, child_env, free_port, read_metrics, run_train, train_losses
from train.config import RunConfig, build_run_config
from train.parallel.pp import layer_specs, model_key_to_pipeline_key, pipeline_key_to_model_key

STEPS = 10
REL_TOL = 1e-5
CROSS_LAYOUT_TOL = 1e-4


def run_config(overrides: list[str], world_size: int = 1) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides, "run_dir=unused"])
    return build_run_config(OmegaConf.to_container(cfg, resolve=True), world_size=world_size)


_REFERENCES: dict[str, list[dict[str, float]]] = {}


def reference(model: str) -> list[dict[str, float]]:
    if model not in _REFERENCES:
        _REFERENCES[model] = micro_batch_reference([*TINY, f"model={model}"], STEPS)[0]
    return _REFERENCES[model]


def assert_matches_reference(run_dir: Path, ref: list[dict[str, float]]) -> None:
    rows = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(rows) == list(range(1, len(ref) + 1)), sorted(rows)
    for step, want in enumerate(ref, start=1):
        for key in ("loss", "ce_loss"):
            got = rows[step][key]
            assert abs(got - want[key]) <= REL_TOL * abs(want[key]), (step, key, got, want[key])
        # aux is a small part of the loss: held to the loss's tolerance, not to 1e-5 of its own size
        assert abs(rows[step]["aux_loss"] - want["aux_loss"]) <= REL_TOL * abs(want["loss"]), (step, rows[step])
    assert ref[-1]["ce_loss"] < ref[0]["ce_loss"]


# ------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("model,tied", [("dense_tiny", True), ("hybrid_tiny", False)])
def test_stage_chain_equals_model_forward_and_names_map_back(model, tied, sample_data):
    """The pipeline layers run in sequence, then the loss the last stage applies, give the model's logits and loss
    exactly, and their state-dict keys map one-to-one onto ``Transformer.state_dict()`` (each key with the same
    tensor)."""
    run = run_config([f"model={model}", f"model.tie_embeddings={str(tied).lower()}"])
    torch.manual_seed(run.train.seed)
    net = Transformer(run.model)
    specs = layer_specs(net)
    layers = [spec.build() for spec in specs]
    tokens = torch.randint(0, run.model.vocab_size, (2, 16))
    labels = torch.randint(0, run.model.vocab_size, (2, 16))
    h = tokens
    for i, layer in enumerate(layers):
        h = specs[i].forward_fn(layer, h) if getattr(specs[i], "forward_fn", None) else layer(h)
    hidden, aux = h
    want = net(tokens, labels=labels)
    assert torch.equal(net.lm_head(hidden), net(tokens).logits)
    assert torch.equal(net.head_loss(hidden, labels)[1] + aux.sum(), want.loss)
    unfused = causal_lm_loss(net.lm_head(hidden), labels)  # the loss the fused head stands for
    # Two float32 evaluations of one loss, each within the rounding bound of the exact one.
    bound = mean_cross_entropy_error(hidden.reshape(-1, hidden.shape[-1]), net.lm_head.weight, labels.reshape(-1))
    assert abs(float(net.head_loss(hidden, labels)[1] - unfused)) <= 2 * bound
    if run.model.family != "dense":
        assert float(aux.sum()) > 0

    model_state = net.state_dict()
    mapped = {}
    for i, layer in enumerate(layers):
        if getattr(specs[i], "forward_fn", None):
            continue  # the tied LM head: its weight is layer 0's
        for key, tensor in layer.state_dict().items():
            name = pipeline_key_to_model_key(i, key, run.model)
            assert model_key_to_pipeline_key(name, run.model) == (i, key)
            mapped[name] = tensor
    expected = {k for k in model_state if not (tied and k == "lm_head.weight")}
    assert set(mapped) == expected
    assert all(mapped[k] is model_state[k] or torch.equal(mapped[k], model_state[k]) for k in expected)


def test_pipeline_refuses_zero2_and_bad_partition(sample_data):
    with pytest.raises(ConfigError, match="ZeRO stage 0 or 1"):
        run_config(["parallel=pp2", "parallel.zero_stage=2"], world_size=2)
    run_config(["parallel=pp2", "parallel.zero_stage=1"], world_size=2)
    from train.parallel.pp import _partition_method

    with pytest.raises(ConfigError, match="pp_partition"):
        _partition_method("by_magic")
    with pytest.raises(ConfigError, match="parallel.pp_partition"):
        run_config(["parallel=pp2", "++parallel.pp_partition=by_magic"], world_size=2)


# ------------------------------------------------------------------------------------------ torchrun
@pytest.mark.slow
@pytest.mark.parametrize(
    "model,nproc,zero,extra",
    [
        ("dense_tiny", 2, 0, []),
        ("hybrid_tiny", 2, 1, ["++model.activation_checkpointing=true"]),
        ("dense_tiny", 4, 1, ["++parallel.pp_partition=uniform"]),
        ("moe_tiny", 4, 0, []),
        ("hybrid_tiny", 4, 0, ["++parallel.pp_partition=blocks"]),
    ],
)
def test_pipeline_losses_match_single_process(model, nproc, zero, extra, sample_data, tmp_path):
    """PP2 (2 ranks) and PP2 x DP2 (4 ranks): 10 steps of loss, ce and aux as in one process (activation
    checkpointing and the stage partitioning change no number)."""
    overrides = [*TINY, f"model={model}", f"parallel=zero{zero}", "parallel.pp=2", "train.ckpt_every=100", *extra]
    overrides.append(f"run_dir={tmp_path}")
    run_train(overrides, nproc=nproc)
    assert_matches_reference(tmp_path, reference(model))


@pytest.mark.slow
def test_pipeline_moe_resume_exact_and_across_layouts(sample_data, tmp_path):
    """moe_tiny at PP2 (ZeRO-1): matches one process; stop at step 5 and resume at PP2 is bit-identical;
    the same checkpoint resumed at PP1 (one rank, ZeRO-0), and a PP1 checkpoint resumed at PP2, follow the
    uninterrupted run within 1e-4."""
    base = [*TINY, "model=moe_tiny", "parallel=pp2"]
    full = tmp_path / "full"
    run_train([*base, f"run_dir={full}"], nproc=2)
    full_losses = train_losses(full)
    assert_matches_reference(full, reference("moe_tiny"))

    part = tmp_path / "part"
    run_train([*base, f"run_dir={part}", "train.stop_at=5"], nproc=2)
    assert (part / "checkpoints" / "latest").resolve().name == "step_5"
    single = tmp_path / "single"
    shutil.copytree(part, single, symlinks=True)
    proc = run_train([*base, f"run_dir={part}"], nproc=2)
    assert "resumed from" in proc.stdout
    resumed = train_losses(part)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(6, STEPS + 1):
        assert resumed[step] == full_losses[step], (step, resumed[step], full_losses[step])

    # PP2 -> PP1: the layout-free copy of the checkpoint (model-named weights and AdamW state).
    proc = run_train([*TINY, "model=moe_tiny", "parallel=zero0", f"run_dir={single}"], nproc=1)
    assert "resumed from" in proc.stdout
    resumed = train_losses(single)
    for step in range(6, STEPS + 1):
        assert abs(resumed[step] - full_losses[step]) <= CROSS_LAYOUT_TOL, (step, resumed[step], full_losses[step])

    # PP1 -> PP2.
    one = tmp_path / "one"
    run_train([*TINY, "model=moe_tiny", "parallel=zero1", f"run_dir={one}", "train.stop_at=5"], nproc=1)
    proc = run_train([*base, f"run_dir={one}"], nproc=2)
    assert "resumed from" in proc.stdout
    resumed = train_losses(one)
    for step in range(1, STEPS + 1):
        assert abs(resumed[step] - full_losses[step]) <= CROSS_LAYOUT_TOL, (step, resumed[step], full_losses[step])


@pytest.mark.slow
def test_pipeline_refuses_zero2_end_to_end(sample_data, tmp_path):
    proc = run_train([*TINY, "parallel=pp2", "parallel.zero_stage=2", f"run_dir={tmp_path}"], nproc=2, check=False)
    assert proc.returncode != 0
    assert "ZeRO stage 0 or 1" in proc.stderr and "parallel.zero_stage" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_pipeline_gradients_match_single_process(sample_data, tmp_path):
    """hybrid_tiny (Mamba, attention, MoE aux) with tied embeddings at PP2: the first step's gradients (before
    clipping, the tied embedding's copies on both stages all-reduced) equal the single-process ones within 1e-5."""
    overrides = ["model=hybrid_tiny", "model.tie_embeddings=true"]
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), __file__, "grads", str(tmp_path), *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-6000:]

    run = run_config(overrides)
    torch.manual_seed(run.train.seed)
    net = Transformer(run.model)
    loader = GlobalBatchLoader(
        run.data, seq_len=run.train.seq_len, global_batch_size=run.train.global_batch_size,
        micro_batch_size=run.train.micro_batch_size, dp_rank=0, dp_size=1, seed=run.train.seed,
    )
    batch = loader.batch(0)
    for micro in batch:
        (net(micro[:, :-1], labels=micro[:, 1:]).loss / batch.shape[0]).backward()
    want = dict(net.named_parameters())
    got: dict[str, torch.Tensor] = {}
    for f in sorted(tmp_path.glob("grads_stage*.pt")):
        got.update(torch.load(f))
    assert set(got) == set(want), sorted(set(want) ^ set(got))
    for name, grad in got.items():
        ref = want[name].grad
        err = float((grad - ref).abs().max())
        assert err <= REL_TOL * float(ref.abs().max()) + 1e-12, (name, err, float(ref.abs().max()))


def _grads_worker(out_dir: str, overrides: list[str]) -> None:
    """torchrun worker: one pipeline step at PP2 of the trainer's TrainModule; dumps each stage's gradients (model
    names) as the optimizer sees them (after the data-parallel and tied-weight reductions; clipping off)."""
    import torch.distributed as dist

    from train.engine import init_distributed
    from train.parallel.dims import make_layout
    from train.parallel.groups import init_groups
    from train.train_module import build_train_module

    world = int(os.environ["WORLD_SIZE"])
    run = run_config([*overrides, "parallel=pp2", "parallel.zero_stage=0", "train.grad_clip=0"], world_size=world)
    init_distributed(torch.device("cpu"))
    layout = make_layout(run.parallel, run.model, world, dist.get_rank())
    module = build_train_module(run, init_groups(layout), "fp32", torch.device("cpu"))
    loader = GlobalBatchLoader(
        run.data, seq_len=run.train.seq_len, global_batch_size=run.train.global_batch_size,
        micro_batch_size=run.train.micro_batch_size, dp_rank=layout.dp_rank, dp_size=run.dp_size,
        seed=run.train.seed,
    )
    grads: dict[str, torch.Tensor] = {}

    def snapshot(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for name, p in module.named_parameters():
            grads[name] = p.grad.detach().clone()

    module.engine.optimizer.register_step_pre_hook(snapshot)
    module.train_batch(loader.batch(0))
    if layout.dp_rank == 0:
        torch.save(grads, Path(out_dir) / f"grads_stage{layout.pp_rank}.pt")
    dist.barrier()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "grads":
    _grads_worker(sys.argv[2], sys.argv[3:])
