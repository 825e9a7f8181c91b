"""data.prepare scaled out: --workers N is byte-identical to one process; array-job tasks merged into one
index give the single job's token stream and global batches; merge refuses missing or mismatched parts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data import prepare as prepmod
from data import prepare_parallel
from data.corpus import expand_inputs, iter_documents
from data.prepare_parallel import BatchEncoder, task_from_env
from data.source import TokenSource
from data.stream import DataConfig, GlobalBatchLoader, SourceConfig
from data.tokenizer import Tokenizer
from tests.test_data_prepare import assert_digests_match

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "artifacts/tokenizer/shakespeare.model"
OTHER_TOKENIZER = ROOT / "artifacts/tokenizer/shakespeare512.model"
LINES = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
         "Rough winds do shake the darling buds of May,", "And summer's lease hath all too short a date;",
         "To be, or not to be, that is the question:", "Now is the winter of our discontent"]
OPTIONS = ["--member-tokens", "300", "--shard-tokens", "900", "--val-fraction", "0.2", "--quiet"]

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"needs {TOKENIZER} (make data)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Text files and jsonl records (some blank, one empty), so tasks cut inside a jsonl file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)

    def text(n: int) -> str:
        return "\n".join(LINES[i] for i in rng.integers(0, len(LINES), n)) + "\n"

    for i in range(9):
        (root / f"doc{i:02d}.txt").write_text(text(int(rng.integers(3, 60))))
    (root / "empty.txt").write_text("")
    with open(root / "records.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": text(int(rng.integers(1, 25))) if i != 7 else ""}) + "\n")
            if i % 11 == 0:
                fh.write("\n")
    return root


def _prepare(corpus: Path, out: Path, *extra: str, tokenizer: Path = TOKENIZER) -> None:
    args = ["--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out), *OPTIONS, *extra]
    assert prepmod.main(args) == 0


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    _prepare(corpus, out)
    return out


@pytest.fixture(scope="module")
def merged(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks") / "out"
    for task_id in (2, 0, 1):  # order of completion does not matter
        _prepare(corpus, out, "--num-tasks", "3", "--task-id", str(task_id))
    assert prepmod.main(["merge", "--out", str(out)]) == 0
    return out


def test_workers_output_is_byte_identical(corpus, single, tmp_path, monkeypatch):
    # Small worker batches, so the tiny corpus makes many batches and both workers encode several each.
    monkeypatch.setattr(prepare_parallel, "WORKER_BATCH_CHARS", 2000)
    docs = list(iter_documents(expand_inputs([corpus])))
    tok = Tokenizer.load(TOKENIZER)
    with BatchEncoder(tok, np.dtype("<u2"), workers=2) as encoder:
        batches = list(encoder.encode(docs))
    assert len(batches) > 8
    assert [i for ids, _ in batches for i in ids] == [d.doc_id for d in docs]
    encoded = [a.tolist() for _, arrays in batches for a in arrays]
    assert encoded == [tok.encode(d.text) + [tok.eos_id] if d.text else [] for d in docs]

    _prepare(corpus, tmp_path / "w2", "--workers", "2")
    expected, got = _files(single), _files(tmp_path / "w2")
    assert sorted(got) == sorted(expected) and len(expected) > 4  # several shards per split
    for name, data in expected.items():
        assert got[name] == data, name


def test_merged_tasks_give_the_single_job_stream_and_batches(single, merged):
    one = json.loads((single / "index.json").read_text())
    many = json.loads((merged / "index.json").read_text())
    assert [p["path"] for p in many["parts"]] == ["part-0", "part-1", "part-2"]
    assert [p["documents"] for p in many["parts"]] == [[0, 16], [16, 33], [33, 50]]  # 10 files, then 40 records
    for split in ("train", "val"):
        assert many["splits"][split]["documents"] == one["splits"][split]["documents"] > 0
        assert many["splits"][split]["tokens"] == one["splits"][split]["tokens"]
        assert all(s["path"].startswith("part-") for s in many["splits"][split]["shards"])
        a, b = TokenSource(single, split), TokenSource(merged, split)
        assert a.num_tokens == b.num_tokens
        np.testing.assert_array_equal(b.read(0, b.num_tokens), a.read(0, a.num_tokens))
    # Member boundaries differ (each part ends on a short member), the stream does not.
    def member_tokens(index: dict) -> list[int]:
        return [m["tokens"] for s in index["splits"]["train"]["shards"] for m in s["members"]]

    assert member_tokens(many) != member_tokens(one)
    for key in ("dtype", "member_tokens", "tokenizer", "vocab_size", "eos_id", "val_fraction"):
        assert many[key] == one[key], key
    assert assert_digests_match(single, one) and assert_digests_match(merged, many)

    def batches(path: Path) -> list[torch.Tensor]:
        loader = GlobalBatchLoader(DataConfig(sources=[SourceConfig(str(path))], num_workers=0, shuffle=True),
                                   seq_len=32, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1, seed=7)
        return [loader.batch(step) for step in range(6)]

    for x, y in zip(batches(single), batches(merged), strict=True):
        assert torch.equal(x, y)


def test_merge_of_version_1_parts_computes_their_digests(merged, tmp_path):
    """A part written before format version 2 (no digests) merges into a version 2 index whose digests are
    computed from its files: the same index as merging version 2 parts."""
    out = tmp_path / "out"
    shutil.copytree(merged, out)
    part = out / "part-1" / "index.json"
    old = json.loads(part.read_text())
    old["format_version"] = 1
    for info in old["splits"].values():
        for shard in info["shards"]:
            del shard["sha256"]
            for m in shard["members"]:
                del m["sha256"]
    part.write_text(json.dumps(old))
    assert prepmod.main(["merge", "--out", str(out)]) == 0
    a, b = (json.loads((d / "index.json").read_text()) for d in (merged, out))
    assert b["format_version"] == 2 and a["splits"] == b["splits"]
    assert assert_digests_match(out, b)


def test_merge_refuses_missing_and_mismatched_parts(corpus, merged, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(merged, out)
    (out / "part-1" / "index.json").unlink()  # a task that died before finishing
    with pytest.raises(RuntimeError) as err:
        prepmod.main(["merge", "--out", str(out)])
    line = str(err.value)
    assert "\n" not in line and "part-1 of 3" in line and "--task-id I" in line and "I in 1" in line

    _prepare(corpus, out, "--num-tasks", "3", "--task-id", "1", tokenizer=OTHER_TOKENIZER)
    assert not (out / "index.json").exists()  # a task re-run drops the merged index it makes stale
    with pytest.raises(RuntimeError) as err:
        prepmod.main(["--merge", "--out", str(out)])
    line = str(err.value)
    assert "\n" not in line and "part-1 was tokenized with a different tokenizer" in line
    assert f"re-run task 1 with --tokenizer {TOKENIZER}" in line

    _prepare(corpus, out, "--num-tasks", "3", "--task-id", "1", "--member-tokens", "200")
    with pytest.raises(RuntimeError, match=r"part-1 has member_tokens 200, part-0 has 300; re-run task 1"):
        prepmod.main(["merge", "--out", str(out)])

    with pytest.raises(FileNotFoundError, match="no complete part"):
        prepmod.main(["merge", "--out", str(tmp_path / "nothing")])


def test_slurm_array_defaults_and_cli_merge(corpus, single, tmp_path):
    env = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_STEP": "2"}
    assert task_from_env(None, None, env) == (3, 4)  # --array=1-7:2 -> ids 1, 3, 5, 7 -> tasks 0..3
    assert task_from_env(2, 1, env) == (1, 2)  # explicit arguments win
    assert task_from_env(None, None, {}) is None
    with pytest.raises(ValueError, match="pass --task-id I"):
        task_from_env(3, None, {})
    with pytest.raises(ValueError, match="need 0 <= task id"):
        task_from_env(None, None, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "2"})

    # Two array tasks through the real CLI, told who they are only by the environment.
    out = tmp_path / "out"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    cmd = [sys.executable, "-m", "data.prepare", "--input", str(corpus), "--tokenizer", str(TOKENIZER),
           "--out", str(out), *OPTIONS]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**base, "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": str(i)},
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "python -m data.prepare merge --out" in err
    assert sorted(p.name for p in out.iterdir()) == ["part-0", "part-1"]
    done = subprocess.run([sys.executable, "-m", "data.prepare", "merge", "--out", str(out)], cwd=ROOT, env=base, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "merged 2 parts" in done.stderr
    for split in ("train", "val"):
        a, b = TokenSource(single, split), TokenSource(out, split)
        np.testing.assert_array_equal(b.read(0, b.num_tokens), a.read(0, a.num_tokens))

    shutil.rmtree(out / "part-0")
    failed = subprocess.run([sys.executable, "-m", "data.prepare", "merge", "--out", str(out)], cwd=ROOT, env=base, check=False,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error: merge: part-0 of 2")
