"""No file is unpickled with arbitrary code in this process.

Our own checkpoint files are safetensors and JSON; DeepSpeed's files under ``ds/`` are pickles that its
``load_checkpoint`` reads with torch.load, asking for a full unpickle. ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which
torch reads at every ``torch.load`` call, turns those into weights-only loads: only tensors, containers, numbers
and allowlisted globals are built, so a crafted pickle fails to load instead of running its code.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_safe_globals() -> list[type]:
    """The plain data classes and enums DeepSpeed 0.19's checkpoint files hold besides tensors (found by loading
    every file of ZeRO 0-3, pipeline, tensor- and expert-parallel checkpoints, fp32 and bf16, weights-only)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # static scale: a float and its attributes
    from deepspeed.runtime.zero.config import ZeroStageEnum  # int enum of the ZeRO stage
    from deepspeed.utils.tensor_fragment import fragment_address  # dataclass (numel, start)

    return [LossScaler, ZeroStageEnum, fragment_address]


def forbid_unsafe_unpickling(safe_globals: Sequence[type] = ()) -> None:
    """From now on every ``torch.load`` in this process and its children loads weights only, building no
    objects but tensors, containers, numbers and ``safe_globals`` (plain data classes and enums)."""
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set makes torch.load raise
    torch.serialization.add_safe_globals(list(safe_globals))


def refusal(path: Path) -> str | None:
    """Why ``path`` may not be loaded, or None when it loads weights-only. Tensors are memory-mapped, not read,
    so checking a large file costs about as much as reading its pickle."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        return refused_message(path, e)
    except RuntimeError as e:  # a TorchScript archive, or not a torch file at all
        return f"{path} cannot be loaded as plain tensors and data ({str(e).strip().splitlines()[0][:200]})"
    return None


def refused_message(path: Path | str, error: pickle.UnpicklingError) -> str:
    """One line naming the file and the global its pickle asked for."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f"loads {found.group(1)}" if found else "uses instructions beyond plain tensors and data"
    return (
        f"{path} holds a pickle that {what}, which is not allowed (files are never unpickled with arbitrary code); "
        "the file was not produced by this trainer or was tampered with"
    )
