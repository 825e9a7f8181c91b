"""Untrusted checkpoint files are never unpickled with arbitrary code.

Each of DeepSpeed's pickles in a checkpoint (``ds/*.pt``, the only files anything torch.load-s) is replaced in
turn by a crafted pickle whose unpickling would write a marker file. A same-layout resume refuses it with one line
and exit code 2 before DeepSpeed reads a file; a resume in another layout, ``python -m train.export`` and
``python -m model.convert`` never read ``ds/`` or refuse the pickle too. The marker is never written."""

from __future__ import annotations

import pickle
import pickletools
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from model.convert import main as convert_main
from tests.utils import PYTHON, REPO, TINY, child_env, run_train, start_from_checkpoint, train_losses
from train.safe_load import FORCE_WEIGHTS_ONLY, deepspeed_safe_globals, forbid_unsafe_unpickling, refusal

STEPS = 4
BASE = [*TINY, f"train.steps={STEPS}", "train.ckpt_every=2", "train.keep_last=2"]
ZERO2 = [*BASE, "parallel=zero2"]
# What DeepSpeed writes for dense_tiny at ZeRO-2 on 2 ranks (checked against the directory below).
ZERO2_FILES = [
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
]


def _plant_marker(path: str) -> None:
    Path(path).write_text("unpickled with arbitrary code")


class Payload:
    """Unpickling it calls ``_plant_marker(marker)``: the shape of any code-running pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _plant_marker, (self.marker,)


def plant(path: Path, marker: Path, legacy: bool = False) -> None:
    """Replace ``path`` by a crafted pickle: torch's zip format like DeepSpeed's files, or a bare pickle."""
    path.unlink(missing_ok=True)  # a copy may share its inode with the original
    if legacy:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    else:
        torch.save(Payload(marker), path)


@pytest.fixture(scope="module")
def zero2_run(sample_data, tmp_path_factory) -> Path:
    """dense_tiny, ZeRO-2 on 2 ranks, 4 steps, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    run_train([*ZERO2, f"run_dir={run_dir}"], nproc=2)
    return run_dir


def _engine_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "ds").rglob("*.pt"))


def test_payload_would_run_code_if_unpickled(tmp_path):
    """The control, read without unpickling it: the planted file's pickle imports ``_plant_marker`` and calls it
    (REDUCE) with the marker path, which is what any loader that unpickles it would do."""
    crafted, marker = tmp_path / "crafted.pt", tmp_path / "marker"
    plant(crafted, marker)
    with zipfile.ZipFile(crafted) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    names = [arg for _, arg in ops if isinstance(arg, str)]
    assert f"{__name__} {_plant_marker.__name__}" in names and str(marker) in names, ops
    assert "REDUCE" in [name for name, _ in ops] and not marker.exists()


# Which registered globals each layout's files need (ZeRO-0 keeps torch's AdamW state in the model file; ZeRO-3
# records no fragment addresses); every one is needed by some layout.
ALL_GLOBALS = {"LossScaler", "ZeroStageEnum", "fragment_address"}
NEEDED = {
    "zero0": set(),
    "zero1": ALL_GLOBALS,
    "zero2": ALL_GLOBALS,
    "zero3": {"LossScaler", "ZeroStageEnum"},
    "pp2": ALL_GLOBALS,
}


@pytest.mark.parametrize("layout", list(NEEDED))
def test_deepspeed_files_need_exactly_the_registered_globals(layout, zero2_run, tmp_path):
    """Every file DeepSpeed writes loads weights-only with the registered globals, and none is registered that
    no layout needs."""
    run_dir = zero2_run
    if layout != "zero2":
        run_dir = tmp_path / "run"
        run_train([*BASE, f"parallel={layout}", "train.steps=2", f"run_dir={run_dir}"], nproc=2)
    files = _engine_files(run_dir / "checkpoints" / "step_2")
    assert files
    allowed = deepspeed_safe_globals()
    assert not set(allowed) & set(torch.serialization.get_safe_globals())  # this process registered none
    with torch.serialization.safe_globals(allowed):
        assert [refusal(f) for f in files] == [None] * len(files)
    needed = set()
    for g in allowed:
        with torch.serialization.safe_globals([a for a in allowed if a is not g]):
            if any(refusal(f) for f in files):
                needed.add(g.__name__)
    assert needed == NEEDED[layout]
    assert {g.__name__ for g in allowed} == ALL_GLOBALS


def test_forced_weights_only_stops_deepspeeds_own_load(tmp_path, monkeypatch):
    """DeepSpeed's checkpoint engine asks torch for a full unpickle; the environment variable overrides it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    monkeypatch.setenv(FORCE_WEIGHTS_ONLY, "0")  # restored after the test
    forbid_unsafe_unpickling()
    crafted, marker = tmp_path / "crafted.pt", tmp_path / "marker"
    plant(crafted, marker)
    with pytest.raises(pickle.UnpicklingError, match="_plant_marker"):
        TorchCheckpointEngine().load(str(crafted), map_location="cpu")
    assert not marker.exists()


def test_clean_same_layout_resume_is_bit_identical(zero2_run, tmp_path):
    """With weights-only loading forced, DeepSpeed's own files still restore everything."""
    run_dir = start_from_checkpoint(zero2_run, tmp_path / "resumed", 2)
    proc = run_train([*ZERO2, f"run_dir={run_dir}"], nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout, proc.stdout[-2000:]
    want = train_losses(zero2_run)
    assert train_losses(run_dir) == {s: want[s] for s in range(3, STEPS + 1)}


@pytest.mark.parametrize("name, legacy", [(n, False) for n in ZERO2_FILES] + [("mp_rank_00_model_states.pt", True)])
def test_same_layout_resume_refuses_crafted_file(name, legacy, zero2_run, tmp_path):
    assert [f.name for f in _engine_files(zero2_run / "checkpoints" / "step_2")] == ZERO2_FILES
    run_dir = start_from_checkpoint(zero2_run, tmp_path / "resumed", 2)
    marker = tmp_path / "marker"
    target = run_dir / "checkpoints" / "step_2" / "ds" / name
    plant(target, marker, legacy)
    proc = run_train([*ZERO2, f"run_dir={run_dir}"], nproc=2, check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert lines[0].startswith(f"checkpoint error: {target.resolve()} holds a pickle that ")
    assert "loads tests.test_untrusted._plant_marker" in lines[0]
    assert "tampered with" in lines[0]
    assert not marker.exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_2"]


def test_pipeline_stage_file_is_refused_on_every_rank(sample_data, tmp_path):
    """A file only the second pipeline stage reads still stops both ranks with one line, before any collective
    inside DeepSpeed's load could leave the other rank waiting."""
    src = tmp_path / "pp2"
    overrides = [*BASE, "parallel=pp2", "train.steps=2"]
    run_train([*overrides, f"run_dir={src}"], nproc=2)
    run_dir = start_from_checkpoint(src, tmp_path / "resumed", 2)
    stage1_files = sorted((run_dir / "checkpoints" / "step_2" / "ds").glob("layer_*-model_states.pt"))
    marker = tmp_path / "marker"
    plant(stage1_files[-1], marker)
    proc = run_train([*overrides, "train.steps=4", f"run_dir={run_dir}"], nproc=2, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and stage1_files[-1].name in lines[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_other_layout_resume_and_export_never_read_ds(zero2_run, tmp_path):
    """A resume in another layout reads the safetensors pieces, export too: with every DeepSpeed file crafted,
    both succeed, the resumed losses follow the uninterrupted run, and no code runs."""
    run_dir = start_from_checkpoint(zero2_run, tmp_path / "resumed", 2)
    step_dir = run_dir / "checkpoints" / "step_2"
    marker = tmp_path / "marker"
    for f in _engine_files(step_dir):
        plant(f, marker)
    proc = run_train([*BASE, "parallel=pp2", f"run_dir={run_dir}"], nproc=2, timeout=180)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout, proc.stdout[-2000:]
    losses, want = train_losses(run_dir), train_losses(zero2_run)
    assert sorted(losses) == [3, 4]
    for s in (3, 4):
        assert abs(losses[s] - want[s]) <= 1e-4 * abs(want[s]), (s, losses[s], want[s])

    export = subprocess.run(
        [PYTHON, "-m", "train.export", "--checkpoint", str(step_dir), "--out", str(tmp_path / "model")],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not marker.exists()


def test_convert_refuses_crafted_hf_bin(tmp_path, capsys):
    """`python -m model.convert from-hf` on an HF directory whose pytorch_model.bin is a crafted pickle."""
    hf_dir, marker = tmp_path / "hf", tmp_path / "marker"
    LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    ).save_pretrained(hf_dir)
    weights = hf_dir / "pytorch_model.bin"
    plant(weights, marker)
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {weights} holds a pickle that loads "), err
    assert "tests.test_untrusted._plant_marker" in err[0]
    assert not marker.exists() and not (tmp_path / "ours").exists()
