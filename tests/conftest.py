"""Session fixtures: the bundled corpus prepared once (the Makefile normally did it already)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch
import tqdm

# Progress bars of in-process data preparation would start tqdm's monitor thread, which lives on; the trainer
# launches fork this process (tests/forklaunch.py), which wants no other thread alive.
tqdm.tqdm.monitor_interval = 0

from tests.utils import PYTHON, REPO, SAMPLE_DATA, child_env


@pytest.fixture(scope="session")
def sample_data():
    """artifacts/data/shakespeare: tokenizer + shards, built with the same commands as `make data`."""
    if not (SAMPLE_DATA / "index.json").exists():
        subprocess.run(["make", "-s", "data", f"PYTHON={PYTHON}", "STAMP="], cwd=REPO, env=child_env(), check=True)
    return SAMPLE_DATA


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """In-process references use tiny tensors, which gain nothing from threads; OpenMP threads spinning on a
    shared, busy CPU slow thousands of small ops by 10-100x. (Launched trainers get OMP_NUM_THREADS=1.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_reference(sample_data) -> list[float]:
    """The 10 losses of tests.utils.TINY in one plain-PyTorch process (tests.reference), computed once."""
    from tests.reference import reference_losses
    from tests.utils import TINY

    return reference_losses(TINY, 10)


@pytest.fixture(autouse=True)
def no_fsspec_io_thread_left():
    """Tests that read or write URLs in this process start fsspec's IO loop thread (and its executor's threads);
    the trainer launches fork this process, which wants no other thread alive (tests/utils.run_train would fall back
    to fresh interpreters, minutes slower): stop them after each test."""
    yield
    asyn = sys.modules.get("fsspec.asyn")
    if asyn is None or asyn.loop[0] is None:
        return
    import fsspec

    loop, thread = asyn.loop[0], asyn.iothread[0]
    fsspec.AbstractFileSystem.clear_instance_cache()  # instances hold sessions on this loop
    for cls in list(fsspec.registry.values()) if hasattr(fsspec, "registry") else []:
        getattr(cls, "clear_instance_cache", lambda: None)()
    asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()
    asyn.loop[0] = asyn.iothread[0] = None
