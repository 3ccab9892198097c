"""WikiText-2 text for evaluation (test split) and calibration (validation split).

The files live in ``../shared/data`` beside the repository (or wherever ``QCOMPILE_DATA`` points).
Calibration windows are drawn deterministically from a seed; evaluation uses the standard protocol
(whole text tokenized once, non-overlapping windows from the start).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qcompile.errors import QCompileError

TEST = "wikitext2_test.txt"
VALID = "wikitext2_valid.txt"


def data_dir() -> Path:
    env = os.environ.get("QCOMPILE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def read_text(name: str) -> str:
    path = data_dir() / name
    if not path.is_file():
        raise QCompileError(f"missing data file {path}; set QCOMPILE_DATA to the folder holding {name}")
    return path.read_text(encoding="utf-8")


def token_ids(tokenizer, name: str) -> torch.Tensor:
    """The whole file tokenized once, as a 1-D LongTensor."""
    return torch.tensor(tokenizer(read_text(name))["input_ids"], dtype=torch.long)


def eval_windows(ids: torch.Tensor, seq: int, windows: int | None) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seq`` tokens, shape [windows, seq]."""
    available = ids.numel() // seq
    n = available if windows is None else windows
    if n > available or n < 1:
        raise QCompileError(f"asked for {n} windows of {seq} tokens; the text holds {available}")
    return ids[: n * seq].view(n, seq)


def calibration_windows(ids: torch.Tensor, count: int, seq: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``seq`` tokens at seeded random offsets (GPTQ's sampling), shape [count, seq]."""
    if ids.numel() <= seq:
        raise QCompileError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq, (count,), generator=g)
    return torch.stack([ids[s : s + seq] for s in starts.tolist()])
