"""Mamba-1 mixer (Jamba flavour) and the selective scan it runs on.

Parameter and module names match ``transformers``' ``JambaMambaMixer`` so Hugging Face
weights map 1:1 (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``, ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``).

Three implementations of the selective scan share the ``mamba_ssm`` calling convention
(u, delta, z: [B, d_inner, T]; A: [d_inner, N]; B, C: [B, N, T]; D, delta_bias: [d_inner]):

* ``selective_scan_ref``: a plain loop over time, the test oracle.
* ``selective_scan_chunked``: the fast pure-PyTorch path (see ``_scan`` and ``_SelectiveScanCore``).
* ``selective_scan``: ``mamba_ssm``'s CUDA kernel when it is importable and the tensors are
  on a GPU, else the chunked path.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.layers import RMSNorm

# dt initialisation range of Mamba / Jamba: dt ~ log-uniform in [DT_MIN, DT_MAX].
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4


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
) -> Tensor:
    """Sequential selective scan (one step per time index), computed in float32.

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t;  y_t = <x_t, C_t> + D * u_t;  y *= silu(z).
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    delta = _discretize(delta, delta_bias, delta_softplus)
    u32, A32, B32, C32 = u.float(), A.float(), B.float(), C.float()
    batch, d_inner, seq_len = u.shape
    state = u32.new_zeros(batch, d_inner, A.shape[1])
    outputs = []
    for t in range(seq_len):
        decay = torch.exp(delta[:, :, t, None] * A32)
        state = decay * state + (delta[:, :, t] * u32[:, :, t])[..., None] * B32[:, None, :, t]
        outputs.append(torch.einsum("bdn,bn->bd", state, C32[:, :, t]))
    y = torch.stack(outputs, dim=-1) if outputs else u32.new_zeros(batch, d_inner, 0)
    return _skip_and_gate(y, u, D, z, u.dtype)


def _scan_steps(a: Tensor, x: Tensor, out: Tensor, state: Tensor | None, reverse: bool) -> Tensor | None:
    """Plain step-by-step recurrence along dim 0 (used for the tail shorter than one chunk)."""
    for t in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
        if state is None:
            out[t].copy_(x[t])
        else:
            torch.addcmul(x[t], a[t], state, out=out[t])
        state = out[t]
    return state


def _scan_chunked_body(a: Tensor, x: Tensor, out: Tensor, chunk: int, state: Tensor | None, reverse: bool) -> None:
    """The recurrence on a length that is a multiple of ``chunk``, in chunk + T / chunk Python steps.

    (1) every chunk's end state from a zero start and its total decay, all chunks at once;
    (2) the state entering each chunk, one chunk at a time; (3) the exact states, all chunks
    at once again, each chunk starting from its entering state.
    """
    n_chunks = x.shape[0] // chunk
    a3, x3, h3 = (t.reshape(n_chunks, chunk, *t.shape[1:]) for t in (a, x, out))
    order = list(range(chunk - 1, -1, -1)) if reverse else list(range(chunk))
    chunk_order = list(range(n_chunks - 1, -1, -1)) if reverse else list(range(n_chunks))
    entering = torch.zeros_like(x3[:, 0])
    if state is not None:
        entering[chunk_order[0]] = state
    if n_chunks > 1:  # with one chunk, the entering state is just ``state``
        end_state, spare = x3[:, order[0]].clone(), torch.empty_like(x3[:, 0])
        total_decay = a3[:, order[0]].clone()
        for t in order[1:]:
            torch.addcmul(x3[:, t], a3[:, t], end_state, out=spare)
            end_state, spare = spare, end_state
            total_decay.mul_(a3[:, t])
        for prev, c in itertools.pairwise(chunk_order):
            torch.addcmul(end_state[prev], total_decay[prev], entering[prev], out=entering[c])

    prev_state = entering
    for t in order:
        torch.addcmul(x3[:, t], a3[:, t], prev_state, out=h3[:, t])
        prev_state = h3[:, t]


@torch.no_grad()
def _scan(
    a: Tensor, x: Tensor, chunk_size: int, reverse: bool = False, state: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """Linear recurrence along dim 0, without autograd.

    forward: h_t = a_t * h_{t-1} + x_t;  reverse: h_t = a_t * h_{t+1} + x_t;  ``state`` is the
    state just outside the sequence (zero if None).

    Why not the masked segsum-matmul of Mamba-2: Mamba-1 decays differ per (channel, state),
    so the [chunk, chunk] decay matrix is not shared and costs chunk_size times more exps and
    memory than this O(T) two-level loop. Why not a cumsum of log-decays: exp(-cumsum) overflows
    on long or fast-decaying chunks. Here decays are a = exp(delta * A) in (0, 1] and are only
    multiplied together, which can underflow towards 0 (the exact limit) but never overflow.
    Time is the leading dim so every step reads and writes contiguous blocks. ``out`` may be ``x``
    itself (each step reads x_t before writing h_t there): no state-sized allocation at all.
    """
    h = torch.empty_like(x) if out is None else out
    seq_len = x.shape[0]
    chunk = max(1, min(chunk_size, seq_len))
    body = (seq_len // chunk) * chunk
    if reverse:  # the tail comes first, then feeds the chunked body
        state = _scan_steps(a[body:], x[body:], h[body:], state, reverse=True)
        if body:
            _scan_chunked_body(a[:body], x[:body], h[:body], chunk, state, reverse=True)
    else:
        if body:
            _scan_chunked_body(a[:body], x[:body], h[:body], chunk, state, reverse=False)
            state = h[body - 1]
        _scan_steps(a[body:], x[body:], h[body:], state, reverse=False)
    return h


class _SelectiveScanCore(torch.autograd.Function):
    """y_t = <h_t, C_t> with h_t = exp(delta_t * A) * h_{t-1} + du_t * B_t, time-major, hand-written backward.

    Shapes: delta, du [T, batch, d_inner]; A [d_inner, N]; B, C [T, batch, N] -> y [T, batch, d_inner].
    Fusing the decay, input and output contractions into one autograd node keeps only two state-sized
    tensors (decays and states) for backward and allocates two more in backward, where autograd over
    the same ops would allocate about eight; fresh state-sized allocations dominate the CPU time. The
    backward is the same two-level recurrence run right to left: g_t = dL/dh_t + a_{t+1} g_{t+1}.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, delta: Tensor, A: Tensor, du: Tensor, B: Tensor, C: Tensor, chunk_size: int
    ) -> Tensor:
        seq_len, batch, d_inner = delta.shape
        n = A.shape[1]
        decay = (delta.unsqueeze(-1) * A).exp_()  # exp of a log-decay <= 0: in (0, 1]
        h = du.unsqueeze(-1) * B.unsqueeze(2)  # the inputs x_t, turned into the states in place
        _scan(decay, h, chunk_size, out=h)
        y = torch.bmm(h.view(seq_len * batch, d_inner, n), C.reshape(seq_len * batch, n, 1))
        ctx.save_for_backward(delta, A, du, B, C, decay, h)
        ctx.chunk_size = chunk_size
        return y.view(seq_len, batch, d_inner)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        delta, A, du, B, C, decay, h = ctx.saved_tensors
        seq_len, batch, d_inner = delta.shape
        n, rows = A.shape[1], seq_len * batch
        grad_y = grad_y.contiguous()
        grad_C = torch.bmm(grad_y.view(rows, 1, d_inner), h.view(rows, d_inner, n)).view(seq_len, batch, n)
        g = grad_y.unsqueeze(-1) * C.unsqueeze(2)  # dL/dh_t, turned into dL/dx_t in place
        if seq_len > 1:  # position t takes a_{t+1} times the gradient of position t+1
            _scan(decay[1:], g[:-1], ctx.chunk_size, reverse=True, state=g[-1], out=g[:-1])
        grad_B = torch.bmm(du.view(rows, 1, d_inner), g.view(rows, d_inner, n)).view(seq_len, batch, n)
        grad_du = torch.bmm(g.view(rows, d_inner, n), B.reshape(rows, n, 1)).view(seq_len, batch, d_inner)
        # dL/d(delta_t * A) = g_t * h_{t-1} * a_t, in place of g (a_0 multiplies the zero initial state).
        g[1:] *= h[:-1]
        g[1:] *= decay[1:]
        g[0] = 0.0
        # sum over (t, batch) per channel as d small matmuls on strided views (einsum would copy g first)
        grad_A = torch.bmm(delta.view(rows, d_inner).t().unsqueeze(1), g.view(rows, d_inner, n).transpose(0, 1))
        grad_A = grad_A.view(d_inner, n)
        grad_delta = g.mul_(A).sum(-1)
        return grad_delta, grad_A, grad_du, grad_B, grad_C, None


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
) -> Tensor:
    """Same result as ``selective_scan_ref`` (float32 inside) in about 2 * chunk_size + T / chunk_size steps."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"selective scan: chunk_size must be >= 1, got {chunk_size}")
    if u.shape[-1] == 0:
        return u.new_zeros(u.shape)
    delta = _discretize(delta, delta_bias, delta_softplus)
    # Time-major [T, batch, ...] so that each step of the recurrence is one contiguous block and the
    # contractions with B and C are batched matmuls. Made contiguous while small: elementwise ops lay
    # their output out like their inputs, and a strided state would make every step slow.
    delta_tm = delta.permute(2, 0, 1).contiguous()
    du = delta_tm * u.float().permute(2, 0, 1)
    B_tm = B.float().permute(2, 0, 1).contiguous()
    C_tm = C.float().permute(2, 0, 1).contiguous()
    y = _SelectiveScanCore.apply(delta_tm, A.float().contiguous(), du, B_tm, C_tm, chunk_size)
    return _skip_and_gate(y.permute(1, 2, 0), u, D, z, u.dtype)


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

    def forward(self, x: Tensor) -> Tensor:
        """[batch, T, d_model] -> [batch, T, d_model]; training path, no inference cache."""
        seq_len = x.shape[1]
        hidden, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # each [B, d_inner, T]
        hidden = F.silu(self.conv1d(hidden)[..., :seq_len])  # causal: drop the right padding
        dt, B, C = torch.split(self.x_proj(hidden.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        # dt_proj's bias goes in as delta_bias (before the softplus), as the fused kernel expects.
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            hidden,
            delta,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            gate,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            chunk_size=self.chunk_size,
        )
        return self.out_proj(y.transpose(1, 2))
