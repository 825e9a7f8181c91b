"""Remote sources through the node cache, against a real nginx on loopback: bytes fetched over an epoch with a
cache of a quarter of the source, shards and members refused by size and sha256, unreachable shards under
data.on_error=skip replaced exactly as missing local ones, and the config checks of URL sources.

Loaders that fetch run in forked children (tests.servers.in_child): fsspec's event-loop thread must not live on
in the test process, which forks the trainer's ranks in other tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.prepare import write_index, write_token_shards
from data.stream import DataConfig, DataConfigError, FetchSettings, GlobalBatchLoader, SourceConfig
from tests.servers import Nginx, in_child, nginx_binary

T = 16  # seq_len; members of T/2 tokens: an epoch fetches each about 1.4 times with a quarter-size cache
SAMPLES = 1024
ALTERED, TRUNCATED, DOWN = "train-000002.tar", "train-000003.tar", "train-000004.tar"


def _index(src: Path) -> dict:
    return json.loads((src / "index.json").read_text())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    binary, why = nginx_binary()
    if binary is None:
        pytest.skip(f"no nginx: {why}")
    root = tmp_path_factory.mktemp("cache")
    www = root / "www"
    tokens = np.arange(SAMPLES * T + 1) % 60000
    write_token_shards(www / "set", {"train": [tokens]}, vocab_size=65536, member_tokens=T // 2, shard_tokens=512)
    assert _index(www / "set")["format_version"] == 2
    bad = shutil.copytree(www / "set", www / "bad")
    member = _index(bad)["splits"]["train"]["shards"][2]["members"][5]
    with open(bad / ALTERED, "r+b") as f:  # one payload byte: same size, same headers, another sha256
        f.seek(member["offset"] + 3)
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    os.truncate(bad / TRUNCATED, (bad / TRUNCATED).stat().st_size // 2)  # cuts members, not just tar padding
    v1 = shutil.copytree(bad, www / "v1")  # the same damage under an index without digests
    index = _index(v1)
    index["format_version"] = 1
    for shard in index["splits"]["train"]["shards"]:
        shard.pop("sha256")
        for m in shard["members"]:
            m.pop("sha256")
    write_index(v1, index)
    down = shutil.copytree(www / "set", root / "down")  # what a local loader sees when the shard is missing
    (down / DOWN).unlink()
    nginx = Nginx(www, root / "nginx", locations=f"location /down/ {{ alias {www / 'set'}/; }} "
                                               f"location = /down/{DOWN} {{ return 500; }}")
    yield {"root": root, "www": www, "down": down, "url": nginx.url, "nginx": nginx}
    nginx.stop()


def _loader(path: str | Path, cache: Path, cache_bytes: float = 2**30, on_error: str = "raise",
            shuffle: bool = True) -> GlobalBatchLoader:
    fetch = FetchSettings(cache_dir=str(cache), cache_max_gb=cache_bytes / 2**30, fetch_retries=1,
                          fetch_backoff_s=0.01)
    cfg = DataConfig(sources=[SourceConfig(str(path))], num_workers=0, on_error=on_error, shuffle=shuffle,
                     fetch=fetch)
    return GlobalBatchLoader(cfg, seq_len=T, global_batch_size=16, micro_batch_size=4, dp_rank=0, dp_size=1, seed=3)


def _epoch(path: str | Path, cache: Path, cache_bytes: float = 2**30, on_error: str = "raise") -> list[list[int]]:
    loader = _loader(path, cache, cache_bytes, on_error)
    return [batch.reshape(-1).tolist() for _, batch in zip(range(SAMPLES // 16), loader, strict=False)]


def _tar_bytes(nginx: Nginx, name: str) -> int:
    return sum(int(ln.split()[1]) for ln in nginx.access_log.read_text().splitlines()
               if ln.startswith("2") and f"/{name}/train-" in ln)


def test_an_epoch_with_a_quarter_cache_fetches_under_twice_the_source(served):
    local = _epoch(served["www"] / "set", served["root"] / "unused")
    payload = SAMPLES * T * 2  # uint16 tokens: the source's bytes without tar headers
    cache = served["root"] / "quarter"
    before = _tar_bytes(served["nginx"], "set")
    result = in_child(lambda: (_epoch(f"{served['url']}/set", cache, payload / 4),
                               _loader(f"{served['url']}/set", cache, payload / 4).sources[0].mode))
    assert "ok" in result, result
    batches, mode = result["ok"]
    assert mode == "member" and batches == local
    fetched = _tar_bytes(served["nginx"], "set") - before
    print(f"quarter cache: fetched {fetched} bytes over one epoch of {payload} ({fetched / payload:.2f}x)")
    assert payload <= fetched <= 2 * payload
    cached = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts)
    assert cached <= payload / 4

    whole = served["root"] / "whole"  # a cache that holds the source: each shard downloaded once
    before = _tar_bytes(served["nginx"], "set")
    assert in_child(lambda: _epoch(f"{served['url']}/set", whole))["ok"] == local
    shards = sum(s["bytes"] for s in _index(served["www"] / "set")["splits"]["train"]["shards"])
    assert _tar_bytes(served["nginx"], "set") - before == shards


@pytest.mark.parametrize("name", ["bad", "v1"])
@pytest.mark.parametrize("cache_bytes", [2**30, 4096], ids=["shard", "member"])
def test_altered_or_truncated_remote_shards_are_refused(served, name, cache_bytes):
    url = f"{served['url']}/{name}"
    result = in_child(lambda: _epoch(url, served["root"] / f"refused-{name}-{cache_bytes}", cache_bytes))
    error = result["error"]
    assert error.startswith("DataReadError: corrupt") and "\n" not in error, error
    if f"{url}/{TRUNCATED}" in error:
        assert ("bytes fetched" in error and "index expects" in error) or "HTTP 416" in error  # range past the end
    else:
        assert f"{url}/{ALTERED}" in error
        if name == "bad":
            assert "sha256" in error and "index expects" in error
        else:  # version 1: no digests; the payload byte goes unnoticed, the truncated shard does not
            pytest.fail(f"only the truncated shard is detectable without digests: {error}")
    skipped = in_child(lambda: _epoch(url, served["root"] / f"skip-{name}-{cache_bytes}", cache_bytes, "skip"))
    assert "ok" in skipped


@pytest.mark.parametrize("cache_bytes", [2**30, 8192], ids=["shard", "member"])
def test_an_unreachable_shard_under_skip_is_replaced_like_a_missing_local_one(served, cache_bytes, capfd):
    expected = _epoch(served["down"], served["root"] / "unused", on_error="skip")
    cache = served["root"] / f"down-{cache_bytes}"
    got = in_child(lambda: _epoch(f"{served['url']}/down", cache, cache_bytes, "skip"))
    assert got["ok"] == expected
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if DOWN in ln and "unreachable" in ln]
    assert warnings and "HTTP 500 Internal Server Error, 2 attempts" in warnings[0]


def test_a_missing_index_or_shard_is_named_with_its_status(served, tmp_path):
    gone = in_child(lambda: _loader(f"{served['url']}/nothing-here", tmp_path)).get("error", "")
    assert f"{served['url']}/nothing-here/index.json (HTTP 404 not found, 2 attempts)" in gone
    shutil.copytree(served["www"] / "set", served["www"] / "deleted")
    (served["www"] / "deleted" / DOWN).unlink()
    error = in_child(lambda: _epoch(f"{served['url']}/deleted", tmp_path / "c"))["error"]
    assert error.startswith(f"DataReadError: unreachable shard {served['url']}/deleted/{DOWN} (HTTP 404 not found")
    refused = in_child(lambda: _loader("http://127.0.0.1:9/set", tmp_path)).get("error", "")
    assert "cannot fetch http://127.0.0.1:9/set/index.json (connection error" in refused


def test_url_sources_are_checked_in_the_config():
    ok = DataConfig.from_dict({"sources": [{"path": "s3://bucket/set"}], "cache_max_gb": 2, "fetch_retries": 0})
    assert ok.fetch.cache_max_bytes == 2 * 2**30 and ok.fetch.fetch_retries == 0
    for path, words in [("https://user:pw@host/set", "credentials in the URL are refused"),
                        ("ftp://host/set", "unsupported scheme 'ftp'"), ("s3:///set", "no host or bucket")]:
        with pytest.raises(DataConfigError) as err:
            DataConfig.from_dict({"sources": [{"path": path}]})
        assert err.value.key == "data.sources[0].path" and words in str(err.value) and "pw" not in str(err.value)
    with pytest.raises(DataConfigError) as err:
        DataConfig.from_dict({"sources": [{"path": "s3://b/s"}], "cache_max_gb": 0})
    assert err.value.key == "data.cache_max_gb"


def test_a_pipe_source_reads_what_its_command_writes(served, tmp_path):
    """``pipe:CMD`` (webdataset's convention, ``{}`` the file name): the same batches as the directory, whole shards
    even when the cache is smaller (a command has no ranged reads); a failing command is named with its status."""
    src = served["www"] / "set"
    local = _epoch(src, tmp_path / "unused")
    got = in_child(lambda: (_epoch(f"pipe:cat {src}/{{}}", tmp_path / "pipe"),
                            _loader(f"pipe:cat {src}/{{}}", tmp_path / "pipe", 4096).sources[0].mode))
    assert got["ok"] == [local, "shard"]
    error = in_child(lambda: _epoch(f"pipe:cat {tmp_path}/nowhere/{{}}", tmp_path / "c"))["error"]
    assert error.startswith(f"FetchFailed: cannot fetch pipe:cat {tmp_path}/nowhere/index.json (the command exited "
                            "with status 1, 2 attempts)") and "\n" not in error, error
    with pytest.raises(DataConfigError) as err:
        DataConfig.from_dict({"sources": [{"path": "pipe:cat /data/index.json"}]})
    assert "needs {} where the file name goes" in str(err.value)
