"""Launch plans (``triton/plans.py``) on the CPU: a plan must launch exactly what the generic path
launches for the same call (same kernels, grids, constexprs and every argument but the freshly
allocated outputs), and must refuse calls it was not built for. Compiled kernels do not exist here, so
each launch of the generic path is recorded and stands in the launch cache as a fake compiled kernel
that records the plan's launches too; the GPU check (``benchmarks/kernels.py --overhead``) compares
the planned outputs with the generic ones."""

import pytest
import torch

from qcompile.kernels.triton import launch as launch_mod
from qcompile.kernels.triton import mma_gemv, plans, rotate_quant, w4a16, w4ax


class FakeKernel:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, object(), object()

    def run(self, gx, gy, gz, stream, function, md, meta, enter, leave, *values):
        self.log.append(("plan", (gx, gy, gz), values))


@pytest.fixture
def recorder(monkeypatch):
    """Every ``launch`` of the kernel modules recorded as ("generic", grid, values) and cached as a fake
    compiled kernel under launch's own key."""
    log = []

    def fake_launch(fn, grid, args, consts, num_warps, num_stages=None):
        values, spec = launch_mod._spec(args)
        key = (fn, *consts.items(), num_warps, num_stages, *spec)
        tail = tuple(consts[name] for name in fn.arg_names[len(args):])
        launch_mod._compiled.setdefault(key, (FakeKernel(log), tail))
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        log.append(("generic", grid3, (*values, *tail)))

    for mod in (w4a16, mma_gemv, rotate_quant):
        monkeypatch.setattr(mod, "launch", fake_launch)
    monkeypatch.setattr(launch_mod, "_compiled", {})
    monkeypatch.setattr(launch_mod, "_current", [lambda device: 7, lambda: 0])
    monkeypatch.setattr(plans, "_linear", {})
    monkeypatch.setattr(plans, "_quant", {})
    return log


def _weight(n, k, g, asym, gen):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02).half()
    zeros = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, generator=gen) if asym else None
    return packed, scales, zeros


def _same_launches(log, outputs):
    """The plan's launches equal the generic ones except at the output positions ``outputs`` (one set of
    argument indices per launch)."""
    generic = [e for e in log if e[0] == "generic"]
    planned = [e for e in log if e[0] == "plan"]
    assert len(planned) == len(generic) > 0
    for (_, g1, v1), (_, g2, v2), out in zip(generic, planned, outputs):
        assert g1 == g2 and len(v1) == len(v2)
        assert [a for i, a in enumerate(v1) if i not in out] == [a for i, a in enumerate(v2) if i not in out]


W4A16_CANDS = [c for c in w4a16.candidates(1, 48, 256, 128, asm=True, x_dtype=torch.bfloat16)
               if c.meta["kind"] in ("gemv", "mma_gemv")]


@pytest.mark.parametrize("cand", W4A16_CANDS, ids=lambda c: c.name)
@pytest.mark.parametrize("asym,has_bias,lead", [(False, False, (1,)), (True, True, (1, 1))])
def test_w4a16_plan_launches_what_the_generic_path_launches(recorder, cand, asym, has_bias, lead):
    gen = torch.Generator().manual_seed(0)
    packed, scales, zeros = _weight(48, 256, 128, asym, gen)
    bias = torch.randn(48, generator=gen).bfloat16() if has_bias else None
    x = torch.randn(*lead, 256, generator=gen).bfloat16()
    w4a16.run(cand, x.reshape(-1, 256), packed, scales, zeros, 128, bias)
    key = plans.w4a16_key(x, packed, 128)
    plans.build_w4a16(key, cand, x, packed, scales, zeros, 128, bias)
    y = plans.call_w4a16(x, packed, scales, zeros, 128, bias)
    assert y is not None and y.shape == (*lead, 48)
    assert y.dtype == torch.bfloat16
    prep = cand.meta["kind"] == "gemv" and not cand.meta["FUSED"]
    _same_launches(recorder, [{1}, {0, 5}] if prep else [{5}])
    # calls the plan was not built for take the generic path
    assert plans.call_w4a16(x, packed, scales.clone(), zeros, 128, bias) is None
    assert plans.call_w4a16(x.float(), packed, scales, zeros, 128, bias) is None
    assert plans.call_w4a16(torch.randn(2, 256).bfloat16(), packed, scales, zeros, 128, bias) is None
    off = torch.randn(257).bfloat16()[1:].reshape(x.shape)  # 2 bytes off the allocation's alignment
    assert plans.call_w4a16(off, packed, scales, zeros, 128, bias) is None
    packed[0, 0] ^= 1  # an in-place write bumps the version: stale addresses or layouts
    assert plans.call_w4a16(x, packed, scales, zeros, 128, bias) is None


@pytest.mark.parametrize("cand", [c for c in W4A16_CANDS if c.meta["kind"] == "mma_gemv" and c.meta["SLABS"] == 4][:1]
                         + [c for c in W4A16_CANDS if c.meta["kind"] == "gemv" and c.meta["FUSED"]][:1],
                         ids=lambda c: c.name)
def test_w4a16_plan_with_a_row_scale(recorder, cand):
    """A plan built with a row scale passes each call's row scale (its address is the only other argument that
    changes) and refuses one it cannot pass as is; a plan without one never serves a call with one."""
    gen = torch.Generator().manual_seed(3)
    packed, scales, zeros = _weight(48, 256, 128, False, gen)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    r = torch.rand(1, 1, generator=gen)
    assert plans.call_w4a16(x, packed, scales, zeros, 128, None, r) is None
    w4a16.run(cand, x, packed, scales, zeros, 128, None, r.reshape(-1))
    plans.build_w4a16(plans.w4a16_key(x, packed, 128, r), cand, x, packed, scales, zeros, 128, None, r.reshape(-1))
    r2 = torch.rand(1, 1, generator=gen)
    assert plans.call_w4a16(x, packed, scales, zeros, 128, None, r2) is not None
    generic, planned = [e for e in recorder if e[0] == "generic"], [e for e in recorder if e[0] == "plan"]
    assert len(generic) == len(planned) == 1
    v1, v2 = generic[0][2], planned[0][2]
    assert v2[6] == r2.data_ptr() and v1[6] == r.data_ptr()
    assert [a for i, a in enumerate(v1) if i not in (5, 6)] == [a for i, a in enumerate(v2) if i not in (5, 6)]
    assert plans.call_w4a16(x, packed, scales, zeros, 128, None, r2.double()) is None
    assert plans.call_w4a16(x, packed, scales, zeros, 128, None, torch.rand(2, 1)) is None
    assert plans.call_w4a16(x, packed, scales, zeros, 128, None) is None  # no plan without a row scale yet


def test_plans_are_dropped_with_their_weight(recorder):
    gen = torch.Generator().manual_seed(1)
    packed, scales, zeros = _weight(16, 128, 128, False, gen)
    x = torch.randn(1, 128, generator=gen).bfloat16()
    cand = next(c for c in W4A16_CANDS if c.meta["kind"] == "gemv")
    w4a16.run(cand, x, packed, scales, zeros, 128, None)
    plans.build_w4a16(plans.w4a16_key(x, packed, 128), cand, x, packed, scales, zeros, 128, None)
    assert len(plans._linear) == 1
    del packed
    assert len(plans._linear) == 0


def test_codes_plan_launches_what_the_generic_path_launches(recorder):
    gen = torch.Generator().manual_seed(2)
    packed, scales, zeros = _weight(40, 256, 256, True, gen)
    codes = torch.randint(-8, 8, (1, 256), dtype=torch.int8, generator=gen)
    sa = torch.rand(1, 1, generator=gen)
    za = torch.randint(-3, 3, (1, 1), dtype=torch.int8, generator=gen)
    cand = next(c for c in w4ax.candidates(1, 40, 256, 256) if c.meta.get("kind") == "codes_gemv")
    w4a16.gemv_codes(cand.meta, codes, sa.reshape(-1), za.reshape(-1), packed, scales, zeros, 256, None,
                     torch.bfloat16)
    key = plans.w4ax_key(codes, sa, za, packed, 256, torch.bfloat16, 4)
    plans.build_w4ax(key, cand, codes, sa, za, packed, scales, zeros, 256, None, torch.bfloat16)
    y = plans.call_w4ax(codes, sa, za, packed, scales, zeros, 256, None, torch.bfloat16, 4)
    assert y is not None and y.shape == (1, 40) and y.dtype == torch.bfloat16
    _same_launches(recorder, [{7}])  # one launch: (codes, sa, za, weight…, y, ints…)
    assert plans.call_w4ax(codes, sa, None, packed, scales, zeros, 256, None, torch.bfloat16, 4) is None
    assert plans.call_w4ax(codes, sa, za, packed, scales, zeros, 256, None, torch.bfloat16, 8) is None


def test_quantize_plan_launches_what_the_generic_path_launches(recorder, monkeypatch):
    x = torch.randn(1, 1, 512).bfloat16()
    x2 = x.reshape(1, 512)
    cand = rotate_quant.Candidate("r1_w4", dict(ROWS=1, num_warps=4))
    monkeypatch.setattr(rotate_quant, "chosen_candidate", lambda *a: cand)
    codes = torch.empty(1, 512, dtype=torch.int8)
    s, z = torch.empty(1), torch.empty(1, dtype=torch.int8)
    rotate_quant._launch(cand, x2, codes, s, z, None, 512, 512, True, 8, True, 1.0, 2)
    key = plans.quant_key(x, 8, True, 1.0, False, 0)
    plans.build_quant(key, x, 8, True, 1.0, None)
    out = plans.call_quantize(x, 8, True, 1.0, False, 0)
    assert out is not None
    assert [t.shape for t in out] == [(1, 1, 512), (1, 1, 1), (1, 1, 1)]
    assert [t.dtype for t in out] == [torch.int8, torch.float32, torch.int8]
    # codes, scales, zeros are fresh; the unused factor slots point at the build call's scales
    _same_launches(recorder, [{1, 2, 3, 4, 5, 6}])
    assert plans.call_quantize(x, 4, True, 1.0, False, 0) is None


class Launcher36:
    """The shape of Triton 3.6's ``CudaLauncher``: ``__call__`` allocates scratch, then calls ``launch``."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self):
        self.calls = []
        self.launch = lambda *a: self.calls.append(("c", a))

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        global_scratch = profile_scratch = None
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    global_scratch, profile_scratch, *args)


class LauncherOther(Launcher36):
    """Another argument order (as Triton 3.9's): never called directly."""

    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, *args):
        self.calls.append(("py", (gridX, gridY, gridZ, stream, function, kernel_metadata, *args)))


def _kernel(launcher):
    k = FakeKernel([])
    k.run = launcher
    return k


def test_bound_calls_a_36_launcher_directly_in_its_argument_order(monkeypatch):
    monkeypatch.setattr(launch_mod, "_current", [lambda device: 7, lambda: 0])
    k = _kernel(Launcher36())
    b = launch_mod.Bound(k, (3, 2), (64, True))
    b(11, 12)
    (kind, args), = k.run.calls
    assert kind == "c"
    assert args == (3, 2, 1, 7, k.function, False, True, None, None, k.packed_metadata, None, None, None, 11, 12,
                    64, True)
    # the same call through the launcher's own __call__ gives the same C call
    k.run.calls.clear()
    k.run(3, 2, 1, 7, k.function, k.packed_metadata, None, None, None, 11, 12, 64, True)
    assert k.run.calls == [("c", args)]


def test_bound_takes_the_public_call_otherwise(monkeypatch):
    monkeypatch.setattr(launch_mod, "_current", [lambda device: 7, lambda: 0])
    other = _kernel(LauncherOther())
    launch_mod.Bound(other, (5,), ())(1)
    assert [c[0] for c in other.run.calls] == ["py"]
    scratch = Launcher36()
    scratch.global_scratch_size = 128  # needs scratch memory: only its __call__ allocates it
    k = _kernel(scratch)
    assert not launch_mod._direct(scratch) and launch_mod._direct(Launcher36())
    assert launch_mod.Bound(k, (5,), ()).c_launch is None  # its __call__ allocates the scratch memory


def test_dynamic_plan_launches_what_the_generic_path_launches(recorder):
    """``linear_w4ax_dynamic`` at one token: the plan launches the GEMV that quantizes x itself, with the
    generic path's arguments (x, weight…, y, ints…, clip) but the output."""
    gen = torch.Generator().manual_seed(3)
    packed, scales, zeros = _weight(40, 256, 128, True, gen)
    x = torch.randn(1, 1, 256, generator=gen).bfloat16()
    cand = w4a16.act_candidates()[1]
    w4a16.gemv_act(cand.meta, x.reshape(1, -1), 4, False, 0.9, packed, scales, zeros, 128, None, torch.bfloat16)
    key = plans.dynamic_key(x, 4, False, 0.9, packed, 128, torch.bfloat16)
    plans.build_dynamic(key, cand, x, 4, False, 0.9, packed, scales, zeros, 128, None, torch.bfloat16)
    y = plans.call_dynamic(x, 4, False, 0.9, packed, scales, zeros, 128, None, torch.bfloat16)
    assert y is not None and y.shape == (1, 1, 40) and y.dtype == torch.bfloat16
    _same_launches(recorder, [{5}])  # one launch
    assert plans.call_dynamic(x, 4, True, 0.9, packed, scales, zeros, 128, None, torch.bfloat16) is None
    assert plans.call_dynamic(x, 4, False, 1.0, packed, scales, zeros, 128, None, torch.bfloat16) is None
    assert plans.call_dynamic(x, 4, False, 0.9, packed, scales, None, 128, None, torch.bfloat16) is None
