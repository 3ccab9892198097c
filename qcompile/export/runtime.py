"""An exported ONNX folder run by onnxruntime: ``logits(ids)`` for perplexity and a decoder for ``generate``.

``OrtModel(OUT)`` opens ``OUT/model.onnx`` once (CPU, ``threads`` intra-op threads) and checks that it is a
qcompile decoder step: inputs ``input_ids`` and ``past_key_values.{i}.key/value``, outputs ``logits`` and
``present.{i}.key/value``, or a scoring graph ``input_ids → logits`` that qcompile wrote from an ONNX source
(``export/onnx_program``; ``cached`` is False: it decodes by recomputation only). A corrupt file or a foreign
graph is refused with the file's name.

- ``logits(ids)``: the step with an empty cache (P = 0), i.e. full-sequence scoring;
- ``empty_cache(batch)`` / ``step(ids, cache) -> (logits, cache)``: the decoder protocol of
  ``qcompile.decoding``, the cache a list of numpy arrays ``[key_0, value_0, …]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qcompile.errors import ExportError
from qcompile.export.onnx import GENAI_CONFIG, META_MODEL, META_RECIPE, MODEL_FILE


@dataclass
class OrtModel:
    """An onnxruntime session over an exported folder (see the module docstring)."""

    path: Path
    threads: int | None = None
    session: object = field(init=False, repr=False)
    metadata: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.path = Path(self.path)
        f = self.path / MODEL_FILE if self.path.is_dir() else self.path
        if not f.is_file():
            raise ExportError(f"{f} does not exist: not an exported ONNX folder")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"onnxruntime cannot load {f}: {first}. Is it a complete file written by "
                              "`qcompile export`?") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        ins = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        # onnxruntime-genai's builder adds attention_mask and lists the keys before the values (a genai source
        # quantized as ONNX keeps that signature): inputs and outputs are matched by name, in any order
        self.masked = "attention_mask" in ins
        self.layers = (len(ins) - 1 - self.masked) // 2
        self.past = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        self.present = [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        self.cached = self.layers > 0  # a source graph quantized as ONNX (export/onnx_program) scores only
        if not self.cached and ins == ["input_ids"] and outs[:1] == ["logits"] and META_MODEL in self.metadata:
            self.kv_heads, self.head_dim = [], 0
            return
        if sorted(ins) != sorted(["input_ids"] + ["attention_mask"] * self.masked + self.past) or \
                sorted(outs) != sorted(["logits"] + self.present) or META_MODEL not in self.metadata:
            raise ExportError(f"{f} is not a qcompile decoder export: inputs {ins[:3]}…, outputs {outs[:3]}…, "
                              f"metadata keys {sorted(self.metadata)[:4]}")
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.kv_heads = [int(shapes[n][1]) for n in self.past[0::2]]
        self.head_dim = next((d for d in (shapes[self.past[0]][3], self._head_dim(f)) if isinstance(d, int)), 0)

    @property
    def model(self) -> str:
        return self.metadata[META_MODEL]

    def recipe(self):
        """The recipe recorded in the model's metadata (``fp`` when none)."""
        import yaml

        from qcompile.recipe import Recipe

        text = self.metadata.get(META_RECIPE)
        return Recipe(name="fp") if text is None else Recipe.from_dict(yaml.safe_load(text), where=str(self.path))

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, self.head_dim), dtype=np.float32) for h in self.kv_heads for _ in (0, 1)]

    def step(self, ids, cache: list[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Logits ``[B, S, V]`` of the S new tokens ``ids`` after the cached ones, and the longer cache."""
        if not self.cached and cache:
            raise ExportError(f"{self.path} has no KV cache; decode it by recomputing (--no-cache)")
        ids = np.asarray(ids, dtype=np.int64)
        feed = {"input_ids": ids} | dict(zip(self.past, cache))
        if self.masked:  # no padding: every cached and new position is attended
            feed["attention_mask"] = np.ones((ids.shape[0], (cache[0].shape[2] if cache else 0) + ids.shape[1]),
                                             dtype=np.int64)
        out = self.session.run(["logits"] + self.present, feed)
        return torch.from_numpy(out[0]), out[1:]

    def _head_dim(self, f: Path):
        """The head size from ``genai_config.json`` beside the model (the builder leaves the past's last axis
        symbolic)."""
        config = f.parent / GENAI_CONFIG
        return json.loads(config.read_text())["model"]["decoder"].get("head_size") if config.is_file() else None

    def logits(self, input_ids) -> torch.Tensor:
        """Full-sequence logits ``[B, S, V]`` (the step from an empty cache)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        return self.step(ids, self.empty_cache(ids.shape[0]))[0]


def tokenizer_of(path: str | Path):
    """The tokenizer saved in an exported folder (``transformers.AutoTokenizer``), or None."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(p))


def genai_generate(path: str | Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by onnxruntime-genai (``og.Model(path)``); returns the new ids."""
    import onnxruntime_genai as og

    p = Path(path)
    if not (p / GENAI_CONFIG).is_file():
        raise ExportError(f"{p} has no {GENAI_CONFIG}: not an exported ONNX folder")
    model = og.Model(str(p))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    out = []
    while not gen.is_done() and len(out) < max_new_tokens:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def genai_config(path: str | Path) -> dict:
    return json.loads((Path(path) / GENAI_CONFIG).read_text())
