"""Mamba-1 mixer (Jamba flavour) and the selective scan it runs on.

Parameter and module names match ``transformers``' ``JambaMambaMixer`` so Hugging Face
weights map 1:1 (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``, ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``).

Three implementations of the selective scan share the ``mamba_ssm`` calling convention
(u, delta, z: [B, d_inner, T]; A: [d_inner, N]; B, C: [B, N, T]; D, delta_bias: [d_inner]):

* ``selective_scan_ref``: a plain loop over time, the test oracle.
* ``selective_scan_chunked``: the fast pure-PyTorch path (see ``_SelectiveScanCore``).
* ``selective_scan``: ``mamba_ssm``'s CUDA kernel when it is importable and the tensors are
  on a GPU, else the chunked path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.layers import RMSNorm

# dt initialisation range of Mamba / Jamba: dt ~ log-uniform in [DT_MIN, DT_MAX].
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4
# exp(x) = 2^(x * log2(e)): on CPU exp2 is several times cheaper than exp.
LOG2_E = math.log2(math.e)
# Most elements in one of the scan's state-sized chunk buffers ([batch, chunk, N, d_inner], 2 MiB in float32): the
# three buffers of the backward must stay in cache, so wide or large-batch inputs get chunks shorter than asked for.
CHUNK_ELEMENTS = 2**19


# --------------------------------------------------------------------------- scans
def _check_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective scan: u must be [batch, d_inner, T], got shape {tuple(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective scan: delta shape {tuple(delta.shape)} must equal u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d or A.is_complex():
        raise ValueError(f"selective scan: A must be real [d_inner={d}, N], got {tuple(A.shape)} {A.dtype}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (b, n, L):
            raise ValueError(
                f"selective scan: {name} must be [batch={b}, N={n}, T={L}], got {tuple(t.shape)} "
                "(grouped B/C of shape [batch, G, N, T] are not supported)"
            )
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective scan: z shape {tuple(z.shape)} must equal u shape {tuple(u.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"selective scan: {name} must be [d_inner={d}], got {tuple(t.shape)}")


def _discretize(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential selective scan (one step per time index), computed in float32.

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t;  y_t = <x_t, C_t> + D * u_t;  y *= silu(z).
    ``initial_state`` x_{-1} [batch, d_inner, N] (default zeros); with ``return_final_state`` also returns x_{T-1}.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    delta = _discretize(delta, delta_bias, delta_softplus)
    u32, A32, B32, C32 = u.float(), A.float(), B.float(), C.float()
    batch, d_inner, seq_len = u.shape
    state = u32.new_zeros(batch, d_inner, A.shape[1]) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(seq_len):
        decay = torch.exp(delta[:, :, t, None] * A32)
        state = decay * state + (delta[:, :, t] * u32[:, :, t])[..., None] * B32[:, None, :, t]
        outputs.append(torch.einsum("bdn,bn->bd", state, C32[:, :, t]))
    y = torch.stack(outputs, dim=-1) if outputs else u32.new_zeros(batch, d_inner, 0)
    y = _skip_and_gate(y, u, D, z, u.dtype)
    return (y, state) if return_final_state else y


def _chunk_states(
    delta: Tensor, A2_t: Tensor, du: Tensor, B: Tensor, entering: Tensor, decay: Tensor, h: Tensor
) -> None:
    """The decays a_t = exp(delta_t * A) and states h_t = a_t * h_{t-1} + du_t * B_t of one chunk, written into
    ``decay`` and ``h`` ([batch, L, N, d_inner]); ``entering`` is the state before the chunk's first step."""
    torch.exp2(torch.mul(delta.unsqueeze(2), A2_t, out=decay), out=decay)  # 2^(log2-decay <= 0): in (0, 1]
    torch.mul(du.unsqueeze(2), B.unsqueeze(3), out=h)  # the inputs x_t, turned into the states in place
    prev = entering
    for a_t, h_t in zip(decay.unbind(1), h.unbind(1), strict=True):
        h_t.addcmul_(a_t, prev)
        prev = h_t


def scan_chunk_length(batch: int, seq_len: int, d_state: int, d_inner: int, chunk_size: int) -> int:
    """Time steps per chunk of the chunked scan: ``chunk_size``, fewer when a chunk's state buffers would exceed
    ``CHUNK_ELEMENTS`` (and never more than the sequence)."""
    return max(1, min(chunk_size, seq_len, CHUNK_ELEMENTS // max(1, batch * d_state * d_inner)))


class _SelectiveScanCore(torch.autograd.Function):
    """y_t = <h_t, C_t> with h_t = exp(delta_t * A) * h_{t-1} + du_t * B_t, hand-written backward.

    Shapes: delta, du [batch, T, d_inner]; A [d_inner, N]; B, C [batch, T, N] -> y [batch, T, d_inner].
    Time runs in chunks of at most ``chunk_size`` steps (fewer when a chunk would exceed ``CHUNK_ELEMENTS``). The
    state-sized tensors ([batch, chunk, N, d_inner], channels innermost so that every step and every broadcast
    reads contiguous rows) exist for one chunk at a time, in buffers reused from chunk to chunk; only the state
    entering each chunk is kept for backward, which recomputes the chunk's decays and states from it (as
    mamba_ssm's kernel does). So memory is O(T / chunk + chunk) states and the working set stays in cache at any
    T: time and memory are linear in T. Within a chunk the recurrence is one in-place step per time index: on a
    CPU a step is an elementwise pass over batch * N * d_inner numbers, and a two-level (parallel) scan would
    about triple those passes to save Python steps. The backward runs the recurrence right to left,
    g_t = dL/dh_t + a_{t+1} g_{t+1}, then contracts g with the chunk's inputs.

    ``h0`` [batch, N, d_inner] is the state before the first step (None: zeros); the state after the last step is
    returned beside y, so a sequence split over ranks (context parallelism) chains exactly: the gradient of the
    final state enters the backward where the next chunk's would, and the gradient of ``h0`` is what remains.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, delta: Tensor, A: Tensor, du: Tensor, B: Tensor, C: Tensor, chunk_size: int, h0: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        batch, seq_len, d_inner = delta.shape
        n = A.shape[1]
        chunk = scan_chunk_length(batch, seq_len, n, d_inner, chunk_size)
        A2_t = A.t().contiguous() * LOG2_E
        starts = range(0, seq_len, chunk)
        entering = delta.new_zeros(len(starts), batch, n, d_inner)
        if h0 is not None:
            entering[0] = h0
        decay, h = (delta.new_empty(batch * chunk * n * d_inner) for _ in range(2))
        y = delta.new_empty(batch, seq_len, d_inner)
        h_k = None
        for k, t0 in enumerate(starts):
            t1 = min(t0 + chunk, seq_len)
            if h_k is not None:
                entering[k] = h_k[:, -1]
            decay_k, h_k = (
                buf[: batch * (t1 - t0) * n * d_inner].view(batch, t1 - t0, n, d_inner) for buf in (decay, h)
            )
            _chunk_states(delta[:, t0:t1], A2_t, du[:, t0:t1], B[:, t0:t1], entering[k], decay_k, h_k)
            y[:, t0:t1] = torch.matmul(C[:, t0:t1].unsqueeze(2), h_k).squeeze(2)
        ctx.save_for_backward(delta, A, du, B, C, entering)
        ctx.chunk = chunk
        h_last = h_k[:, -1].clone() if h_k is not None else entering[0].clone()
        return y, h_last

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_h_last: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        delta, A, du, B, C, entering = ctx.saved_tensors
        batch, seq_len, d_inner = delta.shape
        n, chunk = A.shape[1], ctx.chunk
        A_t = A.t().contiguous()
        A2_t = A_t * LOG2_E
        grad_delta, grad_du = torch.empty_like(delta), torch.empty_like(du)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A_t = A_t.new_zeros(n, d_inner)
        decay, h, g = (delta.new_empty(batch * chunk * n * d_inner) for _ in range(3))
        carry = grad_h_last  # a_{t1} * g_{t1}: what the chunk after this one passes back to its last step
        for k, t0 in reversed(list(enumerate(range(0, seq_len, chunk)))):
            t1 = min(t0 + chunk, seq_len)
            steps = t1 - t0
            decay_k, h_k, g_k = (
                buf[: batch * steps * n * d_inner].view(batch, steps, n, d_inner) for buf in (decay, h, g)
            )
            _chunk_states(delta[:, t0:t1], A2_t, du[:, t0:t1], B[:, t0:t1], entering[k], decay_k, h_k)
            gy = grad_y[:, t0:t1].unsqueeze(2)  # [batch, L, 1, d_inner]
            torch.mul(gy, C[:, t0:t1].unsqueeze(3), out=g_k)  # dL/dh_t through y_t
            g_steps, a_steps = g_k.unbind(1), decay_k.unbind(1)
            if carry is not None:
                g_steps[-1].add_(carry)
            for t in range(steps - 2, -1, -1):
                g_steps[t].addcmul_(a_steps[t + 1], g_steps[t + 1])
            carry = a_steps[0] * g_steps[0]
            grad_C[:, t0:t1] = torch.matmul(gy, h_k.transpose(2, 3)).squeeze(2)
            grad_B[:, t0:t1] = torch.matmul(du[:, t0:t1].unsqueeze(2), g_k.transpose(2, 3)).squeeze(2)
            grad_du[:, t0:t1] = torch.matmul(B[:, t0:t1].unsqueeze(2), g_k).squeeze(2)
            # dL/d(delta_t * A) = g_t * a_t * h_{t-1}, in place of g; the decays' buffer then holds it times delta
            g_k.mul_(decay_k)
            g_k[:, 1:].mul_(h_k[:, :-1])
            g_k[:, 0].mul_(entering[k])
            grad_A_t += torch.mul(g_k, delta[:, t0:t1].unsqueeze(2), out=decay_k).sum((0, 1))
            grad_delta[:, t0:t1] = g_k.mul_(A_t).sum(2)
        grad_h0 = carry if ctx.needs_input_grad[6] else None
        return grad_delta, grad_A_t.t(), grad_du, grad_B, grad_C, None, grad_h0


@torch.compiler.disable  # traced, the per-step loops would unroll into a graph of thousands of ops (minutes to compile)
def _run_scan_core(
    delta: Tensor, A: Tensor, du: Tensor, B: Tensor, C: Tensor, chunk_size: int, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    return _SelectiveScanCore.apply(delta, A, du, B, C, chunk_size, h0)


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same result as ``selective_scan_ref`` (float32 inside), in time and memory linear in T (see the core).
    ``initial_state`` / the final state: [batch, d_inner, N] (mamba_ssm's ``last_state`` layout)."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"selective scan: chunk_size must be >= 1, got {chunk_size}")
    if u.shape[-1] == 0:
        state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.float()
        return (u.new_zeros(u.shape), state) if return_final_state else u.new_zeros(u.shape)
    delta = _discretize(delta, delta_bias, delta_softplus)
    # The core runs channels-last ([batch, T, ...]); these transposes are free when the caller's [batch, d, T]
    # tensors are themselves transposed views of [batch, T, d] ones, as the mixer's are.
    delta_cl = delta.transpose(1, 2).contiguous()
    du = (delta_cl * u.float().transpose(1, 2)).contiguous()
    B_cl, C_cl = (t.float().transpose(1, 2).contiguous() for t in (B, C))
    h0 = None if initial_state is None else initial_state.float().transpose(1, 2).contiguous()
    y, h_last = _run_scan_core(delta_cl, A.float(), du, B_cl, C_cl, chunk_size, h0)
    y = _skip_and_gate(y.transpose(1, 2), u, D, z, u.dtype)
    return (y, h_last.transpose(1, 2)) if return_final_state else y


@functools.cache
def _cuda_selective_scan_fn() -> Callable[..., Tensor] | None:
    """mamba_ssm's fused CUDA scan, or None when the package is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):
        return None
    return selective_scan_fn


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = 64,
) -> Tensor:
    """Fastest available scan: mamba_ssm's kernel for CUDA tensors if installed, else the chunked one."""
    kernel = _cuda_selective_scan_fn() if u.is_cuda else None
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size)


# --------------------------------------------------------------------------- mixer
class MambaMixer(nn.Module):
    """Mamba-1 block of Jamba: gated, conv'd, selective SSM with RMS-normed dt, B and C."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.d_inner = cfg.mamba_d_inner
        self.d_state = cfg.mamba_d_state
        self.d_conv = cfg.mamba_d_conv
        self.dt_rank = cfg.resolved_dt_rank
        self.chunk_size = cfg.mamba_chunk_size
        self.init_std = cfg.init_std

        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,
            bias=cfg.mamba_conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=cfg.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, eps=cfg.norm_eps)
        self.b_layernorm = RMSNorm(self.d_state, eps=cfg.norm_eps)
        self.c_layernorm = RMSNorm(self.d_state, eps=cfg.norm_eps)
        # Optimizers that honour this flag keep weight decay off the SSM dynamics (as Mamba does).
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation. A generic re-init of nn.Linear must call this afterwards:
        dt_proj.bias is not zero but the inverse softplus of a log-uniform dt."""
        for lin in (self.in_proj, self.x_proj, self.out_proj):
            nn.init.normal_(lin.weight, std=self.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.conv1d.reset_parameters()
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = log_dt.exp().clamp(min=DT_INIT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) == dt
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
            norm.weight.fill_(1.0)

    def _causal_conv(self, x: Tensor, past: Tensor | None = None) -> Tensor:
        """Depthwise causal conv1d of [batch, T, d_inner] -> [batch, T, d_inner], channels-last on both sides: run
        as a conv2d over a [batch, d_inner, 1, T] view in channels_last memory format, which oneDNN takes as is.
        ``past``: the d_conv - 1 inputs before ``x`` [batch, d_conv - 1, d_inner] (None: zeros, a sequence start)."""
        weight, seq_len = self.conv1d.weight, x.shape[1]
        pad = self.d_conv - 1
        if past is not None:
            x, pad = torch.cat((past.to(x.dtype), x), dim=1), 0
        x = x.transpose(1, 2).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        out = F.conv2d(x, weight.unsqueeze(2), self.conv1d.bias, padding=(0, pad), groups=weight.shape[0])
        return out[..., :seq_len].squeeze(2).transpose(1, 2)  # causal: drop the right padding

    def _scan(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, z: Tensor) -> Tensor:
        """The selective scan of one sequence from a zero state (all tensors [batch, channels, T] but A)."""
        # dt_proj's bias goes in as delta_bias (before the softplus), as the fused kernel expects.
        return selective_scan(u, delta, A, B, C, self.D.float(), z, delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True, chunk_size=self.chunk_size)

    def forward(self, x: Tensor) -> Tensor:
        """[batch, T, d_model] -> [batch, T, d_model]; training path, no inference cache.

        Activations stay [batch, T, channels] throughout (the projections' natural layout); the scan is handed
        [batch, channels, T] views of them, as its convention asks, without copies.
        """
        hidden, gate = self.in_proj(x).chunk(2, dim=-1)  # each [B, T, d_inner]
        hidden = F.silu(self._causal_conv(hidden))
        dt, B, C = torch.split(self.x_proj(hidden), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        delta = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(self.A_log.float())
        y = self._scan(hidden.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                       gate.transpose(1, 2))
        return self.out_proj(y.transpose(1, 2))
