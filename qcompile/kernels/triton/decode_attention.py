"""Attention of a few queries over a static KV cache, split along the keys (flash-decoding).

At one query per head the attention of a decode step is a read of the cache: ``B·H_kv·T·D`` keys and as
many values. One program per (batch, head) — what a flash kernel launches at one query — puts 32 programs
on the H200's 132 multiprocessors and reads the cache at a fraction of HBM bandwidth. Here each program
takes one query head and one chunk of ``CHUNK`` keys (so ``B·H_q·⌈T/CHUNK⌉`` programs), loads the chunk's
mask, keys and values at once (one memory round trip) and writes its partial softmax state ``(m, l, acc)``:

    m_s = max_j s_j,   l_s = Σ_j exp(s_j − m_s),   acc_s = Σ_j exp(s_j − m_s) v_j,   s_j = scale · q·k_j

over the chunk's kept keys (``mask[j]`` true); a second launch combines the chunks of each head:
``out = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} l_s`` with ``M = max_s m_s`` — the softmax over all kept keys.
Masked keys are loaded (the whole cache is read) but never counted: a first version that predicated the key
loads on the mask, in a loop over 32-key tiles, put two more round trips in each program and took 9.9 µs a
layer in the 7B decode step on the H200 against this one's 7.2 (``benchmarks/results/decode-h200.md``). Query head ``h`` reads key/value head ``h // (H_q / H_kv)``
(grouped-query attention without the repeated cache). Accumulation is float32; the output is the query's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_attention", "supported", "split_plan"]

_TARGET_PROGRAMS = 8 * 132  # several programs per multiprocessor of the H200, each one key chunk


@triton.jit
def _split_kernel(q, k, v, mask, part_acc, part_m, part_l,
                  T, HQ, S, G, NS,
                  sq_b, sq_h, sq_s, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, sm_h, sm_s, sm_t,
                  scale,
                  D: tl.constexpr, CHUNK: tl.constexpr):
    bh = tl.program_id(0)  # (batch, query head, query) flattened: row of the output
    split = tl.program_id(1)
    b = bh // (HQ * S)
    rem = bh % (HQ * S)
    h = rem // S
    i = rem % S
    hk = h // G
    d = tl.arange(0, D)
    t = split * CHUNK + tl.arange(0, CHUNK)
    inside = t < T
    # the mask, keys and values are loaded independently (one memory round trip, not three); keys and values
    # outside the mask are loaded but never counted (scores −∞, values 0, so garbage in unused slots is inert)
    keep = tl.load(mask + b * sm_b + h * sm_h + i * sm_s + t * sm_t, mask=inside, other=0) != 0
    kt = tl.load(k + b * sk_b + hk * sk_h + t[:, None] * sk_t + d[None, :], mask=inside[:, None], other=0.0)
    vt = tl.load(v + b * sv_b + hk * sv_h + t[:, None] * sv_t + d[None, :], mask=inside[:, None], other=0.0)
    qv = tl.load(q + b * sq_b + h * sq_h + i * sq_s + d).to(tl.float32) * scale
    s = tl.where(keep, tl.sum(kt.to(tl.float32) * qv[None, :], 1), -float("inf"))
    m = tl.max(s, 0)
    p = tl.exp(s - tl.where(m == -float("inf"), 0.0, m))
    acc = tl.sum(p[:, None] * tl.where(keep[:, None], vt.to(tl.float32), 0.0), 0)
    row = bh * NS + split
    tl.store(part_acc + row * D + d, acc)
    tl.store(part_m + row, m)
    tl.store(part_l + row, tl.sum(p, 0))


@triton.jit
def _combine_kernel(part_acc, part_m, part_l, out, NS, HQ, S, so_b, so_h, so_s,
                    D: tl.constexpr, NS_P: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // (HQ * S)
    rem = bh % (HQ * S)
    h = rem // S
    i = rem % S
    s = tl.arange(0, NS_P)
    ok = s < NS
    d = tl.arange(0, D)
    m = tl.load(part_m + bh * NS + s, mask=ok, other=-float("inf"))
    l = tl.load(part_l + bh * NS + s, mask=ok, other=0.0)
    big = tl.max(m, 0)
    big = tl.where(big == -float("inf"), 0.0, big)
    w = tl.exp(m - big)
    acc = tl.load(part_acc + (bh * NS + s[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(out + b * so_b + h * so_h + i * so_s + d, o.to(out.dtype.element_ty))


def supported(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the split kernel takes this call: CUDA, a few queries, a power-of-two head size, a bool mask,
    unit stride along the head dim."""
    d = q.shape[-1]
    return (q.is_cuda and q.shape[2] <= 4 and d in (16, 32, 64, 128, 256) and mask.dtype == torch.bool
            and q.stride(-1) == 1 and k.stride(-1) == 1 and k.shape[-1] == d)


def split_plan(rows: int, t: int, min_chunk: int = 32) -> tuple[int, int]:
    """``(chunk, splits)``: keys per program (a power of two ≥ ``min_chunk``) so that ``rows · splits`` programs
    fill the chip several times over."""
    want = max(1, -(-_TARGET_PROGRAMS // rows))
    chunk = max(min_chunk, triton.next_power_of_2(-(-t // want)))
    return chunk, -(-t // chunk)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float, chunk: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """``softmax(scale · q kᵀ masked) v`` for ``q [B, H_q, S, D]``, ``k, v [B, H_kv, T, D]``, bool ``mask``
    broadcastable to ``[B, H_q, S, T]`` (true = attend); see the module docstring. ``chunk`` (a power of two)
    and ``num_warps`` override the split plan's (benchmarks of other plans)."""
    bsz, hq, s, d = q.shape
    t, g = k.shape[2], hq // k.shape[1]
    m4 = mask.view(torch.uint8)
    while m4.dim() < 4:
        m4 = m4.unsqueeze(0)
    m4 = m4.expand(bsz, hq, s, t)
    rows = bsz * hq * s
    chunk, ns = split_plan(rows, t) if chunk is None else (chunk, -(-t // chunk))
    num_warps = num_warps or (4 if chunk * d > 4096 else 2)
    part_acc = torch.empty((rows * ns, d), dtype=torch.float32, device=q.device)
    part_m = torch.empty(rows * ns, dtype=torch.float32, device=q.device)
    part_l = torch.empty(rows * ns, dtype=torch.float32, device=q.device)
    out = torch.empty((bsz, hq, s, d), dtype=q.dtype, device=q.device)
    _split_kernel[(rows, ns)](q, k, v, m4, part_acc, part_m, part_l, t, hq, s, g, ns,
                              q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                              v.stride(0), v.stride(1), v.stride(2),
                              m4.stride(0), m4.stride(1), m4.stride(2), m4.stride(3), float(scale),
                              D=d, CHUNK=chunk, num_warps=num_warps)
    _combine_kernel[(rows,)](part_acc, part_m, part_l, out, ns, hq, s, out.stride(0), out.stride(1),
                             out.stride(2), D=d, NS_P=triton.next_power_of_2(ns), num_warps=4)
    return out
