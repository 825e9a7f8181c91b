"""Session fixtures: the bundled corpus prepared once (the Makefile normally did it already)."""

from __future__ import annotations

import subprocess

import pytest

from tests.utils import PYTHON, REPO, SAMPLE_DATA, child_env


@pytest.fixture(scope="session")
def sample_data():
    """artifacts/data/shakespeare: tokenizer + shards, built with the same commands as `make data`."""
    if not (SAMPLE_DATA / "index.json").exists():
        subprocess.run(["make", "-s", "data", f"PYTHON={PYTHON}", "STAMP="], cwd=REPO, env=child_env(), check=True)
    return SAMPLE_DATA
