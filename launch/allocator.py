"""The host memory allocator the training processes run with: glibc's malloc, or tcmalloc / jemalloc preloaded.

On CPU the allocator decides both speed and peak memory. A training step allocates and frees the same large
buffers every step (activations, ZeRO-3's gathered parameters and full gradients); glibc keeps freed blocks in a
fragmented heap or, above its mmap threshold, returns them to the kernel and page-faults them back in on the next
step. tcmalloc keeps them in size-classed caches instead: measured in docs/benchmarks.md, 2-rank dense_125m
steps run ~1.3x faster under it, and ZeRO-3's peak RSS falls to 0.57x ZeRO-0's (0.72-0.74x under glibc). PyTorch's CPU
performance tuning guide recommends the same (`torch.backends.xeon.run_cpu --enable-tcmalloc` preloads it); here
the launchers do it.

An allocator can only be chosen before the process starts (LD_PRELOAD), so the launchers put it into the
environment of the command they exec (`python -m launch.run --allocator ...`), and scripts that fork their own
ranks re-exec themselves (`reexec_under`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from launch.env import split_command

Allocator = Literal["auto", "tcmalloc", "jemalloc", "system"]
ALLOCATORS: tuple[Allocator, ...] = ("auto", "tcmalloc", "jemalloc", "system")
# Shared-object names, preferred first: gperftools' minimal tcmalloc has no heap profiler, which training never uses.
LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
INSTALL_HINT = {"tcmalloc": "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu) or conda install gperftools",
                "jemalloc": "apt-get install libjemalloc2 (Debian/Ubuntu) or conda install jemalloc"}
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")
# tcmalloc prints a line for every allocation over 1 GiB by default; a large model's embedding gather is one.
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


class AllocatorError(ValueError):
    """An allocator was asked for by name and is not installed."""


def find_library(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Path of the shared object of allocator ``name`` ("tcmalloc" or "jemalloc"), or None when not installed."""
    candidates = LIBRARIES[name]
    prefixes = [environ.get("CONDA_PREFIX", ""), sys.prefix]
    dirs = [str(Path(p) / "lib") for p in prefixes if p] + list(_SEARCH_DIRS)
    for soname in candidates:
        for directory in dirs:
            path = Path(directory) / soname
            if path.is_file():
                return str(path)
    try:  # anything else the dynamic loader knows (ld.so.conf paths)
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for soname in candidates:
        for line in cache.splitlines():
            if line.strip().startswith(soname + " ") and "=>" in line:
                return line.split("=>", 1)[1].strip()
    return None


def _preload_entries(environ: Mapping[str, str]) -> list[str]:
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()


def _allocator_of(paths: Iterable[str]) -> str:
    """"tcmalloc" or "jemalloc" when one of ``paths`` is that allocator's shared object, else "system"."""
    names = [Path(path).name for path in paths]
    for name in ("tcmalloc", "jemalloc"):
        if any(n.startswith(f"lib{name}") for n in names):
            return name
    return "system"


def preloaded(environ: Mapping[str, str] = os.environ) -> str:
    """The allocator ``environ``'s LD_PRELOAD already names ("tcmalloc", "jemalloc"), or "system"."""
    return _allocator_of(_preload_entries(environ))


def allocator_env(choice: str, environ: Mapping[str, str] = os.environ, on_gpu: bool = False) -> dict[str, str]:
    """Variables to add to ``environ`` so that a process started with them runs under ``choice``.

    ``auto``: tcmalloc on CPU runs when it is installed, else glibc's malloc (on GPU the host allocator matters
    little and stays the system's). A named allocator that is not installed raises `AllocatorError`; one already in
    LD_PRELOAD is kept and nothing is added.
    """
    if choice not in ALLOCATORS:
        raise AllocatorError(f"unknown allocator {choice!r}; use one of {', '.join(ALLOCATORS)}")
    if choice == "system" or (choice == "auto" and on_gpu) or preloaded(environ) != "system":
        return {}
    name = "tcmalloc" if choice == "auto" else choice
    path = find_library(name, environ)
    if path is None:
        if choice == "auto":
            return {}
        raise AllocatorError(f"--allocator {name}: {LIBRARIES[name][0]} is not installed; {INSTALL_HINT[name]}, "
                             "or pass --allocator system")
    env = {"LD_PRELOAD": ":".join(p for p in (path, environ.get("LD_PRELOAD", "")) if p)}
    if name == "tcmalloc":
        env |= {key: value for key, value in _TCMALLOC_QUIET.items() if key not in environ}
    return env


def active_allocator() -> str:
    """The allocator this process runs under, from its memory map: "tcmalloc", "jemalloc" or "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return _allocator_of(line.split()[-1] for line in maps.splitlines() if "/" in line)


def reexec_under(choice: str, on_gpu: bool = False) -> None:
    """Re-exec this Python program (``python script.py args`` or ``python -m module args``) under ``choice`` unless
    it already runs under it; no return when it re-execs. For scripts that fork their ranks from their own process,
    where no launcher sets the allocator. Unlike the launchers, the choice given here replaces an allocator already
    in LD_PRELOAD."""
    others = [e for e in _preload_entries(os.environ) if _allocator_of([e]) == "system"]
    environ = {**os.environ, "LD_PRELOAD": ":".join(others)}
    environ |= allocator_env(choice, environ, on_gpu)
    if preloaded(environ) == active_allocator():
        return
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # set when started as `python -m package.module`
    argv = ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]] if spec and spec.name else sys.argv
    os.execve(sys.executable, [sys.executable, *argv], environ)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m launch.allocator [--allocator A] [--gpu] -- command ...``: exec ``command`` under allocator A
    (default auto); ``--show`` prints the variables instead."""
    import argparse

    own, command = split_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m launch.allocator", description=main.__doc__)
    parser.add_argument("--allocator", choices=ALLOCATORS, default="auto")
    parser.add_argument("--gpu", action="store_true", help="the command trains on GPUs (auto then keeps the system's)")
    parser.add_argument("--show", action="store_true", help="print the variables it would add and exit")
    args = parser.parse_args(own)
    try:
        env = allocator_env(args.allocator, os.environ, on_gpu=args.gpu)
    except AllocatorError as error:
        print(f"launch.allocator: {error}", file=sys.stderr)
        return 2
    if args.show or not command:
        print(" ".join(f"{key}={value}" for key, value in env.items()))
        return 0
    os.execvpe(command[0], command, {**os.environ, **env})
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
