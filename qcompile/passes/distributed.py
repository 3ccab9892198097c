"""distributed: block-by-block GPTQ shared out among processes (``torch.distributed``, one process per device).

Launched as ``torchrun --nproc-per-node W script.py`` (NCCL on GPUs, gloo on CPUs), each process calls
``init_ranks()`` and hands the ``Ranks`` to ``quantize(..., device=ranks.device, ranks=ranks)``. With world
size W and rank r, ``passes.blockwise.quantize_blockwise`` splits the work three ways:

- **windows**: the calibration batches (of ``batch`` windows, cut as in one process) are dealt in W
  contiguous runs; rank r carries the activations of its run only, so the block forwards are split W ways
  and each batch sees exactly the values it sees in one process;
- **Hessians**: ``H = 2/n Σ_t x_t x_tᵀ`` is a sum over tokens, so each rank sums ``Σ x xᵀ`` and ``n`` over its
  own tokens and one all-reduce (SUM) of both gives every rank the one-process Hessian, up to the order in
  which the partial sums are added;
- **weights in**: on GPUs each rank copies its share of a block's weights from the host (dealt by bytes) and
  receives the others' over NCCL (``BlockRunner.load``), so the host-to-device copies are split too;
- **linears**: the linears of a stage (GPTQ's sequential group: they share the input, hence H) are dealt to
  ranks by cost (longest first, to the least loaded); each rank quantizes its share, then each owner
  broadcasts its ``QuantizedWeight`` and every rank stores every weight, so the next stage's forward is the
  same everywhere. The deal depends on shapes and W only: the result is deterministic for a seed and W.

Failures: every local step runs inside ``Ranks.step``: a rank whose step raises still reaches the step's end,
where all ranks agree (one all-reduce of a flag) and, if any failed, all raise the first failing rank's error
(same class for qcompile's errors, ``RankError`` otherwise) with its rank in the message, instead of the others
waiting forever in the next collective. NaN/inf in a rank's calibration thus stops every rank with the
``CalibrationError`` that names the layer. A process that dies outright is torchrun's to stop (it ends the
others when one exits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from qcompile.errors import QCompileError
from qcompile.quant.gptq import HessianAccumulator


class RankError(QCompileError):
    """A rank failed (with an error that is not qcompile's); raised on every rank, naming the failing one."""


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the group: ``rank`` of ``world``, computing on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: object = None  # the process group (None: the default one)

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> "Ranks":
        """The initialized default group's ranks; ``device`` defaults to ``cuda:LOCAL_RANK`` under NCCL."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(device=torch.device(device or "cpu"))
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if dist.get_backend() == "nccl" else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), torch.device(device))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def _comm(self) -> torch.device:
        """Where collectives take their tensors: the GPU under NCCL, the CPU under gloo."""
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    # --- the work split -------------------------------------------------------------------------------------
    def windows(self, calibration: torch.Tensor, batch: int) -> torch.Tensor:
        """This rank's windows: a contiguous run of whole batches of ``batch`` (the batches of one process)."""
        n = calibration.shape[0]
        batches = -(-n // batch)
        lo, hi = (batches * self.rank) // self.world, (batches * (self.rank + 1)) // self.world
        return calibration[lo * batch : min(hi * batch, n)]

    def deal(self, costs: list[float]) -> list[int]:
        """The owner rank of each item: longest first, each to the least loaded rank (ties: lower rank, then
        item order), so every rank computes the same deal."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner

    # --- collectives ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, what: str):
        """Run a local step; every rank must enter it. If any rank's step raised, all raise its error here."""
        error = None
        try:
            yield
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            if not self.distributed or getattr(e, "_agreed", False):  # agreed on already, at a checkpoint
                raise
            error = e
        if self.distributed:
            self.agree(error, what)

    def agree(self, error: BaseException | None, what: str) -> None:
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self._comm())
        dist.all_reduce(flag, group=self.group)
        if int(flag) == 0:
            return
        mine = None if error is None else (type(error).__name__, str(error), isinstance(error, QCompileError), what)
        every = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        rank, (name, message, ours, what) = next((r, e) for r, e in enumerate(every) if e is not None)  # its step
        text = f"rank {rank} of {self.world}, {what}: {message}"
        if error is not None and rank == self.rank and ours:
            agreed = type(error)(text)
        else:
            cls = next((c for c in _qcompile_errors() if c.__name__ == name), None) if ours else None
            agreed = cls(text) if cls is not None else RankError(
                f"rank {rank} of {self.world} failed, {what}: {name}: {message}")
        agreed._agreed = True  # every rank raises it now: the enclosing step must not agree on it again
        raise agreed from error

    def checkpoint(self, what: str) -> None:
        """Inside a step, before a collective: agree that no rank has failed so far. A rank whose step raised
        earlier agrees at its step's end, which meets this one, so every rank raises its error (here, or at the
        step's end) instead of the others waiting in the collective."""
        if self.distributed:
            self.agree(None, what)

    def all_reduce_(self, t: torch.Tensor) -> None:
        """The sum over ranks of ``t``, in place (``t`` on this rank's device)."""
        comm = self._comm()
        s = t if t.device == comm else t.to(comm)
        dist.all_reduce(s, group=self.group)
        if s is not t:
            t.copy_(s)

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        """Rank ``src``'s values of ``t`` into ``t`` on every rank (in place; ``t`` on the collectives' device)."""
        dist.broadcast(t, src=src, group=self.group)

    def broadcast_quantized(self, qw, src: int):
        """The ``QuantizedWeight`` (or any dataclass of tensors) of rank ``src``, on every rank, on the device."""
        comm = self._comm()
        if self.rank == src:
            fields = {f.name: getattr(qw, f.name) for f in dataclasses.fields(qw) if f.init}
            meta = [(type(qw), {k: (("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else
                                    ("value", v)) for k, v in fields.items()})]
        else:
            meta = [None]
        dist.broadcast_object_list(meta, src=src, group=self.group, device=comm)
        cls, layout = meta[0]
        out = {}
        for k, how in layout.items():
            if how[0] == "value":
                out[k] = how[1]
                continue
            if self.rank == src:
                t = getattr(qw, k).detach().contiguous().to(comm)
            else:
                t = torch.empty(how[1], dtype=how[2], device=comm)
            dist.broadcast(t, src=src, group=self.group)
            out[k] = t.to(self.device)
        return qw if self.rank == src else cls(**out)


def _qcompile_errors() -> list[type]:
    seen, todo = [], [QCompileError]
    while todo:
        c = todo.pop()
        seen.append(c)
        todo.extend(c.__subclasses__())
    return seen


class SummedHessian(HessianAccumulator):
    """A ``HessianAccumulator`` whose Σ x xᵀ and token count can be summed over ranks (all-reduce, SUM)."""

    def all_reduce(self, ranks: Ranks) -> None:
        if not ranks.distributed:
            return
        comm = ranks._comm()
        s = self._sum.to(comm)
        n = torch.tensor([self._n], dtype=torch.int64, device=comm)
        dist.all_reduce(s, group=ranks.group)
        dist.all_reduce(n, group=ranks.group)
        self._sum = s.to(self._sum.device)
        self._n = int(n)


SINGLE = Ranks()


def init_ranks(backend: str | None = None, timeout_min: float = 60) -> Ranks:
    """Join the group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment):
    NCCL with one GPU per process (``cuda:LOCAL_RANK``) where CUDA is, gloo on the CPU otherwise. NVLink
    multicast stays off unless the environment already says otherwise."""
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
        os.environ.setdefault(k, v)
    if "WORLD_SIZE" not in os.environ:
        return Ranks(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available() and backend in (None, "nccl")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if not dist.is_initialized():
        kw = {"device_id": device} if cuda else {}
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"),
                                timeout=datetime.timedelta(minutes=timeout_min), **kw)
    return Ranks.current(device)
