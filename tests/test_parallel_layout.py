"""The parallel layout: rank arithmetic agrees with DeepSpeed's topologies, and every layout that cannot work is
refused with its sizes and the fix before any process group exists (in-process and through the CLI)."""

from __future__ import annotations

import subprocess

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train.__main__  # noqa: F401  (registers the run-dir resolver used by conf/config.yaml)
from model.config import ConfigError
from tests.utils import PYTHON, REPO, TINY, child_env
from train.config import build_run_config
from train.parallel.dims import Layout, make_layout


def run_config(overrides: list[str], world: int):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides, "run_dir=unused"])
    return build_run_config(OmegaConf.to_container(cfg, resolve=True), world_size=world)


# (overrides, world size, config key, words the one-line message must contain)
INVALID = [
    (["parallel.tp=3"], 4, "parallel.tp", ["world size 4", "tp*cp*pp = 3*1*1"]),
    (["parallel.cp=3"], 4, "parallel.cp", ["world size 4", "tp*cp*pp = 1*3*1"]),
    (["parallel.cp=8"], 8, "parallel.cp", ["n_heads/tp = 4/1 = 4", "divides 4"]),
    (["parallel.tp=2", "parallel.cp=4"], 8, "parallel.cp", ["n_heads/tp = 4/2 = 2"]),
    (["model=moe_tiny", "parallel.ep=2", "parallel.cp=2"], 4, "parallel.ep", ["cp=2", "parallel.ep=1"]),
    (["model=moe_tiny", "model.capacity_factor=1.25", "parallel.cp=2"], 2, "model.capacity_factor", ["dropless"]),
    (["parallel.cp=2", "train.seq_len=33"], 2, "train.seq_len", ["parallel.cp=2", "multiple of 2"]),
    (["parallel.cp=2", "parallel.tp=2", "train.seq_len=34"], 4, "train.seq_len", ["sequence parallel", "multiple of 4"]),
    (["parallel.cp=2", "train.compile=true"], 2, "train.compile", ["context parallelism"]),
    (["parallel.tp=0"], 4, "parallel.tp", [">= 1"]),
    (["parallel.zero_stage=4"], 2, "parallel.zero_stage", ["stages 0-3"]),
    (["parallel.tp=8"], 8, "parallel.tp", ["n_heads=4", "tp=8"]),
    (["parallel.tp=4"], 4, "parallel.tp", ["n_kv_heads=2", "tp=4"]),
    (["parallel.tp=2", "model.ffn_hidden=385"], 2, "parallel.tp", ["ffn_hidden=385"]),
    (["parallel.tp=2", "model.vocab_size=8001"], 2, "parallel.tp", ["vocab_size=8001", "multiple of 2"]),
    (["parallel.ep=2"], 2, "parallel.ep", ["MoE layers", "dense_tiny"]),
    (["model=moe_tiny", "parallel.ep=3"], 3, "parallel.ep", ["num_experts=4", "ep=3"]),
    (["model=moe_tiny", "parallel.ep=4"], 2, "parallel.ep", ["dp = world/(tp*pp) = 2/1 = 2"]),
    (["model=moe_tiny", "parallel=zero3", "parallel.ep=2"], 2, "parallel.zero_stage", ["ZeRO stages 0-2"]),
    (["parallel.pp=8", "parallel.zero_stage=1"], 8, "parallel.pp", ["n_layers=4"]),
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, "parallel.zero_stage", ["pp=2", "ZeRO stage 0 or 1"]),
    (["parallel.tp=2", "model.tie_embeddings=true", "model.vocab_size=8001"], 2, "parallel.tp",
     ["vocab_size=8001", "multiple of 2"]),
    (["model=hybrid_tiny", "parallel.tp=4", "model.n_heads=8", "model.n_kv_heads=4", "model.mamba_expand=1",
      "model.d_model=130", "++model.head_dim=16"], 4, "parallel.tp", ["mamba_d_inner=130"]),
    (["parallel=tp2", "train.seq_len=31"], 2, "train.seq_len", ["not divisible by parallel.tp=2",
                                                                 "sequence_parallel=false"]),
    (["parallel=tp2"], 3, "parallel.tp", ["world size 3"]),
]


@pytest.mark.parametrize("overrides,world,key,words", INVALID, ids=[" ".join(c[0]) for c in INVALID])
def test_invalid_layout_is_refused_with_sizes_and_fix(overrides, world, key, words, sample_data):
    with pytest.raises(ConfigError) as info:
        run_config(overrides, world)
    message = str(info.value)
    assert info.value.key == key, message
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)


@pytest.mark.parametrize(
    "overrides,world",
    [
        (["parallel=tp2", "parallel.zero_stage=2"], 2),
        (["parallel=tp2_zero1"], 4),
        (["parallel=pp2"], 2),
        (["parallel=pp2_dp2"], 4),
        (["model=moe_tiny", "parallel=ep2"], 2),
        (["model=hybrid_tiny", "parallel=tp2"], 2),
        (["model=moe_tiny", "parallel=tp2_ep2"], 4),
        (["parallel=tp2", "parallel.sequence_parallel=false", "train.seq_len=31"], 2),
        (["parallel=tp2", "parallel.pp=2", "parallel.zero_stage=1"], 4),
        (["model=moe_tiny", "parallel=pp2", "parallel.ep=2"], 4),
        (["model=moe_tiny", "parallel=tp2", "parallel.pp=2", "parallel.ep=2", "parallel.zero_stage=1"], 8),
        (["model=moe_tiny", "parallel=tp2_ep2", "parallel.zero_stage=0"], 4),
        (["parallel=cp2"], 2),
        (["model=hybrid_tiny", "parallel=cp2", "parallel.tp=2", "parallel.pp=2"], 16),
    ],
)
def test_shipped_layouts_are_valid(overrides, world, sample_data):
    run = run_config(overrides, world)
    p = run.parallel
    assert run.dp_size == world // (p.tp * p.pp * p.cp)
    assert run.grad_accum_steps * run.train.micro_batch_size * run.dp_size == run.train.global_batch_size


@pytest.mark.parametrize(
    "overrides,world,key",
    [(["parallel.tp=3"], "4", "parallel.tp"), (["model=moe_tiny", "parallel=ep2", "parallel.ep=3"], "2", "parallel.ep")],
)
def test_cli_refuses_layout_before_any_process_group(overrides, world, key, tmp_path, sample_data):
    run_dir = tmp_path / "run"
    # WORLD_SIZE without torchrun: the config is validated before torch.distributed is touched, so this one
    # process sees the world of a 4-rank launch and must exit at once.
    env = child_env(WORLD_SIZE=world, RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = subprocess.run(
        [PYTHON, "-m", "train", *TINY, *overrides, f"run_dir={run_dir}"], check=False, cwd=REPO, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error:")]
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_rank_arithmetic_partitions_the_world_like_deepspeed_topology():
    """2 nodes x 8 GPUs as tp=4, pp=2, dp=2 (ep=2): every family of groups partitions the 16 ranks, groups of
    different kinds meet in exactly one rank, and the coordinates are DeepSpeed's (pipe, data, model) ones."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    base = Layout(world=16, dp=2, tp=4, pp=2, ep=2)
    layouts = [Layout(world=16, dp=2, tp=4, pp=2, ep=2, rank=r) for r in range(16)]
    for family in (base.tp_groups(), base.dp_groups(), base.pp_groups(), base.ep_groups(), base.edp_groups()):
        assert sorted(r for g in family for r in g) == list(range(16))
    assert base.tp_groups()[0] == [0, 1, 2, 3]  # TP inside a node (fastest-varying)
    assert base.dp_groups()[0] == [0, 4] and base.pp_groups()[0] == [0, 8]
    for tp_group in base.tp_groups():
        for dp_group in base.dp_groups():
            assert len(set(tp_group) & set(dp_group)) <= 1
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=4, num_dp=2)
    for lay in layouts:
        assert topo.get_rank(pipe=lay.pp_rank, data=lay.dp_rank, model=lay.tp_rank) == lay.rank
        assert lay.global_rank(lay.pp_rank, lay.dp_rank, lay.tp_rank) == lay.rank
        assert lay.dp_rank == lay.edp_rank * lay.ep + lay.ep_rank


def test_make_layout_gives_each_rank_its_coordinates(sample_data):
    run = run_config(["parallel=tp2_zero1"], 4)
    coords = [(lay.dp_rank, lay.tp_rank) for lay in (make_layout(run.parallel, run.model, 4, r) for r in range(4))]
    assert coords == [(0, 0), (0, 1), (1, 0), (1, 1)]  # TP pairs read the same data-parallel slice


def test_context_parallel_ranks_sit_between_tensor_and_data_parallel():
    """tp=2, cp=2, dp=2, pp=2 on 16 ranks: TP fastest, then CP, then DP, then PP (megatron-core's tp-cp-ep-dp-pp);
    DeepSpeed's data axis is dp x cp, so its topology agrees with the same ranks."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    base = Layout(world=16, dp=2, tp=2, pp=2, cp=2)
    layouts = [Layout(world=16, dp=2, tp=2, pp=2, cp=2, rank=r) for r in range(16)]
    for family in (base.tp_groups(), base.cp_groups(), base.dp_groups(), base.dp_cp_groups(), base.pp_groups()):
        assert sorted(r for g in family for r in g) == list(range(16))
    assert base.tp_groups()[0] == [0, 1] and base.cp_groups()[0] == [0, 2] and base.dp_groups()[0] == [0, 4]
    assert base.dp_cp_groups()[0] == [0, 2, 4, 6] and base.pp_groups()[0] == [0, 8]
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=4)
    for lay in layouts:
        assert topo.get_rank(pipe=lay.pp_rank, data=lay.dp_cp_rank, model=lay.tp_rank) == lay.rank
        assert lay.global_rank(lay.pp_rank, lay.dp_rank, lay.tp_rank, lay.cp_rank) == lay.rank
