"""Attention of a few queries over a static KV cache, split along the keys (flash-decoding), in one launch.

At one query per head the attention of a decode step is a read of the cache: ``B·H_kv·T·D`` keys and as
many values. One program per (batch, head) — what a flash kernel launches at one query — puts 32 programs
on the H200's 132 multiprocessors and reads the cache at a fraction of HBM bandwidth. Here each program
takes one query head and one chunk of ``CHUNK`` keys (so ``B·H_q·⌈T/CHUNK⌉`` programs), loads the chunk's
keys and values at once (one memory round trip) and writes its partial softmax state ``(m, l, acc)``:

    m_s = max_j s_j,   l_s = Σ_j exp(s_j − m_s),   acc_s = Σ_j exp(s_j − m_s) v_j,   s_j = scale · q·k_j

over the chunk's kept keys (``mask[j]`` true); the chunks of a head combine into the softmax over all its kept
keys: ``out = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} l_s`` with ``M = max_s m_s``.

- **One launch.** Each program counts itself done on its head's counter (an atomic add after its partial
  state is stored); the head's last program reads the others' states from L2 and combines them, then
  resets the counter to 0 for the next call. The previous version launched a second kernel for the
  combine. On the H200, as a step's 32 calls over caches read from HBM (one CUDA graph), one launch takes
  8.6 µs a layer against 9.5 (7B shape) and 6.9 against 7.7 (8B); in the 7B decode step (with
  ``skip_masked``, below) 8.08 µs against 6.29 + 2.50, W4A16 413.3 → 420.7 tok/s
  (``benchmarks/results/decode-h200.md``). The counters (int32, one per output row) are
  allocated on first use per device, so a call under CUDA-graph capture that would need new ones takes the
  two-launch path; calls on one device must not overlap (one stream), since they share the counters.
- **Masked keys are loaded** with the mask (one memory round trip) but never counted. ``skip_masked=True``
  loads the mask first and predicates the key/value loads on it (unfilled slots of a static cache cost no
  traffic): one more round trip, which the bytes saved repaid only with a third of the 768 slots masked in
  the 7B step (8.36 vs 8.58 µs a layer) and never on the 8B step (7.36 vs 6.93), so it is off by default
  (``benchmarks/backend_check.py``: 32 layers' caches from HBM, one CUDA graph). A first version that
  predicated the loads in a loop over 32-key tiles took 9.9 µs a layer against the one-round-trip 7.2.

Query head ``h`` reads key/value head ``h // (H_q / H_kv)`` (grouped-query attention without the repeated
cache). Accumulation is float32; the output is the query's dtype. ``QCOMPILE_ATTENTION_PREVIOUS=1`` runs the
previous version (two launches), for A/B timings.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["decode_attention", "split_plan", "supported"]

_TARGET_PROGRAMS = 8 * 132  # several programs per multiprocessor of the H200, each one key chunk
_COUNTERS: dict[torch.device, torch.Tensor] = {}  # device -> int32 zeros, one per output row (one launch)


@triton.jit
def _combine(part_acc, part_m, part_l, out, bh, NS, D: tl.constexpr, NS_P: tl.constexpr):
    """Row ``bh``'s output from its ``NS`` partial states (read through L2: other programs wrote them)."""
    s = tl.arange(0, NS_P)
    ok = s < NS
    d = tl.arange(0, D)
    m = tl.load(part_m + bh * NS + s, mask=ok, other=-float("inf"), cache_modifier=".cg")
    l = tl.load(part_l + bh * NS + s, mask=ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(part_acc + (bh * NS + s[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0,
                  cache_modifier=".cg")
    big = tl.max(m, 0)
    w = tl.exp(m - tl.where(big == -float("inf"), 0.0, big))
    o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(out + d, o.to(out.dtype.element_ty))


@triton.jit
def _split_kernel(q, k, v, mask, part_acc, part_m, part_l, out, count,
                  T, HQ, S, G, NS,
                  sq_b, sq_h, sq_s, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, sm_h, sm_s, sm_t, so_b, so_h, so_s,
                  scale,
                  D: tl.constexpr, CHUNK: tl.constexpr, NS_P: tl.constexpr, ONE_LAUNCH: tl.constexpr,
                  SKIP_MASKED: tl.constexpr):
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
    keep = tl.load(mask + b * sm_b + h * sm_h + i * sm_s + t * sm_t, mask=inside, other=0) != 0
    # masked keys and values are never counted (scores −∞, values 0, so garbage in unused slots is inert);
    # loaded with the mask (one round trip, the whole cache), or with SKIP_MASKED not loaded (after the mask)
    rows = (inside & keep) if SKIP_MASKED else inside
    kt = tl.load(k + b * sk_b + hk * sk_h + t[:, None] * sk_t + d[None, :], mask=rows[:, None], other=0.0)
    vt = tl.load(v + b * sv_b + hk * sv_h + t[:, None] * sv_t + d[None, :], mask=rows[:, None], other=0.0)
    qv = tl.load(q + b * sq_b + h * sq_h + i * sq_s + d).to(tl.float32) * scale
    s = tl.where(keep, tl.sum(kt.to(tl.float32) * qv[None, :], 1), -float("inf"))
    m = tl.max(s, 0)
    p = tl.exp(s - tl.where(m == -float("inf"), 0.0, m))
    acc = tl.sum(p[:, None] * tl.where(keep[:, None], vt.to(tl.float32), 0.0), 0)
    row = bh * NS + split
    tl.store(part_acc + row * D + d, acc)
    tl.store(part_m + row, m)
    tl.store(part_l + row, tl.sum(p, 0))
    if ONE_LAUNCH:
        tl.debug_barrier()  # every thread's stores precede the release below
        done = tl.atomic_add(count + bh, 1, sem="acq_rel", scope="gpu")
        if done == NS - 1:  # the row's last program: the others' states are visible after the acquire
            _combine(part_acc, part_m, part_l, out + b * so_b + h * so_h + i * so_s, bh, NS, D, NS_P)
            tl.store(count + bh, 0)  # the next call (ordered after this one on the stream) starts from 0


@triton.jit
def _combine_kernel(part_acc, part_m, part_l, out, NS, HQ, S, so_b, so_h, so_s,
                    D: tl.constexpr, NS_P: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // (HQ * S)
    rem = bh % (HQ * S)
    h = rem // S
    i = rem % S
    _combine(part_acc, part_m, part_l, out + b * so_b + h * so_h + i * so_s, bh, NS, D, NS_P)


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


def _counters(device: torch.device, rows: int) -> torch.Tensor | None:
    """The device's zeroed row counters (at least ``rows``), or None where they would have to be allocated
    inside a CUDA-graph capture (the memory would belong to the graph)."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < rows:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        have = _COUNTERS[device] = torch.zeros(max(rows, 1024), dtype=torch.int32, device=device)
    return have


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float, chunk: int | None = None, num_warps: int | None = None,
                     one_launch: bool | None = None, skip_masked: bool = False) -> torch.Tensor:
    """``softmax(scale · q kᵀ masked) v`` for ``q [B, H_q, S, D]``, ``k, v [B, H_kv, T, D]``, bool ``mask``
    broadcastable to ``[B, H_q, S, T]`` (true = attend); see the module docstring. ``chunk`` (a power of two),
    ``num_warps``, ``one_launch`` (default: unless ``QCOMPILE_ATTENTION_PREVIOUS=1``) and ``skip_masked``
    override the defaults (benchmarks of other plans)."""
    one_launch = os.environ.get("QCOMPILE_ATTENTION_PREVIOUS") != "1" if one_launch is None else one_launch
    bsz, hq, s, d = q.shape
    t, g = k.shape[2], hq // k.shape[1]
    m4 = mask.view(torch.uint8)
    while m4.dim() < 4:
        m4 = m4.unsqueeze(0)
    m4 = m4.expand(bsz, hq, s, t)
    rows = bsz * hq * s
    chunk, ns = split_plan(rows, t) if chunk is None else (chunk, -(-t // chunk))
    num_warps = num_warps or (4 if chunk * d > 4096 else 2)
    count = _counters(q.device, rows) if one_launch else None
    part_acc = torch.empty((rows * ns, d), dtype=torch.float32, device=q.device)
    part_m = torch.empty(rows * ns, dtype=torch.float32, device=q.device)
    part_l = torch.empty(rows * ns, dtype=torch.float32, device=q.device)
    out = torch.empty((bsz, hq, s, d), dtype=q.dtype, device=q.device)
    ns_p = triton.next_power_of_2(ns)
    _split_kernel[(rows, ns)](q, k, v, m4, part_acc, part_m, part_l, out, part_m if count is None else count,
                              t, hq, s, g, ns,
                              q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                              v.stride(0), v.stride(1), v.stride(2),
                              m4.stride(0), m4.stride(1), m4.stride(2), m4.stride(3),
                              out.stride(0), out.stride(1), out.stride(2), float(scale),
                              D=d, CHUNK=chunk, NS_P=ns_p, ONE_LAUNCH=count is not None, SKIP_MASKED=skip_masked,
                              num_warps=num_warps)
    if count is None:
        _combine_kernel[(rows,)](part_acc, part_m, part_l, out, ns, hq, s, out.stride(0), out.stride(1),
                                 out.stride(2), D=d, NS_P=ns_p, num_warps=4)
    return out
