"""Non-finite losses and gradients, and loss spikes.

A NaN or inf on one rank reaches every rank through the gradient reductions, but only as a poisoned update: it
must be caught before any optimizer applies it, on every rank at once, whatever the layout. The guard watches the
gradients each rank computes (a hook on every parameter, before DeepSpeed reduces or partitions them) and the
local loss; once per step, between the last backward and the optimizer step, one all-reduce tells every rank
which ranks saw a non-finite value, and the optimizer this guard wraps then leaves weights and Adam state as they
were. DeepSpeed's own overflow checks depend on the ZeRO stage, precision and version (fp32 ZeRO-1/2/3 skip a
step whose norm is invalid, fp32 ZeRO-0 has none), so they cannot be the contract.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Test hook: "STEP:RANK:grad" or "STEP:RANK:loss" turns one parameter's gradient (or the loss) of that rank into
# NaN, "STEP:RANK:spike" replaces that rank's batch with random tokens (a loss spike), the first time the run
# reaches that step (1-based; once per process, like a transient fault), so the tests inject a real fault on one
# rank only.
INJECT_ENV = "TRAIN_TEST_INJECT_NONFINITE"


@dataclass(frozen=True)
class InjectedFault:
    step: int
    rank: int
    where: str  # "grad", "loss" or "spike"

    @classmethod
    def from_env(cls) -> InjectedFault | None:
        spec = os.environ.get(INJECT_ENV)
        if not spec:
            return None
        step, rank, where = spec.split(":")
        if where not in ("grad", "loss", "spike"):
            raise ValueError(f"{INJECT_ENV}={spec!r}: the third field must be grad, loss or spike")
        return cls(int(step), int(rank), where)


class NonFiniteGuard:
    """Finds non-finite gradients and losses on any rank and keeps the wrapped optimizer from applying them."""

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 device: torch.device) -> None:
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.device = device
        # Sum of every local gradient and loss of the step: inf and NaN survive a sum, finite gradients do not
        # overflow fp32 in practice, and one running scalar costs no host sync until the step ends.
        self._sum = torch.zeros((), dtype=torch.float32, device=device)
        self.skip_update = False
        self.skipped_steps = 0  # optimizer steps whose update this guard withheld
        self._withheld = False  # this step's update withheld already (ZeRO steps once per parameter group)
        self.step = 0
        self._fault = InjectedFault.from_env()
        self._armed: str | None = None
        for p in params:
            if p.requires_grad:
                p.register_hook(self._on_grad)
        self.optimizer = optimizer  # the torch optimizer that DeepSpeed steps (its master weights and state)
        original_step = optimizer.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if self.skip_update:
                if not self._withheld:
                    self.skipped_steps += 1
                    self._withheld = True
                return None
            return original_step(*args, **kwargs)

        optimizer.step = guarded_step  # DeepSpeed's ZeRO optimizers call this once per parameter group

    def begin_step(self, step: int) -> None:
        """Before the first forward of optimizer step ``step`` (1-based)."""
        self.step = step
        self._sum.zero_()
        self.skip_update = self._withheld = False
        fault = self._fault
        self._armed = None
        if fault and fault.step == step and fault.rank == self.rank:
            self._armed, self._fault = fault.where, None

    def watch_batch(self, batch: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """This rank's batch of the step (random tokens on the step of an injected spike)."""
        if self._armed != "spike":
            return batch
        self._armed = None
        gen = torch.Generator().manual_seed(self.step)
        return torch.randint(0, vocab_size, batch.shape, generator=gen, dtype=batch.dtype)

    def _on_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self._armed == "grad":
            self._armed = None
            grad = grad * float("nan")
        self._sum += grad.detach().sum(dtype=torch.float32)  # no fp32 copy of a bf16 gradient
        return grad

    def watch_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss about to be backpropagated (returned, NaN on the injected step)."""
        if self._armed == "loss":
            self._armed = None
            loss = loss * float("nan")
        self._sum += loss.detach().float()
        return loss

    def agree(self) -> list[int]:
        """Collective over all ranks, once per step before the optimizer step: the ranks that saw a non-finite
        gradient or loss. When any did, every rank skips this step's update."""
        flags = torch.zeros(self.world, dtype=torch.float32, device=self.device)
        flags[self.rank] = float(not bool(torch.isfinite(self._sum)))
        if self.world > 1:
            dist.all_reduce(flags)
        bad = [int(r) for r in torch.nonzero(flags).flatten().tolist()]
        self.skip_update = bool(bad)
        return bad


class SpikeDetector:
    """Flags a loss more than ``zscore`` standard deviations above the mean of the last ``window`` normal losses
    (spikes do not enter the window, so one spike does not hide the next)."""

    MIN_HISTORY = 10

    def __init__(self, window: int, zscore: float) -> None:
        self.zscore = zscore
        self.history: deque[float] = deque(maxlen=window)
        self.count = 0

    def update(self, loss: float) -> tuple[float | None, bool]:
        """(z-score of ``loss`` against the window, or None while the window is short; whether it is a spike)."""
        z = None
        if len(self.history) >= min(self.MIN_HISTORY, self.history.maxlen or 1):
            mean = sum(self.history) / len(self.history)
            var = sum((x - mean) ** 2 for x in self.history) / max(1, len(self.history) - 1)
            z = (loss - mean) / max(math.sqrt(var), 1e-8)
        spike = z is not None and z > self.zscore
        if spike:
            self.count += 1
        else:
            self.history.append(loss)
        return z, spike
