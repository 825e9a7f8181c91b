"""data.stream / data.source with damaged shards: one-line errors (data.on_error=raise), deterministic
replacement of the samples that overlap a bad shard (data.on_error=skip), and a resume refused when the
tokenizer changed.

Real shards are damaged on disk: truncated, a member's tar header overwritten or renamed, a file deleted.
Token value = source base + position in the source's stream, so a row's values tell which stream
positions it was read from. The bad shard's values are read back from the clean tar with the tarfile
module, independently of index.json and of the loader.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.prepare import write_index, write_token_shards
from data.stream import DataConfig, DataConfigError, GlobalBatchLoader, SourceConfig

T = 16  # seq_len
BASE_B = 20000
TOKENS = {"a": 100 * T + 1, "b": 40 * T + 1}  # 100 and 40 samples
BAD = "train-000003.tar"  # of source a: tokens [600, 800), which samples 37..49 overlap
STEPS = 40  # 320 global positions: about two epochs of source a
LAYOUTS = [(1, 0), (1, 1), (2, 0), (2, 1)]  # (dp_size, num_workers)
CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def _write(path: Path, base: int, n_tokens: int) -> Path:
    tokens = base + np.arange(n_tokens, dtype=np.int64)
    docs = [tokens[:333], tokens[333:]]  # members of 40 tokens, shards of 200: windows straddle both
    write_token_shards(path, {"train": docs}, vocab_size=65536, member_tokens=40, shard_tokens=200)
    return path


def _index(src: Path) -> dict:
    return json.loads((src / "index.json").read_text())


def _member_offsets(src: Path, shard: str) -> list[int]:
    members = {s["path"]: s["members"] for s in _index(src)["splits"]["train"]["shards"]}[shard]
    return [m["offset"] for m in members]


def _truncate(src: Path) -> None:
    shard = src / BAD
    os.truncate(shard, shard.stat().st_size - 700)


def _bad_header(src: Path) -> None:
    offset = _member_offsets(src, BAD)[1]
    with open(src / BAD, "r+b") as f:
        f.seek(offset - 512)
        f.write(b"99999999")  # the member's name: the header checksum no longer matches


def _renamed_member(src: Path) -> None:
    offset = _member_offsets(src, BAD)[2]
    with open(src / BAD, "r+b") as f:
        f.seek(offset - 512)
        info = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
        info.name = "99999999.tokens.u16"  # a valid header (checksum included) for another member
        f.seek(offset - 512)
        f.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))


def _delete(src: Path) -> None:
    (src / BAD).unlink()


CORRUPTIONS = {"truncated": _truncate, "bad_header": _bad_header, "renamed": _renamed_member, "missing": _delete}
CAUSES = {"truncated": "bytes on disk, index expects", "bad_header": "bad tar header", "renamed": "is 99999999.tokens.u16",
          "missing": "not on disk"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    paths = {"a": _write(root / "a", 0, TOKENS["a"]), "b": _write(root / "b", BASE_B, TOKENS["b"])}
    for name, corrupt in CORRUPTIONS.items():
        paths[name] = shutil.copytree(paths["a"], root / name)
        corrupt(paths[name])
    return paths


@pytest.fixture(scope="module")
def bad_values(data) -> set[int]:
    """Token values (= stream positions of source a) stored in the bad shard, read with tarfile."""
    with tarfile.open(data["a"] / BAD) as tar:
        values = np.concatenate([np.frombuffer(tar.extractfile(m).read(), "<u2") for m in tar.getmembers()])
    assert values.tolist() == list(range(600, 800))
    return set(values.tolist())


def _loader(data, a="a", *, on_error="skip", dp=1, rank=0, workers=0, seed=7) -> GlobalBatchLoader:
    cfg = DataConfig(sources=[SourceConfig(str(data[a]), 0.6), SourceConfig(str(data["b"]), 0.4)],
                     num_workers=workers, on_error=on_error)
    return GlobalBatchLoader(cfg, seq_len=T, global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=dp,
                             seed=seed)


@pytest.fixture(scope="module")
def clean(data) -> list[torch.Tensor]:
    loader = _loader(data, on_error="raise")
    return [loader.batch(step).reshape(-1, T + 1) for step in range(STEPS)]


def _overlaps(row: torch.Tensor, bad_values: set[int]) -> bool:
    return not bad_values.isdisjoint(row.tolist())


def _iterate(data, a: str, dp: int, workers: int) -> tuple[list[torch.Tensor], list[list[int]], list[int]]:
    """Global batches of every rank's iter(loader), the replaced_samples seen after each, and each total."""
    rows, counts, totals = [], [], []
    for rank in range(dp):
        loader = _loader(data, a, dp=dp, rank=rank, workers=workers)
        batches = []
        counts.append([])
        for _, batch in zip(range(STEPS), loader, strict=False):
            batches.append(batch.reshape(-1, T + 1))
            counts[-1].append(loader.replaced_samples)
        rows.append(batches)
        totals.append(loader.replaced_samples_total)
    return [torch.cat([r[step] for r in rows]) for step in range(STEPS)], counts, totals


@pytest.mark.parametrize("corruption", ["truncated", "bad_header", "missing"])
def test_skip_replaces_only_samples_overlapping_the_bad_shard(data, clean, bad_values, corruption, capfd):
    capfd.readouterr()
    reference = _loader(data, corruption)
    ref = [reference.batch(step).reshape(-1, T + 1) for step in range(STEPS)]
    warnings = [line for line in capfd.readouterr().err.splitlines() if BAD in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and CAUSES[corruption] in warnings[0]
    assert str(data[corruption] / BAD) in warnings[0]

    replaced_total = 0
    for step in range(STEPS):
        expected_rows = [row for row in range(8) if _overlaps(clean[step][row], bad_values)]
        assert reference.replaced_rows(step) == expected_rows
        replaced_total += len(expected_rows)
        for row in range(8):
            got, was = ref[step][row], clean[step][row]
            if row not in expected_rows:
                assert torch.equal(got, was), (step, row)  # byte-identical to the clean loader
                continue
            assert not _overlaps(got, bad_values)  # not one token read from the bad shard
            start = int(got[0])
            assert start < BASE_B and start % T == 0  # a whole window of the same source (a)
            assert got.tolist() == list(range(start, start + T + 1))
    assert replaced_total > 10

    again = _loader(data, corruption)  # a fresh loader replaces the same way
    assert all(torch.equal(again.batch(step).reshape(-1, T + 1), ref[step]) for step in range(STEPS))
    if corruption == "truncated":  # every kind of damage to the same shard gives the same batches
        for other in ("bad_header", "missing"):
            other_loader = _loader(data, other)
            assert all(torch.equal(other_loader.batch(s).reshape(-1, T + 1), ref[s]) for s in range(STEPS))

    for dp, workers in LAYOUTS:
        batches, counts, totals = _iterate(data, corruption, dp, workers)
        for step in range(STEPS):
            assert torch.equal(batches[step], ref[step]), (dp, workers, step)
            for rank in range(dp):
                rows = range(rank * 8 // dp, (rank + 1) * 8 // dp)
                expected = sum(_overlaps(clean[step][row], bad_values) for row in rows)
                assert counts[rank][step] == expected, (dp, workers, step, rank)
        assert sum(totals) == replaced_total


def test_skip_on_clean_data_changes_nothing(data, clean):
    loader = _loader(data, "a")
    for step, batch in zip(range(STEPS), loader, strict=False):
        assert torch.equal(batch.reshape(-1, T + 1), clean[step])
        assert loader.replaced_samples == 0
    assert loader.replaced_samples_total == 0


def test_replacement_is_spread_over_the_source(data, bad_values):
    """Hash probes, not the neighbouring window: the replacements come from all over the source."""
    loader = _loader(data, "bad_header")
    starts = set()
    for step in range(STEPS):
        rows = loader.batch(step).reshape(-1, T + 1)
        starts |= {int(rows[r][0]) for r in loader.replaced_rows(step)}
    assert len(starts) >= 10 and all(s not in bad_values for s in starts)


@pytest.mark.parametrize("corruption", ["truncated", "missing"])
def test_raise_at_open_names_the_shard_and_cause(data, corruption):
    with pytest.raises(RuntimeError) as err:
        _loader(data, corruption, on_error="raise")
    message = str(err.value)
    assert "\n" not in message and str(data[corruption] / BAD) in message and CAUSES[corruption] in message
    assert "python -m data.prepare" in message


@pytest.mark.parametrize("corruption", ["bad_header", "renamed"])
def test_raise_at_first_read_names_the_shard_and_cause(data, corruption):
    loader = _loader(data, corruption, on_error="raise")
    with pytest.raises(RuntimeError) as err:
        for step in range(STEPS):
            loader.batch(step)
    message = str(err.value)
    assert "\n" not in message and str(data[corruption] / BAD) in message and CAUSES[corruption] in message
    assert message.startswith("corrupt or truncated shard ")


def test_skip_refuses_a_source_with_no_good_shard(data, tmp_path):
    deleted = shutil.copytree(data["a"], tmp_path / "deleted")
    for shard in deleted.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(RuntimeError) as err:
        _loader({"deleted": deleted, "b": data["b"]}, "deleted")
    assert "\n" not in str(err.value) and f"every shard of {deleted}" in str(err.value)

    headers = shutil.copytree(data["a"], tmp_path / "headers")  # found bad only when mapped
    for shard in _index(headers)["splits"]["train"]["shards"]:
        with open(headers / shard["path"], "r+b") as f:
            f.seek(shard["members"][0]["offset"] - 512)
            f.write(b"99999999")
    loader = _loader({"headers": headers, "b": data["b"]}, "headers")
    with pytest.raises(RuntimeError) as err:
        for step in range(STEPS):
            loader.batch(step)
    assert "\n" not in str(err.value) and f"no sample of {headers}" in str(err.value)


def _set_tokenizer(src: Path, sha256: str) -> None:
    index = _index(src)
    index["tokenizer"] = {"path": "tok.model", "sha256": sha256}
    write_index(src, index)


def test_sources_with_different_tokenizers_are_refused(data, tmp_path):
    other = shutil.copytree(data["b"], tmp_path / "b")
    _set_tokenizer(other, "1" * 64)
    with pytest.raises(DataConfigError, match=r"data\.sources\[1\]\.path: .*different tokenizer"):
        _loader({"a": data["a"], "b": other}, on_error="raise")


def test_resume_with_a_changed_tokenizer_says_so(data, tmp_path):
    a, b = shutil.copytree(data["a"], tmp_path / "a"), shutil.copytree(data["b"], tmp_path / "b")
    for src in (a, b):
        _set_tokenizer(src, "1" * 64)
    paths = {"a": a, "b": b}
    first = _loader(paths)
    next(iter(first))
    state = first.state_dict()
    assert [s["tokenizer_sha256"] for s in state["fingerprint"]["sources"]] == ["1" * 64] * 2

    legacy = json.loads(json.dumps(state))  # a state saved before the tokenizer was recorded
    for src in legacy["fingerprint"]["sources"]:
        del src["tokenizer_sha256"]
    resumed = _loader(paths, dp=2)
    resumed.load_state_dict(legacy)
    assert resumed.next_step == 1

    for src in (a, b):
        _set_tokenizer(src, "2" * 64)
    with pytest.raises(ValueError) as err:
        _loader(paths).load_state_dict(state)
    message = str(err.value)
    assert "\n" not in message and "tokenizer of data.sources[0]" in message and str(a) in message
    assert "111111111111... saved, 222222222222... now" in message and "python -m data.prepare" in message


def test_on_error_config(data):
    ok = {"sources": [{"path": str(data["a"])}]}
    assert DataConfig.from_dict(ok).on_error == "raise"
    assert DataConfig.from_dict({**ok, "on_error": "skip"}).on_error == "skip"
    with pytest.raises(DataConfigError) as err:
        DataConfig.from_dict({**ok, "on_error": "ignore"})
    assert err.value.key == "data.on_error" and "raise or skip" in str(err.value)
    for conf in sorted(CONF_DATA.glob("*.yaml")):
        assert OmegaConf.load(conf)["on_error"] == "raise", conf.name


def test_trainer_logs_the_replaced_samples_and_raise_stops_before_training(tmp_path):
    from tests.utils import TINY, run_train

    src = tmp_path / "data"
    tokens = np.arange(60 * 32 + 1, dtype=np.int64) % 8000  # 60 samples of train.seq_len=32, ids < dense_tiny's vocab
    write_token_shards(src, {"train": [tokens]}, vocab_size=8000, member_tokens=40, shard_tokens=200)
    _truncate(src)
    overrides = [*TINY, f"data.sources=[{{path:{src}}}]", "train.steps=8", "train.ckpt_every=8"]

    proc = run_train([*overrides, f"run_dir={tmp_path / 'raise'}"], nproc=2, check=False)
    assert proc.returncode == 2 and not (tmp_path / "raise").exists()
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith("config error: data.sources") and BAD in errors[0], errors

    run_dir = tmp_path / "skip"
    run_train([*overrides, "data.on_error=skip", f"run_dir={run_dir}"], nproc=2)
    expected = 0
    for rank in range(2):
        cfg = DataConfig(sources=[SourceConfig(str(src))], num_workers=0, on_error="skip")
        loader = GlobalBatchLoader(cfg, seq_len=32, global_batch_size=4, micro_batch_size=1, dp_rank=rank, dp_size=2,
                                   seed=1234)
        expected += sum(len(loader.replaced_rows(step)) for step in range(8))
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = [r["data_replaced_samples"] for r in rows if "data_replaced_samples" in r]
    assert expected > 0 and counts[-1] == expected
