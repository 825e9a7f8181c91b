"""data.stream: global batches fixed by (data, seed, step), exact epochs, resume, mixture, errors.

The sources hold known token streams (token value = base + position in the stream), written
by data.prepare's real shard writer, so every sample's content tells which window it is.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.prepare import write_token_shards
from data.stream import (
    DataConfig,
    DataConfigError,
    GlobalBatchLoader,
    SourceConfig,
    decode_sample_id,
    iter_webdataset_tokens,
)

T = 16  # seq_len
BASES = {"a": 0, "b": 20000, "c": 40000}
SAMPLES = {"a": 50, "b": 13, "c": 31}
CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def _write_source(path: Path, base: int, n_tokens: int, member_tokens: int = 100, shard_tokens: int = 300) -> Path:
    tokens = base + np.arange(n_tokens, dtype=np.int64)
    cuts = [0, 7, 150, 151, 420, n_tokens]  # documents of uneven length; only their concatenation matters
    docs = [tokens[lo:hi] for lo, hi in itertools.pairwise(cuts) if hi > lo]
    write_token_shards(path, {"train": docs, "val": [base + np.arange(3 * T + 1)]}, vocab_size=65536,
                       member_tokens=member_tokens, shard_tokens=shard_tokens)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: _write_source(root / name, BASES[name], SAMPLES[name] * T + 1) for name in BASES}


def _cfg(sources, names=("a",), weights=None, num_workers=0, shuffle=True) -> DataConfig:
    weights = weights or [1.0] * len(names)
    return DataConfig(sources=[SourceConfig(str(sources[n]), w) for n, w in zip(names, weights, strict=True)],
                      num_workers=num_workers, shuffle=shuffle)


def _loader(cfg, *, gbs=8, mbs=2, rank=0, dp=1, seed=7, **kw) -> GlobalBatchLoader:
    return GlobalBatchLoader(cfg, seq_len=T, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=rank, dp_size=dp,
                             seed=seed, **kw)


def _windows(batch: torch.Tensor, names=("a",)) -> list[tuple[int, int]]:
    """(source, sample index) of each row, read from the tokens; checks each row is one contiguous window."""
    rows = batch.reshape(-1, T + 1)
    out = []
    for row in rows.tolist():
        source = max(i for i, n in enumerate(names) if row[0] >= BASES[n])
        start = row[0] - BASES[names[source]]
        assert start % T == 0 and row == list(range(row[0], row[0] + T + 1))
        out.append((source, start // T))
    return out


def test_global_batches_do_not_depend_on_dp_size_or_micro_batch(sources):
    names = ("a", "b")
    cfg = _cfg(sources, names, [0.6, 0.4])
    ref = _loader(cfg, gbs=8, mbs=8)
    for dp, mbs in [(1, 2), (2, 2), (2, 4), (4, 1), (4, 2), (8, 1)]:
        ranks = [_loader(cfg, gbs=8, mbs=mbs, rank=r, dp=dp) for r in range(dp)]
        assert ranks[0].grad_accum_steps == 8 // (mbs * dp)
        for step in range(20):  # 160 samples: several epochs of both sources
            ids = [r.sample_ids(step) for r in ranks]
            assert ids[0].shape == (8 // (mbs * dp), mbs)
            assert torch.equal(torch.cat([i.reshape(-1) for i in ids]), ref.global_sample_ids(step))
            if step in (0, 9, 19):
                batches = [r.batch(step) for r in ranks]
                assert batches[0].shape == (8 // (mbs * dp), mbs, T + 1) and batches[0].dtype == torch.int64
                joined = torch.cat([b.reshape(-1, T + 1) for b in batches])
                assert torch.equal(joined, ref.batch(step).reshape(-1, T + 1))
    # The tokens are the windows the sample ids name.
    for step in range(5):
        source, _, index = decode_sample_id(ref.global_sample_ids(step))
        assert _windows(ref.batch(step), names) == list(zip(source.tolist(), index.tolist(), strict=True))
    assert ref.tokens_per_step == 8 * T and ref.num_samples() == SAMPLES["a"] + SAMPLES["b"]
    other_seed = _loader(cfg, gbs=8, mbs=8, seed=8)
    assert not torch.equal(other_seed.global_sample_ids(0), ref.global_sample_ids(0))


def test_every_sample_once_per_epoch_over_2_ranks_x_2_workers(sources):
    cfg = _cfg(sources, num_workers=2)
    steps_per_epoch = SAMPLES["a"] // 10
    seen = {0: [], 1: []}
    for rank in range(2):
        loader = _loader(cfg, gbs=10, mbs=1, rank=rank, dp=2)
        for step, batch in zip(range(2 * steps_per_epoch), loader, strict=False):
            assert batch.shape == (5, 1, T + 1)
            seen[step // steps_per_epoch] += [i for _, i in _windows(batch)]
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(SAMPLES["a"]))
    assert seen[0] != seen[1] and seen[0] != sorted(seen[0])  # shuffled, differently per epoch

    # Global batches that straddle epoch boundaries (12 does not divide 50) still cover each epoch exactly.
    loader = _loader(cfg, gbs=12, mbs=3, rank=0, dp=1)
    ids = torch.cat([loader.global_sample_ids(s) for s in range(25)])
    _, epoch, index = decode_sample_id(ids)
    for e in range(5):
        assert sorted(index[epoch == e].tolist()) == list(range(SAMPLES["a"]))
    unshuffled = _loader(_cfg(sources, shuffle=False), gbs=10, mbs=10)
    assert decode_sample_id(unshuffled.global_sample_ids(1))[2].tolist() == list(range(10, 20))


def _global_batches(loaders, steps: int) -> list[torch.Tensor]:
    """Iterate every rank's loader for `steps` batches; returns the global batches (rows in rank order)."""
    per_rank = [[batch for _, batch in zip(range(steps), loader, strict=False)] for loader in loaders]
    return [torch.cat([b[s].reshape(-1, T + 1) for b in per_rank]) for s in range(steps)]


def test_resume_continues_exactly_even_at_another_dp_size(sources):
    cfg = _cfg(sources, ("a", "b"), [0.7, 0.3], num_workers=2)
    full = _global_batches([_loader(cfg, mbs=2, rank=r, dp=2) for r in range(2)], 9)

    first = [_loader(cfg, mbs=2, rank=r, dp=2) for r in range(2)]
    head = _global_batches(first, 4)
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1] and states[0]["next_step"] == 4  # prefetched batches are not counted
    for dp, mbs in [(2, 2), (4, 1), (1, 4)]:
        resumed = [_loader(cfg, mbs=mbs, rank=r, dp=dp) for r in range(dp)]
        for loader in resumed:
            loader.load_state_dict(states[0])
        tail = _global_batches(resumed, 5)
        for step, batch in enumerate(head + tail):
            assert torch.equal(batch, full[step]), (dp, mbs, step)
    started = _loader(cfg, mbs=8, start_step=4)
    assert torch.equal(next(iter(started)).reshape(-1, T + 1), full[4])


def test_resume_refuses_changed_data_seq_len_or_global_batch(sources):
    sd = _loader(_cfg(sources)).state_dict()
    _loader(_cfg(sources), mbs=1, dp=4).load_state_dict(sd)  # dp size and micro batch may change
    with pytest.raises(ValueError, match="global_batch_size: 8 -> 16"):
        _loader(_cfg(sources), gbs=16).load_state_dict(sd)
    with pytest.raises(ValueError, match="seq_len"):
        GlobalBatchLoader(_cfg(sources), seq_len=T // 2, global_batch_size=8, micro_batch_size=2, dp_rank=0,
                          dp_size=1, seed=7).load_state_dict(sd)
    with pytest.raises(ValueError, match="sources"):
        _loader(_cfg(sources, ("b",))).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed"):
        _loader(_cfg(sources), seed=8).load_state_dict(sd)


def test_mixture_proportions_follow_weights(sources):
    names = ("a", "b")
    loader = _loader(_cfg(sources, names, [0.7, 0.3]), gbs=64, mbs=8)
    ids = torch.cat([loader.global_sample_ids(s) for s in range(200)])  # 12800 samples
    source, epoch, index = decode_sample_id(ids)
    share = float((source == 0).mean())
    assert abs(share - 0.7) < 0.02, share
    # The small source cycles through many epochs, each complete.
    b_epochs, b_index = epoch[source == 1], index[source == 1]
    assert b_epochs.max() > 100
    for e in range(b_epochs.max()):
        assert sorted(b_index[b_epochs == e].tolist()) == list(range(SAMPLES["b"]))
    # Contents come from the right source.
    assert [s for s, _ in _windows(loader.batch(3), names)] == source[3 * 64 : 4 * 64].tolist()

    # Unnormalised weights 1:2:5 give exact counts per block of 1024 positions.
    three = _loader(_cfg(sources, ("a", "b", "c"), [1, 2, 5]), gbs=64, mbs=64)
    source3 = decode_sample_id(torch.cat([three.global_sample_ids(s) for s in range(48)]))[0]
    assert np.bincount(source3).tolist() == [3 * 128, 3 * 256, 3 * 640]


def test_corrupt_or_truncated_shard_gives_one_clear_error(sources, tmp_path):
    truncated = shutil.copytree(sources["a"], tmp_path / "truncated")
    shard = truncated / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-700])
    with pytest.raises(RuntimeError, match=r"corrupt or truncated shard .*train-000001\.tar.*python -m data\.prepare"):
        _loader(DataConfig(sources=[SourceConfig(str(truncated))], num_workers=0))

    damaged = shutil.copytree(sources["a"], tmp_path / "damaged")
    shard = damaged / "train-000002.tar"
    offset = json.loads((damaged / "index.json").read_text())["splits"]["train"]["shards"][2]["members"][1]["offset"]
    raw = bytearray(shard.read_bytes())
    raw[offset - 512 : offset - 504] = b"99999999"  # a member's name in its tar header: the checksum now fails
    shard.write_bytes(bytes(raw))
    loader = _loader(DataConfig(sources=[SourceConfig(str(damaged))], num_workers=0), gbs=50, mbs=50)
    with pytest.raises(RuntimeError, match=r"corrupt or truncated shard .*train-000002\.tar.*bad tar header"):
        loader.batch(0)  # one global batch covers every sample, so every shard is read

    (damaged / "index.json").unlink()
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\]\.path: .*has no index\.json"):
        DataConfig.from_dict({"sources": [{"path": str(damaged)}]})


def test_config_validation_errors(sources, tmp_path):
    ok = {"name": "x", "sources": [{"path": str(sources["a"]), "weight": 2}], "num_workers": 0}
    assert DataConfig.from_dict(ok).weights == [1.0]
    cases = [
        ({**ok, "sources": []}, "data.sources"),
        ({**ok, "sources": [{"path": str(tmp_path / "nope")}]}, "data.sources[0].path"),
        ({**ok, "sources": [{"path": str(sources["a"]), "weight": 0}]}, "data.sources[0].weight"),
        ({**ok, "sources": [{"path": str(sources["a"]), "weight": -1}]}, "data.sources[0].weight"),
        ({**ok, "num_workers": -1}, "data.num_workers"),
        ({**ok, "bogus": 1}, "data.bogus"),
    ]
    for bad, key in cases:
        with pytest.raises(DataConfigError) as err:
            DataConfig.from_dict(bad)
        assert err.value.key == key and str(err.value).startswith(f"{key}: ")
    cfg = DataConfig.from_dict(ok)
    with pytest.raises(DataConfigError, match="train.global_batch_size: 10 is not divisible"):
        _loader(cfg, gbs=10, mbs=2, dp=4)
    with pytest.raises(DataConfigError, match="fewer than one sample"):
        GlobalBatchLoader(cfg, seq_len=10_000, global_batch_size=8, micro_batch_size=8, dp_rank=0, dp_size=1, seed=0)
    val = _loader(cfg, gbs=2, mbs=1, split="val")  # the val split: 3 samples
    assert val.num_samples() == 3
    with pytest.raises(DataConfigError, match="no 'test' tokens"):
        _loader(cfg, split="test")


def test_bundled_data_configs_parse(sources, monkeypatch):
    for name in ("sample", "mixture", "webdataset"):
        raw = OmegaConf.load(CONF_DATA / f"{name}.yaml")
        monkeypatch.setenv("DATA_DIR", str(sources["a"]))
        d = OmegaConf.to_container(raw, resolve=True)
        assert d["name"] == name
        paths = [s["path"] for s in d["sources"]]
        for s in d["sources"]:  # the artifacts may not be built here: point at test data
            s["path"] = str(sources["a"])
        cfg = DataConfig.from_dict(d)
        if name == "mixture":
            assert paths == ["artifacts/data/shakespeare", "artifacts/data/python-stdlib"]
            assert cfg.weights == pytest.approx([0.7, 0.3])
        if name == "sample":
            assert paths == ["artifacts/data/shakespeare"]
    monkeypatch.delenv("DATA_DIR")
    unset = OmegaConf.to_container(OmegaConf.load(CONF_DATA / "webdataset.yaml"), resolve=True)
    with pytest.raises(DataConfigError, match="python -m data.prepare"):
        DataConfig.from_dict(unset)


def test_webdataset_streaming_reads_each_member_once_over_2_ranks_x_2_workers(tmp_path, monkeypatch):
    src = _write_source(tmp_path / "stream", 0, 1600, member_tokens=100, shard_tokens=200)  # 16 members, 8 shards
    seen: dict[tuple[str, str], int] = {}
    per_rank: list[set[str]] = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        items = list(iter_webdataset_tokens(str(src), num_workers=2))
        per_rank.append({Path(item["url"]).name for item in items})
        for item in items:
            key = (Path(item["url"]).name, item["key"])
            seen[key] = seen.get(key, 0) + 1
            member = int(item["key"])
            assert torch.equal(item["tokens"], torch.arange(member * 100, (member + 1) * 100))
    assert len(seen) == 16 and set(seen.values()) == {1}
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    everything = list(iter_webdataset_tokens(DataConfig(sources=[SourceConfig(str(src))]), num_workers=0))
    assert [int(item["key"]) for item in everything] == list(range(16))
