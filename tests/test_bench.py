"""The benchmark scripts run end to end on CPU (their dry modes), so they keep up with the code they measure."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from bench import gpu
from model.flops import flops_per_token
from model.transformer import Transformer
from tests.utils import REPO


def test_gpu_bench_dry_run_trains_every_family(tmp_path):
    out = tmp_path / "rows.json"
    rows = gpu.main(["--dry", "--json", str(out)])
    assert [r["config"] for r in rows] == [c.label for c in gpu.DRY_CONFIGS]
    for bench, row in zip(gpu.DRY_CONFIGS, rows, strict=True):
        assert row["status"] == "ok", row
        cfg = gpu.model_config(bench)
        # tokens/s is the timed steps' tokens over their time, MFU the model's FLOPs at that rate over the peak
        assert row["tokens_per_s"] * row["step_s"] == pytest.approx(bench.batch * bench.seq_len, rel=1e-9), row
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops_per_token(cfg, bench.seq_len) / 989e12,
                                           rel=1e-9), row
        assert row["params_total"] == Transformer(cfg).num_params(), row
        # a few steps at lr 1e-4 from the initialisation: the loss is still near that of a uniform guess
        assert abs(row["loss"] - math.log(cfg.vocab_size)) < 0.5, row
    written = json.loads(out.read_text())
    assert written["rows"] == rows and written["machine"]["device"] == "cpu"


def test_gpu_bench_configs_are_valid_and_the_moe_matches_dense_active_size():
    configs = {c.label: gpu.model_config(c) for c in gpu.CONFIGS}
    assert {cfg.family for cfg in configs.values()} == {"dense", "moe", "hybrid"}
    dense, moe = (gpu.describe(c, configs[c.label]) for c in gpu.CONFIGS[:2])
    assert moe["params_active"] == pytest.approx(dense["params_active"], rel=0.01)


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_fallback_yaml_parser_reads_model_configs_as_pyyaml_does(path):
    assert gpu.parse_flat_yaml(path.read_text()) == yaml.safe_load(path.read_text())


def test_data_bench_measures_the_training_loader(sample_data):
    from bench import bench_data

    rows = bench_data.main(
        ["--data", "sample", "--shapes", "2x64", "--repeats", "1", "--seconds", "0.05", "--workers", "0"]
    )
    assert len(rows) == 1 and rows[0]["seq_len"] == 64
    for key in ("batch_tokens_per_s", "iter_tokens_per_s", "dense_1b_h100_tokens_per_s"):
        assert math.isfinite(rows[0][key]) and rows[0][key] > 0, key


def test_training_step_bench_times_every_family_against_transformers():
    """bench_train_step.py at a tiny shape, one repeat: each family's four loops (ours and transformers', with
    torch's optimizer step and the trainer's) train and get a time and both ratios."""
    cmd = [sys.executable, "bench/bench_train_step.py", "--families", "dense", "moe", "hybrid", "--d-model", "64",
           "--layers", "2", "--ffn-hidden", "64", "--seq-len", "16", "--batch", "1", "--repeats", "1",
           "--warmup", "0", "--allocator", "system"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loops = ("transformers", "ours", "transformers, trainer opt", "ours, trainer opt")
    rows = {(ln[:8].strip(), ln[8:34].strip()): ln[34:].split() for ln in proc.stdout.splitlines()
            if ln[:8].strip() in ("dense", "moe", "hybrid")}
    assert sorted(rows) == sorted((f, loop) for f in ("dense", "moe", "hybrid") for loop in loops), proc.stdout
    def secs(family: str, loop: str) -> tuple[float, float]:
        """The printed seconds, as the interval their 4 decimals leave."""
        sec = float(rows[family, loop][0])
        return sec - 5e-5, sec + 5e-5

    for (family, loop), (sec, tokens, _, ratio, fused_ratio) in rows.items():
        lo, hi = secs(family, loop)
        assert 16 / hi - 0.5 <= float(tokens) <= 16 / lo + 0.5, (family, loop)  # batch 1 x seq 16 per step
        # With one repeat each ratio is the reference loop's time over this loop's (printed to 2 decimals).
        for ref_loop, printed in (("transformers", ratio), ("transformers, trainer opt", fused_ratio)):
            ref_lo, ref_hi = secs(family, ref_loop)
            assert ref_lo / hi - 0.005 <= float(printed.rstrip("x")) <= ref_hi / lo + 0.005, (family, loop, ref_loop)
        if loop == "transformers":
            assert ratio == "1.00x"
        if loop == "transformers, trainer opt":
            assert fused_ratio == "1.00x"
