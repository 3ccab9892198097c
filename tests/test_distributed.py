"""Block-by-block GPTQ shared out among two processes (gloo on the CPU) equals the one-process result.

Both ranks are spawned by ``torch.multiprocessing`` and join a gloo group (meeting through a file); each writes
what it got (or the error it raised) to a file that the test reads back.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qcompile.errors import CalibrationError
from qcompile.models import tiny
from qcompile.passes.distributed import Ranks, RankError
from qcompile.passes.quantize import quantize
from qcompile.pipeline import run_passes
from qcompile.program import Program
from qcompile.recipe import load_recipe

WORLD = 2


def _calib(n=7, seq=48, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _rotated(model, recipe, calib) -> Program:
    return run_passes(Program.capture(model), recipe, calib)


def _worker(rank, init, model, recipe, calib, out, runs, fail_rank=None, solve_block=None):
    torch.set_num_threads(1)
    if solve_block:  # the reversed factor's solves in several column blocks, so that both ranks solve some
        import qcompile.quant.gptq as gptq

        gptq._SOLVE_BLOCK = solve_block
    if rank == fail_rank:  # this rank's GPTQ breaks (not a qcompile error)
        import qcompile.passes.quantize as qz

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        qz._quantize_weight = broken
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    ranks = Ranks.current()
    got = []
    try:
        program = _rotated(model, recipe, calib)  # a Program does not pickle: each rank captures the model
        for _ in range(runs):
            q = quantize(program, recipe, calib, progress=False, batch=2, ranks=ranks)
            got.append({k: (qw.codes, qw.weight, qw.scales, qw.zeros) for k, qw in q.quantized.items()})
        torch.save({"ok": got, "report": q.reports[-1].notes["execution"]}, f"{out}/{rank}.pt")
    except Exception as e:  # noqa: BLE001  (the test checks which error every rank raised)
        torch.save({"error": (type(e).__name__, str(e))}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, model, recipe, calib, runs=1, fail_rank=None, solve_block=None) -> list[dict]:
    # the ranks meet through a file of the test's own, not a TCP port: a port picked free here could be taken by
    # another process before rank 0 listens on it (seen once under load)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(init, model, recipe, calib, str(tmp_path), runs, fail_rank, solve_block), nprocs=WORLD,
             join=True)
    return [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(WORLD)]


RECIPE = load_recipe("quarot+gptq").with_bits(group=32)


@pytest.mark.parametrize("factor", ["inverse", "reversed"])
def test_two_ranks_match_one_process(tmp_path, monkeypatch, factor):
    """``reversed`` (the CUDA default) shares each factor's triangular solves between the ranks."""
    monkeypatch.setenv("QCOMPILE_GPTQ_FACTOR", factor)  # the spawned ranks inherit it
    model, recipe = tiny("llama"), RECIPE
    calib = _calib()  # 7 windows in batches of 2: rank 0 carries 2 batches (4 windows), rank 1 two (3)
    one = quantize(_rotated(model, recipe, calib), recipe, calib, progress=False, device="cpu", batch=2)
    ranks = _spawn(tmp_path, model, recipe, calib, runs=2, solve_block=16)
    assert all("ok" in r for r in ranks), [r.get("error") for r in ranks]
    assert "shared out among 2 ranks" in ranks[0]["report"]
    first = ranks[0]["ok"][0]
    assert set(first) == set(one.quantized) and len(first) == 14
    for r in ranks:  # every rank holds every weight, bit for bit, and a second run gives the same
        for run in r["ok"]:
            for k, fields in run.items():
                assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(fields, first[k])), k
    codes = same = 0
    for k, qw in one.quantized.items():
        c, w = first[k][0], first[k][1]
        codes += c.numel()
        same += int((c == qw.codes).sum())
        # the Hessians differ only in the order the per-rank sums are added: the weights agree to rounding,
        # except where a code flips on a near-tie (one grid step at most)
        step = qw.scales.abs().max()
        assert (w - qw.weight).abs().max() <= step + 1e-6, k
    assert same / codes > 0.999, same / codes


def test_nan_in_one_ranks_windows_stops_every_rank_naming_the_layer(tmp_path):
    model = tiny("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[255] = float("nan")  # only windows holding token 255 see NaN
    calib = _calib().clamp(max=254)
    calib[6, 5] = 255  # window 6 is in rank 1's share only
    ranks = _spawn(tmp_path, model, load_recipe("gptq").with_bits(group=32), calib)
    for r in ranks:
        name, message = r["error"]
        assert name == CalibrationError.__name__, r
        assert "rank 1 of 2" in message and "NaN/inf" in message and "layer 'model.layers.0." in message, message


@pytest.mark.parametrize("factor", ["inverse", "reversed"])
def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path, monkeypatch, factor):
    """With ``reversed`` rank 0 is inside the shared factor (a collective) when rank 1 fails: it stops there."""
    monkeypatch.setenv("QCOMPILE_GPTQ_FACTOR", factor)
    ranks = _spawn(tmp_path, tiny("llama"), load_recipe("gptq").with_bits(group=32), _calib(), fail_rank=1)
    for r in ranks:  # rank 0 does not wait forever for rank 1's weights: both raise rank 1's error
        name, message = r["error"]
        assert name == RankError.__name__, r
        assert message.startswith("rank 1 of 2 failed, quantizing block 0: RuntimeError: out of memory"), message


def test_deal_and_windows_cover_everything_once():
    costs = [5.0, 1.0, 1.0, 3.0]
    for world in (1, 2, 3):
        deals = [Ranks(r, world).deal(costs) for r in range(world)]
        assert all(d == deals[0] for d in deals)  # every rank computes the same deal
        assert set(deals[0]) <= set(range(world))
        calib = _calib(n=9)
        parts = [Ranks(r, world).windows(calib, 2) for r in range(world)]
        assert torch.equal(torch.cat(parts), calib)
        assert all(p.shape[0] % 2 == 0 for p in parts[:-1])  # whole batches of 2, as in one process
    assert Ranks(0, 2).deal(costs) == [0, 1, 1, 1]  # 5 | 3 + 1 + 1

