"""TMSA, DiffiT's time-dependent multi-head self-attention (DiffiT Sec. 3.2, Eq. 3–6), and what it needs: the time
modes of the ablations, the Swin relative position index, non-overlapping windows, its three kernels (SDPA, flex,
reference) and the largest-logit probe.

Pure torch. Token tensors are (B, N, C) in raster order of an (H, W) grid; the time token x_t is (B, time_dim).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

# Where the time token enters a block (DiffiT Tables 6–7, Fig. 7b); "tmsa" is the paper's model.
TIME_MODES = ("tmsa", "bias", "mlp", "adaln", "separate")
# TMSA kernels (TMSA.kernel): SDPA with the bias as attn_mask, flex_attention with the bias as a score_mod, and the
# plain reference path (explicit softmax); benchmarks/bench_attention.py compares them
ATTENTION_KERNELS = ("sdpa", "flex", "reference")


def check_time_mode(time_mode: str) -> str:
    """Validate a time_mode name (the DiffiT ablations, docs/paper.md 'Ablations')."""
    if time_mode not in TIME_MODES:
        raise ValueError(f"time_mode must be one of {TIME_MODES}, got {time_mode!r}")
    return time_mode


# ------------------------------------------------------------------------------------ relative position / windows
def relative_position_index(window: int) -> torch.Tensor:
    """Swin index of each token pair's (Δrow, Δcol) into the (2w−1)² table (release, Swin) -> (w², w²)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (w², w², 2), in [0, 2w−2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]  # (w², w²) int64


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, w², C): non-overlapping w×w windows folded into the batch (DiffiT Sec. 3.2, no shift)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)  # (B, h, w', wr, wc, C)
    return x.reshape(-1, window * window, C)


def window_merge(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition: (B·nW, w², C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.reshape(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


# ------------------------------------------------------------------------------------------------------- TMSA
def _fused_attention_pays(q: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether SDPA's fused kernel beats the explicit path for this call.

    CUDA: always (the memory-efficient kernel also returns the bias gradient). CPU: the fused flash kernel takes
    no gradient for a float mask, so training falls back to PyTorch's math path, which is slower than the explicit
    path of TMSA.attend (it adds NaN-safe softmax passes and upcasts bf16); without gradients the fused kernel wins
    in fp32 only (measured on a 2-core AVX-512-bf16 EPYC with benchmarks/bench_networks.py-sized shapes).
    """
    if q.device.type != "cpu":
        return True
    grad = torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad)
    return not grad and q.dtype == torch.float32


@functools.cache
def _compiled_flex():
    """flex_attention compiled once (it is only fast compiled; eager it runs a reference loop)."""
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax(q·kᵀ/√d + B)·v with flex_attention, the bias B (heads, N, N') or (B', heads, N, N') added by a
    `score_mod` (its gradient flows back into B): (B', heads, N, d). Windows stay folded into the batch: a window
    of a raster-order token grid is not a contiguous block, so a block mask over the whole grid would keep nearly
    every 128-token block. PyTorch runs flex's backward on CUDA only; CPU is forward-only (eager reference)."""
    if bias.dim() == 3:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
    else:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx]

    eager = q.device.type != "cuda" or torch.compiler.is_compiling()  # inside a compiled block: traced there
    return (flex_attention if eager else _compiled_flex())(q, k, v, score_mod=score_mod)


def check_attention_kernel(kernel: str) -> str:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    return kernel


def set_attention_kernel(net: nn.Module, kernel: str) -> None:
    """Select the kernel of every TMSA in `net`: "sdpa" (bias as attn_mask), "flex" (bias as score_mod) or
    "reference" (explicit softmax)."""
    check_attention_kernel(kernel)
    for m in net.modules():
        if isinstance(m, TMSA):
            m.kernel = kernel


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention (DiffiT Sec. 3.2, Eq. 3–6) with a Swin relative position bias.

    q,k,v = qkv(x_s) + qkv_temb(x_t);  Attention = Softmax(q·kᵀ/√d + B)·v;  then `proj`.
    Global when `window_size` equals the token grid (latent model), else non-overlapping w×w windows.
    `time_mode` selects the ablations: "bias" (time only in the bias, Table 6 F), "separate" (time token as
    an extra key/value token, Table 7), "mlp"/"adaln" (no time input here). `kernel` (`ATTENTION_KERNELS`,
    `set_attention_kernel` for a whole network) picks "sdpa", "flex" or the plain "reference" path; it holds no
    weights, so the state-dict layout is the same for every kernel. `store_attn = True` keeps the last softmax
    weights in `last_attn` (B·nW, heads, N, N[+1]).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        time_dim: int,
        window_size: int,
        time_mode: str = "tmsa",
        qkv_bias: bool = True,
        kernel: str = "sdpa",
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.time_mode = check_time_mode(time_mode)
        table = (2 * window_size - 1) ** 2
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if time_mode == "tmsa":
            self.qkv_temb = nn.Linear(time_dim, 3 * dim)  # W_qt, W_kt, W_vt fused, no activation before it
        elif time_mode == "bias":
            self.rpb_temb = nn.Linear(time_dim, table * num_heads)  # time-dependent offset of the bias table
        elif time_mode == "separate":
            self.kv_temb = nn.Linear(time_dim, 2 * dim)  # key and value of the extra time token
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.kernel = check_attention_kernel(kernel)
        self.store_attn = False
        self.last_attn: torch.Tensor | None = None

    def relative_position_bias(self) -> torch.Tensor:
        """Gather B from the table: (heads, w², w²)."""
        n = self.window_size**2
        return self.relative_position_bias_table.t()[:, self.relative_position_index.view(-1)].view(-1, n, n)

    def _time_bias(self, x_t: torch.Tensor) -> torch.Tensor:
        """Table 6 F: time-dependent relative position bias, (B, heads, w², w²)."""
        n = self.window_size**2
        table = self.rpb_temb(x_t).view(x_t.shape[0], -1, self.num_heads).transpose(1, 2)  # (B, heads, L)
        return table[:, :, self.relative_position_index.view(-1)].view(x_t.shape[0], self.num_heads, n, n)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Softmax(q·kᵀ·scale + bias)·v: (B', heads, N, d) with `self.kernel` (the reference path also when the
        weights are stored)."""
        bias = bias.to(q.dtype)
        if self.store_attn or self.kernel == "reference":
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B', heads, N, N')
            if self.store_attn:
                self.last_attn = attn.detach()
            return attn @ v
        if self.kernel == "flex":
            return flex_attend(q, k, v, bias)
        if _fused_attention_pays(q, bias):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias if bias.dim() == 4 else bias.unsqueeze(0))
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B', heads, N, N')
        return attn.add_(bias).softmax(dim=-1) @ v  # in-place bias: matmul's backward never needs its output

    def shared_qkv(self, x_t: torch.Tensor | None) -> torch.Tensor | None:
        """What every token of a sample adds to its q, k, v: x_t·W_t (Eq. 3–5, TMSA) plus the qkv bias, as
        (B or 1, 1, 3C), with the **key** third left out. A key term shared by all tokens adds q·k_t to every logit
        of a query's row, which softmax ignores (Eq. 6), so the output is exactly the paper's. Kept in, its true
        gradient is zero and its computed one rounding noise, which Adam turns into learning-rate-sized steps: W_kt
        grew without bound on real data until the logits lost their bf16 precision (docs/stability.md)."""
        shared = self.qkv.bias
        if self.time_mode == "tmsa":
            shared = self.qkv_temb(x_t) if shared is None else self.qkv_temb(x_t) + shared  # (B, 3C)
        if shared is None:
            return None
        q_t, _, v_t = shared.chunk(3, dim=-1)
        return torch.cat([q_t, torch.zeros_like(q_t), v_t], dim=-1).unsqueeze(-2)  # (B or 1, 1, 3C)

    def heads(
        self, x: torch.Tensor, x_t: torch.Tensor | None, hw: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 3–5: (B, N, C) tokens → q, k, v (B·nW, heads, n, d) per window and the bias B (…, n, n[+1])."""
        B, N, C = x.shape
        H, W = hw if hw is not None else (math.isqrt(N), math.isqrt(N))
        w, heads, d = self.window_size, self.num_heads, self.head_dim
        n, nW = w * w, (H // w) * (W // w)
        qkv = F.linear(x, self.qkv.weight)  # (B, N, 3C): spatial GEMM, then the per-sample term broadcast over tokens
        shared = self.shared_qkv(x_t)
        if shared is not None:
            qkv = qkv.add_(shared.to(qkv.dtype))
        if nW > 1:
            qkv = window_partition(qkv.view(B, H, W, 3 * C), w)  # (B·nW, w², 3C)
        q, k, v = qkv.reshape(B * nW, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B·nW, heads, n, d)
        bias = self.relative_position_bias()  # (heads, n, n)
        if self.time_mode == "bias":
            bias = (bias + self._time_bias(x_t)).unsqueeze(1).expand(B, nW, heads, n, n).reshape(B * nW, heads, n, n)
        elif self.time_mode == "separate":
            kt, vt = self.kv_temb(x_t).to(k.dtype).view(B, 2, heads, 1, d).repeat_interleave(nW, dim=0).unbind(1)
            k, v = torch.cat([k, kt], dim=2), torch.cat([v, vt], dim=2)  # (B·nW, heads, n+1, d)
            bias = F.pad(bias, (0, 1))  # (heads, n, n+1): no positional bias towards the time token
        return q, k, v, bias

    def logits(
        self, x: torch.Tensor, x_t: torch.Tensor | None = None, hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The pre-softmax attention logits q·kᵀ/√d + B (Eq. 6), in float32: (B·nW, heads, n, n[+1])."""
        q, k, _, bias = self.heads(x, x_t, hw)
        return (q.float() * self.scale) @ k.float().transpose(-2, -1) + bias.float()

    def forward(
        self, x: torch.Tensor, x_t: torch.Tensor | None = None, hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        H, W = hw if hw is not None else (math.isqrt(N), math.isqrt(N))
        q, k, v, bias = self.heads(x, x_t, hw)
        out = self.attend(q, k, v, bias).transpose(1, 2).reshape(-1, self.window_size**2, C)  # (B·nW, n, C)
        if out.shape[0] > B:
            out = window_merge(out, self.window_size, H, W)  # (B, H, W, C)
        return self.proj(out.reshape(B, N, C))


def attention_logit_max(net: nn.Module, run) -> dict[str, torch.Tensor]:
    """Largest pre-softmax logit of every TMSA in `net` during the forward pass `run()`, as 0-dim device tensors
    keyed by module name (no host sync; a diagnostic: it recomputes each layer's logits explicitly)."""
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, kwargs, output):
            inputs = dict(zip(("x", "x_t", "hw"), args), **kwargs)
            found[name] = module.logits(**inputs).amax()

        return record

    handles = [
        m.register_forward_hook(hook(n), with_kwargs=True) for n, m in net.named_modules() if isinstance(m, TMSA)
    ]
    try:  # eager even inside compiled blocks: hooks added there would make every probe recompile them
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            run()
    finally:
        for h in handles:
            h.remove()
    return found
