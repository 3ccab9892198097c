"""DuQuant reads only the first windows (its kept token rows), so it runs only those through the model (the same rows
as a run over every window, bit for bit on the CPU), and its independent searches run side by side on
single-threaded ops: the transforms are those of a run over every window, one search at a time, bit for bit."""

import torch

from qcompile.passes import duquant as dq
from qcompile.passes.calibrate import collect


def _calib(n, seq=16, seed=2):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_first_windows_cover_the_kept_tokens_and_no_more():
    c = _calib(16)
    assert dq._first_windows(c, tokens=16).shape[0] == 1  # one window of 16 tokens
    assert dq._first_windows(c, tokens=17).shape[0] == 2
    assert dq._first_windows(c, tokens=80).shape[0] == 5
    assert dq._first_windows(c, tokens=10_000).shape[0] == 16


def test_kept_rows_and_transforms_equal_a_run_over_every_window(tiny_programs, monkeypatch):
    _, program = tiny_programs["llama"]
    calib = _calib(12)
    watch = {n: 0 for n in program.model_map.linears}
    full = collect(program, calib, watch, batch=2, keep_tokens=40, progress=False, device=program.device)
    short = collect(program, dq._first_windows(calib, 40), watch, batch=2, keep_tokens=40, progress=False,
                    device=program.device)  # 3 windows: batches of 2 and 1, where the full run has 2 and 2
    assert all(torch.equal(full[n].kept(), short[n].kept()) for n in watch)
    # and the pass reads nothing from the later windows: replacing them changes no weight
    other = torch.cat([calib[:4], _calib(8, seed=9)])
    seen = []
    real = dq.collect
    monkeypatch.setattr(dq, "collect", lambda p, w, *a, **k: seen.append(w.shape[0]) or real(p, w, *a, **k))
    a = dq.duquant(program, calibration=calib, block=32, steps=4, tokens=40, batch=2)
    b = dq.duquant(program, calibration=other, block=32, steps=4, tokens=40, batch=2)
    assert seen == [3, 3]
    assert all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))


def test_searches_side_by_side_equal_one_at_a_time(tiny_programs):
    _, program = tiny_programs["llama"]
    calib = _calib(4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dq.duquant(program, calibration=calib, block=32, steps=16, tokens=48, batch=2)
        torch.set_num_threads(2)
        two = dq.duquant(program, calibration=calib, block=32, steps=16, tokens=48, batch=2)
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(before)
    assert one.reports[-1].counts == two.reports[-1].counts
    assert all(torch.equal(x, y) for x, y in zip(one.module.state_dict().values(), two.module.state_dict().values()))
