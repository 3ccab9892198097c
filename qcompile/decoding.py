"""Text generation: one decoding loop over any *decoder*, greedy or sampled.

A decoder is anything with ``empty_cache(batch)`` and ``step(ids, cache) -> (logits, cache)``: the
logits ``[B, S, V]`` of the ``S`` new tokens given everything the cache has seen. Two live here:

- ``CachedDecoder``: a graph made by the ``kv_cache`` pass (a captured, compiled or loaded model),
  one forward per new token; ``StaticCachedDecoder`` the same over a preallocated cache that a
  ``StaticKVStep`` owns (one shape per step, for CUDA graphs);
- ``Recompute``: any ``logits(ids)`` function, the whole sequence again at every step (the reference
  the cache must agree with, and the path for models without a cache).

The ONNX Runtime folder (``qcompile.export``) provides a third with the same two methods, so the
command line's ``generate`` is one loop for every kind of model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from qcompile.errors import QCompileError
from qcompile.passes.kv_cache import CacheLayout


class Decoder(Protocol):
    def empty_cache(self, batch: int): ...

    def step(self, ids: torch.Tensor, cache) -> tuple[torch.Tensor, object]: ...


@dataclass
class CachedDecoder:
    """A decoder-step module ``(input_ids, past_key_0, past_value_0, …) → (logits, present_key_0, …)``."""

    module: Callable
    layout: CacheLayout
    dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        return self.layout.empty(batch, self.dtype, self.device)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, cache: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.module(ids, *cache)
        return out[0], list(out[1:])


class StaticKVStep(torch.nn.Module):
    """A ``kv_cache(static=True)`` step that owns its cache: ``forward(input_ids, cache_position) → logits``.

    The cache tensors are buffers (``batch × max_len`` slots per layer, zeroed), so their addresses never
    change: compiled with CUDA graphs (``mode="reduce-overhead"``), every decode step is one replay, the
    in-place cache writes included."""

    def __init__(self, step: Callable, layout: CacheLayout, batch: int, max_len: int, dtype=torch.float32,
                 device=None):
        super().__init__()
        self.step, self.max_len, self.batch = step, max_len, batch
        self.names = [f"cache_{i}" for i in range(2 * layout.layers)]
        for name, t in zip(self.names, layout.empty(batch, dtype, device, max_len)):
            self.register_buffer(name, t, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.step(input_ids, cache_position, *(getattr(self, n) for n in self.names))[0]


@dataclass
class StaticCachedDecoder:
    """Decodes with a ``StaticKVStep`` (or its compiled form): the cache is the number of tokens seen."""

    module: Callable
    max_len: int
    batch: int = 1

    def empty_cache(self, batch: int) -> int:
        if batch != self.batch:
            raise QCompileError(f"this static cache was made for batch {self.batch}, not {batch}")
        return 0

    @torch.no_grad()
    def step(self, ids: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
        if seen + ids.shape[1] > self.max_len:
            raise QCompileError(f"the static cache holds {self.max_len} tokens; {seen + ids.shape[1]} asked for")
        position = torch.arange(seen, seen + ids.shape[1], device=ids.device)
        return self.module(ids, position), seen + ids.shape[1]


@dataclass
class Recompute:
    """No cache: the cache is the sequence so far, and each step scores all of it again."""

    logits: Callable[[torch.Tensor], torch.Tensor]

    def empty_cache(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 0, dtype=torch.long)

    def step(self, ids: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen = torch.cat([cache.to(ids.device), ids], dim=1)
        return self.logits(seen)[:, -ids.shape[1]:], seen


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; else softmax(logits / T) restricted to the top-k and the top-p mass."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise QCompileError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise QCompileError(f"top_k must be ≥ 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise QCompileError(f"top_p must be in (0, 1], got {self.top_p}")

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Next token per row of ``logits [B, V]``."""
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None:
            ordered, order = logits.sort(dim=-1, descending=True)
            mass = ordered.softmax(-1).cumsum(-1)
            drop = mass - ordered.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def generate(decoder: Decoder, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
             sampling: Sampling = Sampling(), progress: bool = False) -> torch.Tensor:
    """``prompt [B, S]`` followed by up to ``max_new_tokens`` tokens (stopping early once every row has
    produced ``eos_token_id``; rows that finished repeat it)."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise QCompileError(f"the prompt must be token ids [batch, length ≥ 1], got shape {tuple(prompt.shape)}")
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = decoder.empty_cache(prompt.shape[0])
    out, new = prompt, prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in tqdm(range(max_new_tokens), desc="generate", unit="token", disable=not progress):
        logits, cache = decoder.step(new, cache)
        token = sampling.pick(logits[:, -1], generator).to(prompt.device)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        new = token[:, None]
        out = torch.cat([out, new], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return out
