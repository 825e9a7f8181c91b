"""Layouts composed from tensor (megatron-core layers, sequence parallel), pipeline (DeepSpeed 1F1B), data (ZeRO)
and expert parallelism, against one process on the same micro-batches: the real trainer's losses over 8 steps,
and every gradient of the first step gathered from the ranks' pieces."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.parallel_check import References, check_layout
from tests.utils import PYTHON, REPO, TINY, child_env

STEPS = 8
REL_TOL = 1e-5
BASE = [*TINY, f"train.steps={STEPS}", "train.ckpt_every=4", "train.keep_last=3", "train.global_batch_size=8",
        "train.micro_batch_size=2"]

# (id, model, ranks, parallel overrides)
LAYOUTS = [
    ("dense-tp2-pp2", "dense_tiny", 4, ["parallel=tp2_pp2"]),
    ("moe-tp2-pp2", "moe_tiny", 4, ["parallel=pp2", "parallel.tp=2"]),
    ("hybrid-tp2-pp2", "hybrid_tiny", 4, ["parallel=pp2", "parallel.tp=2"]),
    ("dense-tp2-pp2-dp2", "dense_tiny", 8, ["parallel=pp2", "parallel.tp=2"]),
    ("moe-pp2-ep2", "moe_tiny", 4, ["parallel=pp2", "parallel.ep=2"]),
    ("moe-tp2-pp2-ep2", "moe_tiny", 8, ["parallel=tp2_pp2_ep2"]),
    ("moe-tp2-ep2-zero2", "moe_tiny", 4, ["parallel=tp2_ep2", "parallel.zero_stage=2"]),
    ("hybrid-tp2-ep2-zero2", "hybrid_tiny", 4, ["parallel=tp2_ep2", "parallel.zero_stage=2"]),
    ("dense-tp2-sp", "dense_tiny", 2, ["parallel=tp2", "parallel.zero_stage=1"]),
    ("hybrid-tp2-sp", "hybrid_tiny", 2, ["parallel=tp2", "parallel.zero_stage=1"]),
    ("dense-tp2-pp2-nosp", "dense_tiny", 4, ["parallel=pp2", "parallel.tp=2", "parallel.sequence_parallel=false"]),
]

TORCHRUN_CASE = "parallel=tp2_pp2"
reference = References(BASE, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("case", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_layout_matches_single_process(case, sample_data, tmp_path):
    _, model, ranks, parallel = case
    want = reference(model)
    # One layout under torchrun itself (fresh interpreters, its rendezvous); the others fork the warmed test process.
    check_layout([*BASE, f"model={model}", *parallel, "train.ckpt_every=100"], ranks, want, tmp_path, REL_TOL,
                 fork=TORCHRUN_CASE not in parallel)
    assert want[0][0]["grad_norm"] > 1.0  # clipping is active, so the global norm over all pieces matters


def test_loop_and_checkpoint_code_never_ask_for_the_layout():
    pattern = re.compile(r"pipeline|Pipeline|\.pp\b|is_pipeline")
    for path in ("train/trainer.py", "train/checkpoint.py"):
        hits = [line for line in (REPO / path).read_text().splitlines() if pattern.search(line)]
        assert not hits, (path, hits)


def test_megatron_core_is_imported_only_for_model_parallel_layouts(sample_data):
    """Everything a data-parallel run imports leaves megatron-core out (its import costs seconds per process)."""
    code = (
        "import sys; import train.trainer, train.train_module, train.checkpoint, train.export, train.parallel.pp; "
        "assert not any(m.startswith('megatron') for m in sys.modules), 'megatron imported by a DP run'"
    )
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
