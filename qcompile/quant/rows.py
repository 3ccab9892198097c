"""rows: a QuantizedWeight cut into, or joined from, runs of rows.

GPTQ/LeanQuant's column loop is independent per row: for a fixed Hessian ``H`` (hence the same ``U`` and, with
act-order, the same column order), row ``r`` of the result depends only on row ``r`` of ``W``. Linears that read
the same input share ``H``, so ``[W_q; W_k; W_v]`` quantized as one matrix gives each linear its own result
(the same per-row algebra, one loop instead of three), and any run of rows can be quantized on its own (the
rows of a stage dealt out among ranks). Every tensor field of a ``QuantizedWeight`` (weight, codes, scales,
zeros, codebook) is indexed by row first, so cutting and joining are ``split``/``cat`` along dim 0.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.errors import ShapeError
from qcompile.quant.formats import QuantizedWeight

__all__ = ["cat_rows", "split_rows", "row_runs"]


def _tensor_fields(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {f.name: getattr(qw, f.name) for f in dataclasses.fields(qw)
            if f.init and isinstance(getattr(qw, f.name), torch.Tensor)}


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """``qw`` cut into consecutive runs of ``sizes`` rows (each a QuantizedWeight of its own)."""
    if sum(sizes) != qw.weight.shape[0]:
        raise ShapeError(f"split_rows: sizes {sizes} add up to {sum(sizes)}, the weight has {qw.weight.shape[0]} rows")
    parts = {k: v.split(sizes, dim=0) for k, v in _tensor_fields(qw).items()}
    return [dataclasses.replace(qw, **{k: v[i] for k, v in parts.items()}) for i in range(len(sizes))]


def cat_rows(qws: list[QuantizedWeight]) -> QuantizedWeight:
    """The row runs ``qws`` (same spec and grid kind) joined in order."""
    if not qws:
        raise ShapeError("cat_rows: nothing to join")
    first = _tensor_fields(qws[0])
    if any(set(_tensor_fields(q)) != set(first) or q.spec != qws[0].spec for q in qws):
        raise ShapeError("cat_rows: the parts differ in spec or grid kind")
    return dataclasses.replace(qws[0], **{k: torch.cat([getattr(q, k) for q in qws]) for k in first})


def row_runs(rows: int, world: int) -> list[tuple[int, int]]:
    """``world`` contiguous runs ``[lo, hi)`` covering ``rows``, as even as integers allow (rank r gets run r)."""
    return [((rows * r) // world, (rows * (r + 1)) // world) for r in range(world)]
