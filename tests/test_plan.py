"""The layout planner (`python -m train.plan`): its formulas, its search over the trainer's own validator, the
CLI's table, JSON and errors, and the prediction the trainer logs for its own run. The model-state bytes it
predicts come from `train.memory.model_states`, which tests/test_memory.py holds to the live engines' bytes."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace

import pytest

from model.config import ConfigError, ModelConfig
from model.flops import param_counts
from tests.utils import PYTHON, REPO, TINY, child_env, read_metrics, run_train
from train.config import ParallelConfig, TrainConfig
from train.parallel.dims import validate_layout
from train.plan.__main__ import main
from train.plan.cluster import ClusterConfig, load_cluster
from train.plan.predict import predict, search
from train.plan.step_time import all_gather, all_reduce, pipeline_bubble_fraction

# A 1.3B GPT-style shape (d 2048, 24 layers) in the project's SwiGLU form.
GPT_1B = ModelConfig(name="gpt1b", vocab_size=50304, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                     ffn_hidden=5504, max_seq_len=2048)


def _h100(nodes: int = 1) -> ClusterConfig:
    return load_cluster(["cluster=h100_8x", f"cluster.nodes={nodes}"])


def _predict(parallel: ParallelConfig, nodes: int = 1, model: ModelConfig = GPT_1B, mb: int = 2, gb: int = 256):
    return predict(model, parallel, _h100(nodes), seq_len=2048, micro_batch=mb, global_batch=gb)


def test_collective_and_bubble_formulas() -> None:
    assert pipeline_bubble_fraction(8, 4) == pytest.approx(3 / 11)
    assert pipeline_bubble_fraction(8, 1) == 0
    # Ring all-reduce moves 2(n-1)/n of the bytes per rank; all-gather half that; one rank moves nothing.
    assert all_reduce(8e9, 8, 1e9, 0.0) == pytest.approx(14.0)
    assert all_gather(8e9, 8, 1e9, 0.0) == pytest.approx(7.0)
    assert all_reduce(1e9, 1, 1e9, 1.0) == 0.0
    assert all_reduce(0, 4, 1e9, 1e-3) == pytest.approx(6e-3)  # latency: 2(n-1) hops


def test_bubble_shrinks_with_more_micro_batches_and_tp_across_nodes_is_slower() -> None:
    few = _predict(ParallelConfig(zero_stage=1, pp=4), nodes=2, mb=8, gb=128)
    many = _predict(ParallelConfig(zero_stage=1, pp=4), nodes=2, mb=1, gb=128)
    assert few.micro_batches == 4 and many.micro_batches == 32
    assert few.time.bubble / few.time.total > many.time.bubble / many.time.total
    inside = _predict(ParallelConfig(zero_stage=1, tp=8), nodes=2)
    across = _predict(ParallelConfig(zero_stage=1, tp=16), nodes=2)  # 16 > 8 GPUs a node: TP over the NICs
    assert across.time.tp_comm > 5 * inside.time.tp_comm


def test_recompute_trades_memory_for_time() -> None:
    runs = {mode: _predict(ParallelConfig(zero_stage=1), model=replace(GPT_1B, activation_checkpointing=mode))
            for mode in ("none", "selective", "full")}
    mem = {m: p.memory["activations"] for m, p in runs.items()}
    time = {m: p.time.total for m, p in runs.items()}
    assert mem["none"] > mem["selective"] > mem["full"]
    assert time["none"] < time["selective"] < time["full"]
    assert runs["none"].memory["activations_full"] == pytest.approx(mem["full"])


def test_zero_stages_shrink_model_states() -> None:
    states = [_predict(ParallelConfig(zero_stage=z), nodes=4) for z in range(4)]
    held = [p.memory["parameters"] + p.memory["gradients"] + p.memory["optimizer"] for p in states]
    # ZeRO-1 and ZeRO-2 hold the same at the step; ZeRO-1 also holds the unreduced gradients during backward.
    assert held[0] > held[1] == held[2] > held[3]
    assert states[1].memory["communication"] > states[2].memory["communication"]
    # Mixed precision: bf16 weights (2 bytes), float32 master weights and Adam moments (12); ZeRO-0 holds bf16
    # gradients (2), ZeRO-1/2/3 a float32 partition of them (4). Over 32 data-parallel ranks ZeRO-1/2 partition
    # gradients and optimizer states, ZeRO-3 the weights too (its small parameters, kept whole, add well under 1%).
    n = param_counts(GPT_1B)["total"]
    assert held[0] * 2**30 == pytest.approx(16 * n, rel=1e-9)
    assert held[1] * 2**30 == pytest.approx((2 + 16 / 32) * n, rel=1e-9)
    assert held[3] * 2**30 == pytest.approx(18 / 32 * n, rel=0.01) and held[3] * 2**30 >= 18 / 32 * n


def test_tokens_per_second_and_mfu_agree_with_the_step_time() -> None:
    p = _predict(ParallelConfig(zero_stage=1, tp=2), nodes=2)
    world = 16
    assert p.tokens_per_s_per_gpu == pytest.approx(256 * 2048 / p.time.total / world)
    # MFU from the model's FLOPs written out here: 6 per matmul weight (q, k, v, o; SwiGLU's three; the LM head)
    # plus 12 * layers * seq * heads * head_dim for scores and values, over the H100's dense bf16 peak.
    d, layers, ffn, vocab, seq = 2048, 24, 5504, 50304, 2048
    weights = layers * (4 * d * d + 3 * d * ffn) + vocab * d
    flops_per_token = 6 * weights + 12 * layers * seq * 16 * 128
    assert _h100(2).peak_flops == 989e12
    assert p.mfu == pytest.approx(p.tokens_per_s_per_gpu * flops_per_token / 989e12, rel=1e-12)
    assert p.time.total >= p.time.compute  # compute is on the critical path


def test_search_returns_only_valid_fitting_layouts_fastest_first() -> None:
    cluster = _h100(nodes=2)
    from train.config import TrainConfig

    train = TrainConfig(seq_len=2048, global_batch_size=64, micro_batch_size=1)
    found = search(GPT_1B, train, cluster)
    assert found
    speeds = [p.tokens_per_s_per_gpu for p in found]
    assert speeds == sorted(speeds, reverse=True)
    layouts = {(p.layout.tp, p.layout.pp, p.zero_stage) for p in found}
    assert any(pp > 1 for _, pp, _ in layouts) and any(tp > 1 for tp, _, _ in layouts)
    for p in found:
        assert p.fits and p.memory_per_gpu_gb * 2**30 <= cluster.usable_memory
        lay = p.layout
        validate_layout(ParallelConfig(zero_stage=p.zero_stage, tp=lay.tp, pp=lay.pp, ep=lay.ep), GPT_1B, 16)
        assert not (lay.pp > 1 and p.zero_stage > 1)  # DeepSpeed's pipeline engine: ZeRO 0-1 only
        assert 64 % (p.micro_batch * lay.dp) == 0


def test_a_layout_that_does_not_fit_says_so() -> None:
    big = replace(GPT_1B, d_model=8192, n_heads=64, n_kv_heads=64, ffn_hidden=22016, n_layers=48)  # ~40B
    p = _predict(ParallelConfig(zero_stage=0), model=big)
    assert not p.fits and p.memory_per_gpu_gb > 80


def test_cli_prints_a_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["model=dense_1b", "cluster=a100_80g_8x", "cluster.nodes=2", "parallel.tp=2", "parallel.zero_stage=1",
            "train.seq_len=1024", "train.micro_batch_size=2", "train.global_batch_size=64"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("memory_per_gpu_gb", "step_time_s", "tokens_per_s_per_gpu", "mfu", "fits"):
        assert key in out
    assert out["layout"] == {"tp": 2, "pp": 1, "dp": 8, "ep": 1, "cp": 1, "zero_stage": 1, "sequence_parallel": True}
    assert math.isclose(out["step_time_s"], sum(v for k, v in out["step_time_breakdown_s"].items()
                                                if k in ("compute", "tp_comm", "ep_comm", "pp_comm", "bubble",
                                                         "dp_exposed", "optimizer")), rel_tol=1e-9)
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "memory per GPU (GB)" in table and "step time (s)" in table and "MFU" in table


def test_cli_refuses_an_invalid_layout_or_cluster_in_one_line() -> None:
    for args, key in ((["model=dense_1b", "parallel.tp=3"], "parallel.tp"),
                      (["cluster=nope"], "cluster"),
                      (["cluster.matmul_efficiency=2"], "cluster.matmul_efficiency")):
        proc = subprocess.run([PYTHON, "-m", "train.plan", *args], cwd=REPO, env=child_env(), capture_output=True,
                              text=True, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"config error: {key}"), proc.stderr


def test_invalid_layouts_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="parallel.zero_stage"):
        _predict(ParallelConfig(zero_stage=3, pp=2))


def test_trainer_logs_the_prediction_beside_the_measurement(tmp_path) -> None:
    run_train([*TINY, "parallel=zero2", f"run_dir={tmp_path}"], nproc=2)
    rows = read_metrics(tmp_path)
    first = next(r for r in rows if "plan/step_time_s" in r)
    last = [r for r in rows if "measured/step_time_s" in r][-1]
    assert first["step"] == 0 and first["plan/step_time_s"] > 0 and first["plan/memory_per_gpu_gb"] > 0
    assert last["plan/step_time_s"] == first["plan/step_time_s"]
    assert last["measured/step_time_s"] > 0 and last["measured/memory_per_gpu_gb"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plan/step_time_s"] == first["plan/step_time_s"]


def test_budget_picks_the_fitted_laws_optimum_for_the_flops_its_layout_delivers(tmp_path, capsys) -> None:
    """A synthetic ladder report (Hoffmann et al.'s fitted constants, with bootstrap samples): the planner's
    (N, D) must be the law's compute-optimal point for the FLOPs its chosen layout delivers, the optimum computed
    here in closed form."""
    import numpy as np

    E, A, alpha, B, beta = 1.69, 406.4, 0.34, 410.7, 0.28
    gen = np.random.default_rng(0)
    boot = np.array([E, A, alpha, B, beta]) * (1 + 0.01 * gen.standard_normal((200, 5)))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"params_kind": "total", "fit": {"E": E, "A": A, "alpha": alpha, "B": B,
                                                                 "beta": beta, "bootstrap_params": boot.tolist()}}))
    hours = 50_000
    args = ["model=dense_tiny", "model.max_seq_len=2048", "cluster=h100_8x", "cluster.nodes=8", "train.seq_len=2048",
            "train.global_batch_size=512", f"--budget-gpu-hours={hours}", f"--fit={report}",
            f"--out={tmp_path / 'chosen.yaml'}", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    layout = out["layout"]
    flops = hours * 3600 * 989e12 * layout["mfu"]  # what the chosen layout delivers
    assert out["flops"] == pytest.approx(flops, rel=1e-12)
    k = out["flops_per_param"]  # training FLOPs per token per parameter of the chosen shape
    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n_opt = g * (flops / k) ** (beta / (alpha + beta))
    d_opt = flops / (k * n_opt)
    assert out["n_params"] == pytest.approx(n_opt, rel=0.10)
    assert out["tokens"] == pytest.approx(d_opt, rel=0.10)
    loss = E + A / out["n_params"] ** alpha + B / out["tokens"] ** beta
    assert out["predicted_loss"] == pytest.approx(loss)
    lo, hi = out["loss_interval"]
    assert lo < loss < hi
    assert layout["fits"]
    chosen = ModelConfig.from_dict(__import__("yaml").safe_load((tmp_path / "chosen.yaml").read_text()))
    from model.flops import flops_per_token, param_counts

    assert param_counts(chosen)["total"] == out["n_params"]
    assert k == pytest.approx(flops_per_token(chosen, 2048) / out["n_params"])


def test_calibrate_measures_this_machine_into_a_cluster_config(tmp_path) -> None:
    out = tmp_path / "cpu_local.yaml"
    proc = subprocess.run([PYTHON, "-m", "train.plan", "calibrate", "--out", str(out)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    cluster = ClusterConfig.from_dict(yaml.safe_load(out.read_text()))
    assert cluster.name == "cpu_local" and cluster.gpus_per_node == 2 and cluster.precision == "fp32"
    assert 0 < cluster.matmul_efficiency <= 1 and 0 < cluster.attention_efficiency <= 1
    assert cluster.hbm_bandwidth > 1e8 and cluster.intra_node_bandwidth > 1e6 and cluster.intra_node_latency_s > 0
    # The host's costs: an operator under autograd, a collective call, DeepSpeed's per-parameter work.
    assert 0 < cluster.op_overhead_s < 1e-3 and cluster.collective_overhead_s >= 0
    assert cluster.zero_param_s >= 0 and cluster.zero3_param_s > 0 and cluster.gather_scatter_slowdown >= 1
    assert [d for d, _ in cluster.matmul_efficiency_by_dim] == [32, 64, 128, 256, 512, 1024]
    # Fractions of a peak no GEMM beat: the nominal 2.5 GHz one, or the fastest GEMM where a core turbos above it.
    from train.metrics import cpu_flops_per_cycle

    assert cluster.peak_flops >= 2.5e9 * cpu_flops_per_cycle()
    assert all(0 < e <= 1 for _, e in cluster.matmul_efficiency_by_dim)
    assert "# Host allocator: " in out.read_text()
    assert not cluster.overlap_comm
    # The planner runs on it.
    p = predict(GPT_1B, ParallelConfig(zero_stage=1), cluster, seq_len=512, micro_batch=1, global_batch=4)
    assert p.time.total > 0 and p.layout.dp == 2


def test_context_parallelism_divides_activations_and_pays_all_to_alls() -> None:
    """A 32k-token sequence of the 1.3B model: one rank's activations do not fit an H100 without recompute; CP8
    holds an eighth of them per GPU and adds the attention all-to-alls; the search finds CP layouts."""
    long = replace(GPT_1B, max_seq_len=32768)
    runs = {cp: predict(long, ParallelConfig(zero_stage=1, cp=cp), _h100(), seq_len=32768, micro_batch=1,
                        global_batch=64 // cp) for cp in (1, 8)}
    one, eight = runs[1], runs[8]
    assert not one.fits and eight.fits
    # per token an eighth; the fused loss's one [vocab, d_model] gradient buffer stays whole
    assert one.memory["activations"] / 8 < eight.memory["activations"] < 1.05 * one.memory["activations"] / 8
    assert one.time.cp_comm == 0 and eight.time.cp_comm > 0
    # ZeRO partitions over data x context parallel ranks: 8 either way (dp 8 at CP1, cp 8 at dp 1)
    assert eight.memory["optimizer"] == pytest.approx(one.memory["optimizer"], rel=1e-12)
    found = search(long, replace(TrainConfig(), seq_len=32768, global_batch_size=8, micro_batch_size=1), _h100())
    assert any(p.layout.cp > 1 for p in found)


# ----------------------------------------------------------------------------------------- host-side counting
def _model(name: str, **overrides: object) -> ModelConfig:
    import yaml

    from model.config import config_from_dict

    raw = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    return config_from_dict(ModelConfig, raw | overrides, "model")


DENSE_TINY = _model("dense_tiny")


def _dispatched_ops(cfg: ModelConfig, micro_batch: int, seq_len: int) -> int:
    """Operators the live model dispatches in one forward + backward (CPU autograd runs backward on this thread,
    so the dispatch mode sees it)."""
    import torch

    from model.transformer import Transformer
    from train.plan.calibrate_host import _Count

    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1))
    with _Count() as counter:
        model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
    return counter.ops


@pytest.mark.parametrize(("name", "mode"), [("dense_tiny", "none"), ("dense_tiny", "full"),
                                            ("dense_tiny", "selective"), ("moe_tiny", "none"),
                                            ("hybrid_tiny", "none")])
def test_operator_counts_match_the_live_model(name: str, mode: str) -> None:
    """The planner's per-block operator counts (train/plan/host.py) are what the model code dispatches, for every
    family, recompute mode, a second sequence length (Mamba's scan grows by chunks) and micro-batch (the loss by
    chunks)."""
    from train.plan import host

    cfg = _model(name, activation_checkpointing=mode)
    for micro_batch, seq_len in ((1, 128), (4, 384)):
        planned = sum(sum(host.block_ops(cfg, i, seq_len, micro_batch)) for i in range(cfg.n_layers))
        planned += sum(host.outside_ops(cfg, micro_batch * seq_len))
        assert planned == pytest.approx(_dispatched_ops(cfg, micro_batch, seq_len), rel=0.05)


def _cpu(**costs: float) -> ClusterConfig:
    """Two ranks whose only cost besides arithmetic is the one named: free links, no overlap."""
    return load_cluster(["cluster=cpu_local", "cluster.gpus_per_node=2", "cluster.intra_node_latency_s=0",
                         "cluster.intra_node_bandwidth=1.0e+30", "cluster.op_overhead_s=0",
                         "cluster.collective_overhead_s=0", "cluster.zero_param_s=0", "cluster.zero3_param_s=0",
                         *[f"cluster.{k}={v}" for k, v in costs.items()]])


def _tiny_step(cluster: ClusterConfig, parallel: ParallelConfig, model: ModelConfig = DENSE_TINY, mb: int = 2):
    return predict(model, parallel, cluster, seq_len=64, micro_batch=mb, global_batch=16).time


def test_zero_charges_deepspeed_per_parameter_and_micro_batch() -> None:
    """ZeRO 1-2 pay their gradient hook on every parameter in every micro-batch, ZeRO-0 none; ZeRO-3 pays its fetch
    for every parameter above the persistence threshold (the norms stay gathered)."""
    from train.memory import param_specs, zero_buckets

    specs = param_specs(DENSE_TINY)
    gathered = sum(s.numel > zero_buckets(DENSE_TINY).persistence_threshold for s in specs)
    assert 0 < gathered < len(specs)
    micro_batches = 16 // (2 * 2)
    for stage in (0, 1, 2, 3):
        base = _tiny_step(_cpu(), ParallelConfig(zero_stage=stage))
        hooked = _tiny_step(_cpu(zero_param_s=1e-3, zero3_param_s=1e-2), ParallelConfig(zero_stage=stage))
        expected = {0: 0.0, 1: len(specs) * 1e-3, 2: len(specs) * 1e-3, 3: gathered * 1e-2}[stage]
        assert hooked.total - base.total == pytest.approx(micro_batches * expected)
        assert hooked.host == pytest.approx(micro_batches * expected)


def test_tensor_parallel_charges_its_collectives_per_block() -> None:
    """Each TP block issues 4 collectives per micro-batch without sequence parallelism (2 all-reduces forward,
    2 backward) and 12 with it (2 all-gathers and 2 reduce-scatters forward, their transposes and 2 re-gathers
    backward, 2 norm-gradient all-reduces); full recompute repeats the forward's."""
    deep = replace(DENSE_TINY, n_layers=2 * DENSE_TINY.n_layers)
    micro_batches = 16 // 2
    for sp, per_block in ((False, 4), (True, 12)):
        for mode, extra in (("none", 0), ("full", 2 if not sp else 4)):
            par = ParallelConfig(zero_stage=0, tp=2, sequence_parallel=sp)
            shallow_t = _tiny_step(_cpu(collective_overhead_s=1e-3), par, replace(DENSE_TINY, activation_checkpointing=mode))
            deep_t = _tiny_step(_cpu(collective_overhead_s=1e-3), par, replace(deep, activation_checkpointing=mode))
            added = (deep_t.tp_comm - shallow_t.tp_comm) / micro_batches / DENSE_TINY.n_layers
            assert added == pytest.approx((per_block + extra) * 1e-3)


def test_without_overlap_every_reduction_is_exposed_and_zero2_reduces_every_micro_batch() -> None:
    cluster = load_cluster(["cluster=cpu_local", "cluster.gpus_per_node=2"])
    assert not cluster.overlap_comm
    one = _tiny_step(cluster, ParallelConfig(zero_stage=2), mb=8)
    four = _tiny_step(cluster, ParallelConfig(zero_stage=2), mb=2)
    assert one.dp_exposed == one.dp_comm and four.dp_exposed == four.dp_comm
    # four micro-batches: four reduce-scatters and one gather instead of one of each
    assert four.dp_comm == pytest.approx(one.dp_comm * 5 / 2, rel=0.01)
    overlapped = _tiny_step(replace(cluster, overlap_comm=True), ParallelConfig(zero_stage=2), mb=2)
    assert overlapped.dp_exposed < overlapped.dp_comm


def test_thin_gemms_run_at_their_measured_efficiency() -> None:
    cluster = replace(_h100(), matmul_efficiency=0.8, matmul_efficiency_by_dim=((32, 0.4), (128, 0.6), (512, 0.8)))
    assert cluster.gemm_efficiency(16) == 0.4 and cluster.gemm_efficiency(4096) == 0.8
    assert cluster.gemm_efficiency(64) == pytest.approx(0.5)  # log-linear between 32 and 128
    assert _h100().gemm_efficiency(64) == _h100().matmul_efficiency  # GPU clusters: one efficiency
    with pytest.raises(ConfigError, match="matmul_efficiency_by_dim"):
        ClusterConfig.from_dict({"matmul_efficiency_by_dim": [[64, 1.5]]})
