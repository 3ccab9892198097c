"""DuQuant's greedy search, sped up (a bf16 or float32 scan with an exact float64 recheck, cached bases), takes the
same path as the plain search that multiplies every row in float64 at every step."""

import pytest
import torch

from qcompile.quant import duquant
from qcompile.quant.duquant import _PeakFinder, block_matmul, blocks_of, greedy_bases, greedy_rotation, step_for_channel


def _rows(n=3000, b=32, seed=0, massive=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b, generator=g, dtype=torch.float64)
    x[:, 3] *= 40  # an outlier channel
    if massive:
        x[:5] *= 30  # a few massive tokens
    top = int(x.norm(dim=1).argmax())
    x[n // 2] = x[top]  # two equal largest rows: the peak often ties between them (the smallest flat index wins)
    return x


def _plain_greedy(x, steps, seed, index="channel"):
    """The search as the paper states it: X·R in float64 for every row, argmax's first position."""
    b = x.shape[1]
    r = torch.eye(b, dtype=torch.float64)
    bases = greedy_bases(b, steps, seed)
    peaks, best, best_r = [], None, r
    for i in range(steps + 1):
        mag = (x @ r).abs()
        peaks.append(float(mag.max()))
        if best is None or peaks[-1] < best[0]:
            best, best_r = (peaks[-1], i), r.clone()
        if i == steps:
            break
        flat = int(torch.argmax(mag))
        d = flat % b if index == "channel" else (flat // b) % b
        r = r @ step_for_channel(bases[i], d)
    return best_r, best[1], peaks


@pytest.mark.parametrize("bf16", [True, False])
def test_peak_and_position_equal_the_float64_product(bf16, monkeypatch):
    """Whichever precision scans (bf16 where the CPU has it, else float32), the recheck gives float64's answer."""
    monkeypatch.setattr(duquant, "_BF16", bf16)
    for massive in (True, False):
        x = _rows(massive=massive)
        find = _PeakFinder(x, head=64)
        for s in range(6):
            r = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(s)))[0]
            for m in (r, torch.eye(32, dtype=torch.float64)):  # the identity: exact ties along equal rows
                mag = (x @ m).abs()
                peak, flat = find(m)
                assert flat == int(torch.argmax(mag)) and abs(peak - float(mag.max())) <= 1e-12 * peak


def test_greedy_takes_the_plain_search_path():
    for massive, index in ((True, "channel"), (False, "channel"), (False, "row")):
        x = _rows(n=1500, massive=massive, seed=1)
        res = greedy_rotation(x, steps=48, seed=5, index=index)
        r, kept, peaks = _plain_greedy(x, 48, 5, index)
        assert res.steps == kept and torch.equal(res.rotation, r), (massive, index)
        assert torch.allclose(torch.tensor(res.peaks), torch.tensor(peaks), rtol=1e-12, atol=0)


def test_bases_are_cached_per_seed_and_read_only_use_keeps_them():
    a = greedy_bases(16, 8, 123)
    before = a.clone()
    greedy_rotation(_rows(n=200, b=16), steps=8, seed=123)
    assert greedy_bases(16, 8, 123) is a and torch.equal(a, before)
    assert not torch.equal(greedy_bases(16, 8, 124), a)


def test_block_matmul_is_the_dense_product():
    g = torch.Generator().manual_seed(3)
    for c, b in ((96, 32), (100, 32), (20, 32)):  # full blocks, a partial last block, one block narrower than b
        m = torch.block_diag(*[torch.randn(e - s, e - s, generator=g, dtype=torch.float64) for s, e in blocks_of(c, b)])
        x = torch.randn(2, 7, c, generator=g, dtype=torch.float64)
        assert torch.allclose(block_matmul(x, m, b), x @ m, rtol=0, atol=1e-12)
