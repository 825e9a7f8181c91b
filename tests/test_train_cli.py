"""The `python -m train` command line: config errors, W&B offline logs, checkpoints, score."""

from __future__ import annotations

import json
import resource
import signal

import numpy as np
import pytest
import torch

from data.stream import DataConfig, GlobalBatchLoader
from tests.utils import PYTHON, REPO, TINY, read_metrics, run_train, train_losses
from tests.wandb_records import config_values, history_rows, metric_definitions, read_records, wandb_files


@pytest.mark.parametrize(
    "override, key",
    [
        ("parallel.zero_stage=5", "parallel.zero_stage"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("data.sources=[{path: /nonexistent/shards, weight: 1.0}]", "data.sources"),
        ("train.micro_batch_size=3", "train.global_batch_size"),
        ("sched.name=linear", "sched.name"),
        ("model.no_such_option=1", None),  # Hydra refuses unknown keys itself
    ],
)
def test_bad_override_is_one_clear_line_and_creates_nothing(override, key, tmp_path, sample_data):
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, f"run_dir={run_dir}", override], check=False, timeout=120, fork=False)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    if key is not None:
        assert proc.returncode == 2
        lines = [ln for ln in err.splitlines() if ln.startswith("config error:")]
        assert len(lines) == 1 and key in lines[0], err
    else:
        assert "no_such_option" in err
    assert not run_dir.exists()


@pytest.mark.slow
def test_wandb_offline_run_holds_loss_series_and_config(tmp_path, sample_data):
    run_dir = tmp_path / "run"
    run_train([*TINY, "logging=wandb", "logging.log_every=1", "train.steps=4", f"run_dir={run_dir}"], fork=False)
    files = wandb_files(run_dir)
    assert len(files) == 1, files
    records = read_records(files[0])
    rows = [r for r in history_rows(records) if "train/loss" in r]
    jsonl = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    assert [r["_step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in rows] == pytest.approx([jsonl[s] for s in (1, 2, 3, 4)], rel=1e-12)
    assert all("train/tokens" in r and "train/flops" in r and "flops/loss" in r for r in rows)
    config = config_values(records)
    assert config["model"]["name"] == "dense_tiny" and config["train"]["steps"] == 4
    metrics = metric_definitions(records)
    assert metrics["train/*"] == "train/tokens" and metrics["flops/*"] == "train/flops"


def _limit_file_size() -> None:
    # Files over 64 KiB fail with EFBIG (like a full disk), small logs still write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


@pytest.mark.slow
def test_failed_checkpoint_save_keeps_last_good_one(tmp_path, sample_data):
    run_dir = tmp_path / "run"
    run_train([*TINY, f"run_dir={run_dir}", "train.stop_at=5"])
    good = (run_dir / "checkpoints" / "latest").resolve()
    before = sorted(p.name for p in good.rglob("*"))
    proc = run_train([*TINY, f"run_dir={run_dir}"], check=False, preexec_fn=_limit_file_size, timeout=180)
    assert proc.returncode == 1
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "step 10" in err[0] and "step_5" in err[0] and "free disk space" in err[0], proc.stderr
    assert (run_dir / "checkpoints" / "latest").resolve() == good
    assert sorted(p.name for p in good.rglob("*")) == before
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    # ... and the run resumes from it once the disk has room again.
    run_train([*TINY, f"run_dir={run_dir}"])
    assert (run_dir / "checkpoints" / "latest").resolve().name == "step_10"


@pytest.mark.slow
def test_score_logits_reproduce_the_logged_eval_loss(tmp_path, sample_data):
    run_dir = tmp_path / "run"
    run_train([*TINY, "parallel=zero3", f"run_dir={run_dir}"], nproc=2)
    eval_loss = [r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r][-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(eval_loss) and summary["steps"] == 10

    # The same held-out batches the trainer evaluated (global batches 0 and 1 of the val split).
    data = DataConfig.from_dict({"name": "sample", "sources": [{"path": str(sample_data), "weight": 1.0}]})
    loader = GlobalBatchLoader(data, seq_len=32, global_batch_size=4, micro_batch_size=4, dp_rank=0, dp_size=1,
                               seed=1234, split="val")
    seqs = torch.cat([loader.batch(i)[0] for i in range(2)]).numpy()
    np.save(tmp_path / "in.npy", seqs[:, :-1].astype(np.int64))
    import subprocess

    subprocess.run([PYTHON, "-m", "train.score", "--checkpoint", str(run_dir), "--tokens", str(tmp_path / "in.npy"),
                    "--out", str(tmp_path / "out.npy")], cwd=REPO, check=True, capture_output=True)
    logits = np.load(tmp_path / "out.npy")
    assert logits.dtype == np.float32 and logits.shape == (8, 32, 8000)
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(-1, 8000), torch.from_numpy(seqs[:, 1:]).reshape(-1))
    assert ce.item() == pytest.approx(eval_loss, rel=1e-5)
    assert train_losses(run_dir)[10] < train_losses(run_dir)[1]
