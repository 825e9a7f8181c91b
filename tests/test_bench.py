"""The benchmark scripts run end to end on CPU (their dry modes), so they keep up with the code they measure."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from bench import gpu
from tests.utils import REPO


def test_gpu_bench_dry_run_trains_every_family(tmp_path):
    out = tmp_path / "rows.json"
    rows = gpu.main(["--dry", "--json", str(out)])
    assert [r["config"] for r in rows] == [c.label for c in gpu.DRY_CONFIGS]
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row
        assert math.isfinite(row["loss"]) and 0 < row["loss"] < 2 * math.log(8000), row
        assert 0 < row["mfu"] < 1 and row["params_active"] <= row["params_total"], row
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
    for (family, loop), (sec, tokens, _, ratio, fused_ratio) in rows.items():
        assert float(sec) > 0 and float(tokens) > 0, (family, loop)
        if loop == "transformers":
            assert ratio == "1.00x"
        if loop == "transformers, trainer opt":
            assert fused_ratio == "1.00x"
