"""Real servers on loopback for the remote-source tests: nginx (Debian's nginx-light, installed with apt-get when
missing, as slurm/setup_local_cluster.sh installs SLURM) serving a directory, and moto's standalone S3 server.

Both run as subprocesses, so the test process starts no thread (tests/forklaunch.py forks it).

    .venv/bin/python -m tests.servers nginx DIR     # serve DIR until Ctrl-C (prints the URL)
    .venv/bin/python -m tests.servers s3 DIR        # upload DIR to s3://shards/DIR-NAME on a moto server
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.utils import free_port

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")


def nginx_binary() -> tuple[str | None, str]:
    """(path of nginx, "") or (None, why it is not there); installs Debian's nginx-light if missing and root."""
    def find() -> str | None:
        return next((p for p in map(shutil.which, NGINX_CANDIDATES) if p), None)

    if found := find():
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "nginx is not installed and this is not a root Debian machine (apt-get install nginx-light)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
    if subprocess.run(install, check=False, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
        proc = subprocess.run(install, check=False, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"apt-get install nginx-light failed: {proc.stderr.strip().splitlines()[-1:]}"
    return find(), ""


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


class Nginx:
    """nginx serving ``root`` on a free loopback port with its own config; ``locations`` adds config lines
    (e.g. ``location = /x { return 500; }``). ``access_log`` lists `status bytes request` per request."""

    def __init__(self, root: Path, workdir: Path, locations: str = ""):
        self.root, self.workdir, self.port = Path(root), Path(workdir), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = self.workdir / "access.log"
        binary, why = nginx_binary()
        if binary is None:
            raise RuntimeError(why)
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        temp = "".join(f"{kind}_temp_path {self.workdir / kind};\n    "
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf.write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {self.workdir / 'nginx.pid'};
error_log {self.workdir / 'error.log'} warn;
events {{ worker_connections 256; }}
http {{
    log_format bytes '$status $body_bytes_sent "$request"';
    access_log {self.access_log} bytes;
    {temp}
    sendfile on;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        {locations}
    }}
}}
""")
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.workdir)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "stderr.log", "w"))  # noqa: SIM115
        _wait_http(self.url + "/", self.proc, self.workdir / "stderr.log")

    def bytes_sent(self) -> int:
        """Body bytes of every 2xx answer so far (nginx writes its log line when a response is done)."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        return sum(int(ln.split()[1]) for ln in lines if ln.startswith("2"))

    def stop(self) -> None:
        _stop(self.proc)


class MotoS3:
    """moto's standalone S3 server on a free loopback port; ``env`` is what a client needs to reach it."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        log = Path(workdir) / "moto.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        _wait_http(self.endpoint + "/", self.proc, log)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def upload(self, src: Path, bucket: str, prefix: str) -> str:
        """Copy the files of ``src`` to s3://bucket/prefix/ (a subprocess: boto3 may start threads); the URL."""
        code = ("import boto3, pathlib, sys\n"
                "s3 = boto3.client('s3')\n"
                "bucket, prefix, src = sys.argv[1:4]\n"
                "if bucket not in [b['Name'] for b in s3.list_buckets()['Buckets']]: s3.create_bucket(Bucket=bucket)\n"
                "for f in sorted(pathlib.Path(src).rglob('*')):\n"
                "    if f.is_file(): s3.put_object(Bucket=bucket, Key=f'{prefix}/{f.relative_to(src)}', Body=f.read_bytes())\n")
        subprocess.run([sys.executable, "-c", code, bucket, prefix, str(src)], env=dict(os.environ, **self.env),
                       check=True, capture_output=True)
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def in_child(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a forked child: {"ok": its JSON-able result} or {"error": "Type: message"}. fsspec starts an
    event-loop thread that lives on; in a child it cannot keep the test process from forking trainer ranks."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # never returns into pytest
        os.close(read_fd)
        try:
            out: dict[str, Any] = {"ok": fn(*args)}
        except BaseException as exc:  # noqa: BLE001  (reported to the parent)
            out = {"error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(write_fd, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else {"error": "the child died without a result"}


def main(argv: list[str]) -> int:
    import tempfile

    kind, src = argv[0], Path(argv[1]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "nginx":
            server = Nginx(src.parent, Path(tmp))
            print(f"{server.url}/{src.name}", flush=True)
        else:
            server = MotoS3(Path(tmp))
            print(" ".join(f"{k}={v}" for k, v in server.env.items()), server.upload(src, "shards", src.name), flush=True)
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
