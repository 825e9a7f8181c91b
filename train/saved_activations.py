"""How many bytes of activations a forward leaves alive for its backward, measured on the real run.

Saved-tensor hooks see what autograd saves, but not what activation checkpointing keeps by other means (selective
checkpointing caches operator outputs in its own dispatch mode; full checkpointing keeps the block inputs). So this
records every tensor storage created during the forward (a dispatch mode sees each operator's outputs) and, when
the forward returns, sums the ones still alive: exactly what the graph, the checkpoint caches and the returned
outputs hold, on any device, whatever the recompute policy. Parameters and inputs existed before and are not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

T = TypeVar("T")


class _StorageRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: only storages an operator allocates are new.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in inputs:
                    # A freed storage's address can be reused: the newest storage at an address wins.
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out


def saved_activation_bytes(forward: Callable[[], T]) -> tuple[int, T]:
    """(bytes of the storages created by ``forward()`` still alive when it returns, its result). Call with the
    result kept (e.g. the loss whose graph holds the saved tensors) and before backward."""
    recorder = _StorageRecorder()
    with recorder:
        result = forward()
    alive = sum(nbytes for ref, nbytes in recorder.storages.values() if not ref.expired())
    return alive, result
