"""Training on shards read from real servers on loopback: nginx (HTTP) and moto (S3).

The same 2-rank dense_tiny run, stopped at the middle and resumed, reads the bundled corpus (a copy with index
format version 2) from local disk, from nginx and from moto: every loss is the same, bit for bit. A shard that
nginx answers with HTTP 500 mid-run is retried, then ends the run with one line naming its URL and the status.
A secret planted in the environment of the S3 run appears nowhere in its run directory, W&B files or output.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from data.prepare import write_index, write_token_shards
from data.shard_hash import FORMAT_VERSION, add_digests
from tests.servers import MotoS3, Nginx, nginx_binary
from tests.utils import TINY, run_train, train_losses

SECRET = f"planted-secret-{uuid.uuid4().hex}"
FAIL_SHARD = "train-000005.tar"  # of the unshuffled failure set: first needed by batch 4 (step 5)


def _upgrade_to_v2(src: Path) -> None:
    """The index of a set prepared before format version 2, with the digests data.prepare now writes."""
    index = json.loads((src / "index.json").read_text())
    for split in index["splits"].values():
        for shard in split["shards"]:
            add_digests(shard, src / shard["path"])
    index["format_version"] = FORMAT_VERSION
    write_index(src, index)


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_data):
    binary, why = nginx_binary()
    if binary is None:
        pytest.skip(f"no nginx: {why}")
    root = tmp_path_factory.mktemp("remote")
    www = root / "www"
    shutil.copytree(sample_data, www / "shakespeare", ignore=shutil.ignore_patterns("*.lock", ".*"))
    _upgrade_to_v2(www / "shakespeare")
    tokens = np.random.default_rng(0).integers(0, 8000, 40 * 32 + 1)  # 40 samples of seq_len 32, 10 shards
    write_token_shards(www / "fail", {"train": [tokens]}, vocab_size=8000, member_tokens=64, shard_tokens=128)
    nginx = Nginx(www, root / "nginx", locations=f"location = /fail/{FAIL_SHARD} {{ return 500; }}")
    moto = MotoS3(root / "moto")
    s3_url = moto.upload(www / "shakespeare", "shards", "shakespeare")
    yield {"root": root, "local": www / "shakespeare", "http": f"{nginx.url}/shakespeare", "s3": s3_url,
           "fail": f"{nginx.url}/fail", "nginx": nginx, "moto": moto}
    nginx.stop()
    moto.stop()


def _overrides(path: str, run_dir: Path, cache: Path) -> list[str]:
    return [*TINY, f"data.sources=[{{path:'{path}'}}]", f"data.cache_dir={cache}", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def local_losses(served) -> dict[int, float]:
    run_dir = served["root"] / "local"
    run_train(_overrides(str(served["local"]), run_dir, served["root"] / "unused"), nproc=2)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 11))
    return losses


def _stop_and_resume(path: str, run_dir: Path, cache: Path, extra: list[str] = ()) -> tuple[dict[int, float], str]:
    outputs = []
    for stage in ([*extra, "train.stop_at=5"], [*extra, "train.resume=auto"]):
        proc = run_train([*_overrides(path, run_dir, cache), *stage], nproc=2)
        outputs.append(proc.stdout + proc.stderr)
    assert "resumed from" in outputs[1]
    return train_losses(run_dir), "\n".join(outputs)


def test_http_run_matches_local_bit_for_bit_across_resume(served, local_losses):
    cache = served["root"] / "cache-http"
    losses, _ = _stop_and_resume(served["http"], served["root"] / "http", cache)
    assert losses == local_losses  # exact float equality, steps 1-5 and the resumed 6-10
    cached = [p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert len(cached) == 2  # the train and the val shard, each fetched once for the node
    requests = served["nginx"].access_log.read_text().splitlines()
    assert sum("/shakespeare/train-000000.tar" in ln for ln in requests) == 1


def test_s3_run_matches_local_and_keeps_the_secret(served, local_losses, monkeypatch):
    for key, value in served["moto"].env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any credentials
    run_dir = served["root"] / "s3"
    losses, output = _stop_and_resume(served["s3"], run_dir, served["root"] / "cache-s3",
                                      ["logging=wandb", "logging.mode=offline", "logging.log_every=1"])
    assert losses == local_losses
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.yaml" for p in files)
    assert SECRET not in output
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_a_shard_answering_500_mid_run_ends_it_in_one_line(served):
    run_dir = served["root"] / "fail"
    overrides = [*_overrides(served["fail"], run_dir, served["root"] / "cache-fail"), "data.shuffle=false",
                 "data.fetch_retries=2", "data.fetch_backoff_s=0.05", "data.prefetch_steps=1", "train.steps=12"]
    proc = run_train(overrides, nproc=2, check=False, timeout=240)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    url = f"{served['fail']}/{FAIL_SHARD}"
    lines = [ln for ln in proc.stderr.splitlines() if url in ln]
    assert lines and all(ln.startswith("error: rank ") for ln in lines), proc.stderr[-3000:]
    assert "HTTP 500 Internal Server Error, 3 attempts" in lines[0]
    assert min(train_losses(run_dir)) == 1  # it failed mid-run, after training began
    requests = [ln for ln in served["nginx"].access_log.read_text().splitlines() if FAIL_SHARD in ln]
    assert len(requests) >= 3 and all(ln.startswith("500 ") for ln in requests)


def test_s3_errors_name_the_url_and_the_cause(served, monkeypatch):
    from data.source import TokenSource
    from data.stream import FetchSettings
    from tests.servers import in_child

    for key, value in served["moto"].env.items():
        monkeypatch.setenv(key, value)
    fetch = FetchSettings(fetch_retries=1, fetch_backoff_s=0.01)
    missing = in_child(lambda: TokenSource(f"{served['s3']}-missing", "train", fetch=fetch).num_tokens)
    assert f"cannot fetch {served['s3']}-missing/index.json (no such key (404), 2 attempts)" in missing["error"]
    found = in_child(lambda: TokenSource(served["s3"], "train", fetch=fetch).num_tokens)
    assert found["ok"] == json.loads((served["local"] / "index.json").read_text())["splits"]["train"]["tokens"]
