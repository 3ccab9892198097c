"""Launch the two M = 1 W4A16 GEMVs once each at 28672×8192 (for ``ncu``: the word GEMV and the
tensor-core GEMV, their best configurations from ``kernels.py --gemv-variants``).

    ncu --clock-control none -k regex:gemv --section SpeedOfLight --section WarpStateStats \\
        python3 benchmarks/gemv_profile.py
"""

import torch

from qcompile.kernels.autotune import Candidate
from qcompile.kernels.triton import w4a16

N, K = 28672, 8192
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
scales = (torch.rand(N, K // 128, device="cuda") * 0.02).half()
for cand in (Candidate("gemv", dict(kind="gemv", BLOCK_N=8, BW=256, FUSED=True, ASM=True, num_warps=2)),
             Candidate("mma", dict(kind="mma_gemv", WARPS=1, SLABS=2, SPLIT_K=1))):
    for _ in range(3):
        w4a16.run(cand, x, packed, scales, None, 128, None)
torch.cuda.synchronize()
