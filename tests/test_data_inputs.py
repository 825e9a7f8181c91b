"""data.prepare inputs and outputs beyond local text and jsonl: the same records as .jsonl, .jsonl.zst and
parquet give byte-identical prepared sets; inputs read from a real HTTP server and a real S3-compatible server
(moto's standalone server) on loopback give the bytes of the local files; an s3:// --out holds exactly the
objects of a local --out, index.json uploaded last, and the credentials are never printed."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data import output as outmod
from data import prepare as prepmod
from data.inputs import expand_inputs, iter_document_ids, iter_documents
from data.shard_hash import shard_digests, stream_digests
from data.source import TokenSource
from data.tokenizer import Tokenizer
from tests.test_data_prepare import assert_digests_match

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "artifacts/tokenizer/shakespeare.model"
LINES = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
         "Rough winds do shake the darling buds of May,", "And summer's lease hath all too short a date;",
         "To be, or not to be, that is the question:", "Now is the winter of our discontent"]
OPTIONS = ["--member-tokens", "300", "--shard-tokens", "900", "--val-fraction", "0.2", "--quiet"]
SECRET = "planted-secret-8d1f0c2b9e"

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"needs {TOKENIZER} (make data)")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = np.random.default_rng(1)
    return ["\n".join(LINES[i] for i in rng.integers(0, len(LINES), int(rng.integers(1, 30)))) + "\n"
            for _ in range(60)]


@pytest.fixture(scope="module")
def inputs(texts, tmp_path_factory) -> Path:
    """One directory per encoding of the same records (plus the same text file in each)."""
    root = tmp_path_factory.mktemp("inputs")
    lines = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts))
    for name in ("jsonl", "zst", "parquet", "column"):
        (root / name).mkdir()
        (root / name / "poem.txt").write_text(LINES[0] + "\n" + LINES[4] + "\n")
    (root / "jsonl" / "docs.jsonl").write_text(lines)
    # Two zstandard frames (as from appending to a file): one stream of records.
    half = len(lines) // 2
    frames = [zstandard.ZstdCompressor(level=3).compress(part.encode()) for part in (lines[:half], lines[half:])]
    (root / "zst" / "docs.jsonl.zst").write_bytes(b"".join(frames))
    table = pa.table({"n": list(range(len(texts))), "text": texts})
    pq.write_table(table, root / "parquet" / "docs.parquet", row_group_size=7)  # many row groups
    pq.write_table(table.rename_columns(["n", "body"]), root / "column" / "docs.parquet", row_group_size=16)
    return root


def _prepare(inp: str | Path, out: str | Path, *extra: str) -> None:
    assert prepmod.main(["--input", str(inp), "--tokenizer", str(TOKENIZER), "--out", str(out), *OPTIONS, *extra]) == 0


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    _prepare(inputs / "jsonl", out)
    return out


def test_jsonl_zst_and_parquet_give_the_same_prepared_set(inputs, texts, reference, tmp_path):
    expected = _files(reference)
    assert len(expected) >= 4 and "index.json" in expected
    for name, extra in (("zst", ()), ("parquet", ()), ("column", ("--parquet-column", "body"))):
        _prepare(inputs / name, tmp_path / name, *extra)
        assert _files(tmp_path / name) == expected, name

    # The documents are the records, with ids independent of the encoding, and the token streams theirs.
    docs = list(iter_documents(expand_inputs([inputs / "parquet"])))
    assert [d.doc_id for d in docs] == [f"docs:{i}" for i in range(1, 61)] + ["poem.txt"]
    assert list(iter_document_ids(expand_inputs([inputs / "zst"]))) == [d.doc_id for d in docs]
    assert [d.text for d in docs[:-1]] == texts
    index = json.loads(expected["index.json"])
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == 61
    tok = Tokenizer.load(TOKENIZER)
    source = TokenSource(reference, "train")
    assert int((source.read(0, source.num_tokens) == tok.eos_id).sum()) == index["splits"]["train"]["documents"]
    assert assert_digests_match(reference, index)

    with pytest.raises(ValueError, match=r"docs.parquet: no column 'text' \(columns: n, body\); pass --parquet-column"):
        _prepare(inputs / "column", tmp_path / "bad")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_inputs_from_a_loopback_http_server(inputs, reference, tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(inputs))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        # A streamed read (the stdlib server does not even answer range requests).
        _prepare(f"{base}/zst/docs.jsonl.zst", tmp_path / "remote")
        _prepare(inputs / "zst" / "docs.jsonl.zst", tmp_path / "local")
        assert _files(tmp_path / "remote") == _files(tmp_path / "local")
        with pytest.raises(FileNotFoundError, match=r"^--input http://\S+/missing.jsonl: not found; check the URL"):
            _prepare(f"{base}/missing.jsonl", tmp_path / "missing")
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def s3(monkeypatch_module) -> str:
    """moto's standalone S3 server on loopback, the standard AWS variables pointing at it (dummy keys)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch_module.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("prep")
    yield "s3://prep"
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _download(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in sorted(fs.find(root))}


def test_inputs_from_s3_and_output_to_s3(inputs, reference, s3, tmp_path, monkeypatch):
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for name in ("parquet", "zst"):  # a prefix of record files and a text file, plus a hidden file
        fs.put(str(inputs / name) + "/", f"{s3}/in/{name}/", recursive=True)
    fs.pipe(f"{s3}/in/parquet/.hidden.txt", b"not read")
    _prepare(f"{s3}/in/parquet", tmp_path / "from-s3")
    assert _files(tmp_path / "from-s3") == _files(reference)
    _prepare(f"{s3}/in/zst/docs.jsonl.zst", tmp_path / "zst-from-s3")
    _prepare(inputs / "zst" / "docs.jsonl.zst", tmp_path / "zst-local")
    assert _files(tmp_path / "zst-from-s3") == _files(tmp_path / "zst-local")

    # --out s3://...: the same objects as a local --out, index.json uploaded last, staging emptied.
    fs.pipe(f"{s3}/out/train-000099.tar", b"stale shard of an earlier, larger run")
    order: list[str] = []
    real_publish = outmod.Output.publish
    monkeypatch.setattr(outmod.Output, "publish", lambda self, p: (order.append(p.name), real_publish(self, p))[1])
    staging = tmp_path / "staging"
    staging.mkdir()
    _prepare(inputs / "jsonl", f"{s3}/out", "--staging-dir", str(staging))
    assert _download(f"{s3}/out") == _files(reference)
    assert order[-1] == "index.json" and len(order) == len(_files(reference))
    assert list(staging.iterdir()) == []

    with pytest.raises(FileNotFoundError, match=r"^--out s3://no-bucket/x: .*bucket.*; check the URL \(its bucket"):
        _prepare(inputs / "jsonl", "s3://no-bucket/x")

    # Array tasks write their parts to the URL and merge there: the local merge's objects, also when a part is
    # of format version 1 (its digests then come from a streamed read of its shards).
    for task_id in ("1", "0"):
        _prepare(inputs / "jsonl", f"{s3}/tasks", "--num-tasks", "2", "--task-id", task_id)
        _prepare(inputs / "jsonl", tmp_path / "tasks", "--num-tasks", "2", "--task-id", task_id)
    part = json.loads(fs.cat_file(f"{s3}/tasks/part-1/index.json"))
    part["format_version"] = 1
    for shard in (sh for info in part["splits"].values() for sh in info["shards"]):
        del shard["sha256"]
        for m in shard["members"]:
            del m["sha256"]
    fs.pipe_file(f"{s3}/tasks/part-1/index.json", json.dumps(part).encode())
    assert prepmod.main(["merge", "--out", f"{s3}/tasks"]) == 0
    assert prepmod.main(["merge", "--out", str(tmp_path / "tasks")]) == 0
    remote, local = _download(f"{s3}/tasks"), _files(tmp_path / "tasks")
    assert sorted(remote) == sorted(local) and "index.json" in remote
    assert all(remote[name] == local[name] for name in local if name != "index.json" and name != "part-1/index.json")
    merged_remote, merged_local = json.loads(remote["index.json"]), json.loads(local["index.json"])
    assert merged_remote["splits"] == merged_local["splits"] and merged_remote["format_version"] == 2
    assert assert_digests_match(tmp_path / "tasks", merged_remote)


def test_streamed_digests_equal_mapped_digests(reference):
    index = json.loads((reference / "index.json").read_text())
    for shard in (sh for info in index["splits"].values() for sh in info["shards"]):
        with open(reference / shard["path"], "rb") as fh:  # small chunks: members cross chunk boundaries
            streamed = stream_digests(fh, shard["members"], chunk=1000)
        assert streamed == shard_digests(reference / shard["path"], shard["members"])
        assert streamed == (shard["sha256"], [m["sha256"] for m in shard["members"]])


def test_cli_to_s3_prints_no_credentials(inputs, s3, tmp_path):
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET}
    cmd = [sys.executable, "-m", "data.prepare", "--input", str(inputs / "jsonl"), "--tokenizer", str(TOKENIZER),
           "--out", f"{s3}/cli", *OPTIONS[:-1]]  # with progress bars
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"wrote {s3}/cli" in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "index.json" in _download(f"{s3}/cli")
    assert outmod.public_url("s3://user:pw@bucket/p/x.tar?X-Amz-Signature=abc") == "s3://bucket/p/x.tar"
