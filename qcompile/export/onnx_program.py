"""ONNX out: write a lowered ONNX Program (``Program.from_onnx`` → recipe → ``lower``) as a folder.

    OUT/model.onnx (+ model.onnx.data)  the source graph with its linears replaced by INT4 ops
    OUT/tokenizer.json, ...             the tokenizer, where one was given

The file is the one ``export/onnx.py`` writes for a PyTorch source, as far as the source allows: the same
ONNX Runtime ops for the quantized linears (``kernels/ort``'s translations: ``MatMulNBits``, per-token int8
and ``MatMulInteger``, Hadamards as reshapes and small matmuls: the online ops' functions are inlined here),
weights as external data, the recipe and source in ``metadata_props``. Either way the file is onnxruntime-genai's
decoder step, which ``og.Model(OUT)`` runs and ``qcompile eval|generate OUT`` score and decode with the cache:

- a graph exported without a KV cache (``torch.onnx.export(dynamo=True)``'s ``input_ids → logits``) gets one
  (``passes/kv_cache.add_kv_cache``: ``graph/onnx_cache``'s edits at the matched attention ops, after everything
  the recipe inserted), genai's names, and a ``genai_config.json`` written by the PyTorch export's writer with
  ``past_present_share_buffer`` off (plain attention over the concatenated cache), the tokenizer when one is
  given, and the model's sizes from a ``config.json`` beside the source (else its tokenizer and the graph).
  Where the rewrite cannot prove the cache (no RoPE positions, a sliding window, …) the scoring graph
  ``input_ids → logits`` is written instead, with a warning and the reason in the metadata;
- onnxruntime-genai's own step keeps its cache, its names, its fused ``SkipSimplifiedLayerNormalization`` ops
  and the files beside it (``genai_config.json``, tokenizer) copied (``graph/onnx_genai``).

As the export does, everything is checked before anything is written (a linear the lowering left in float
is refused with its name, an existing OUT without ``force``), and the folder is written under a temporary
name next to OUT, renamed once ``onnx.checker`` has passed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import qcompile
from qcompile.errors import ExportError, UnsafeRewriteError
from qcompile.export.onnx import (GENAI_CONFIG, META_MODEL, META_NOTES, META_RECIPE, META_VERSION, MODEL_FILE,
                                  _genai_config, _lower_skips, write_folder)
from qcompile.export.onnx_rewrites import quantize_vocab_tables, tie_lm_head
from qcompile.graph.onnx_genai import copy_companions, fuse_skip_norms
from qcompile.passes.kv_cache import CacheLayout, add_kv_cache


def save_onnx_program(program, out: str | Path, recipe, model: str, tokenizer=None, force: bool = False) -> Path:
    """Write ``program`` (a lowered ONNX Program) to the folder ``out`` (see the module docstring)."""
    from onnx_ir.passes.common import InlinePass, RemoveUnusedNodesPass

    if program.ir != "onnx":
        raise ExportError("save_onnx_program writes ONNX Programs; export a PyTorch one with export_onnx")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; choose a new folder or pass --force to replace it")
    skips = _lower_skips([line for r in program.reports for line in r.lines()])
    if skips:
        site, _, reason = skips[0].partition(": ")
        raise ExportError(f"linear {site} was not lowered to an INT4 op ({reason}); the ONNX file would store it "
                          "in float and drop its quantization. Quantize with a uniform (affine) 4-bit recipe.")
    cache, fill, check, meta_notes = getattr(program.graph, "cache", None), None, None, None
    added = None
    if cache is None:
        try:
            added = add_kv_cache(program)
        except UnsafeRewriteError as e:
            meta_notes = f"no KV cache: {e}"
            warnings.warn(f"{program.graph.path}: writing the scoring graph input_ids → logits without a KV cache "
                          f"(onnxruntime-genai cannot run it): {e}", stacklevel=2)
    model_ir = added.graph.model if added is not None else program.graph.clone().model  # added: a copy
    InlinePass()(model_ir)  # the qcompile online ops become their ONNX bodies
    RemoveUnusedNodesPass()(model_ir)
    model_ir.opset_imports.pop("qcompile", None)
    if added is not None:  # the step the rewrite made: genai's config written, the tokenizer given saved
        meta_notes = "\n".join(added.reports[-1].lines())
        config = _genai_config(CacheLayout.of(added.model_map), _model_config(program.graph.path, tokenizer,
                                                                                model_ir), tokenizer, MODEL_FILE)
        config["search"]["past_present_share_buffer"] = False  # plain attention over Concat(past, new)

        def fill(tmp: Path) -> None:
            (tmp / GENAI_CONFIG).write_text(json.dumps(config, indent=1))

        check = ort_check
    elif cache is None:
        names = {o.name for n in model_ir.graph for o in n.outputs}
        for v, name in ((model_ir.graph.inputs[0], "input_ids"), (model_ir.graph.outputs[0], "logits")):
            if v.name != name and name not in names:  # the names qcompile's ONNX runtime reads
                v.name = name
    else:  # onnxruntime-genai's step: its names and its fused norms, its config and tokenizer files beside it
        fuse_skip_norms(model_ir)
        vocab = recipe.weights.vocab_bits if recipe is not None and recipe.weights is not None else None
        # as the export does: 4/8-bit tables as GatherBlockQuantized + MatMulNBits, or one float table stored
        meta_notes = quantize_vocab_tables(model_ir, vocab) if vocab else tie_lm_head(model_ir)
        source = Path(program.graph.path)

        def fill(tmp: Path) -> None:
            copy_companions(source.parent, tmp, source.name)

        tokenizer = None  # the builder's own tokenizer files are copied
        check = ort_check
    meta = {META_MODEL: model, META_VERSION: qcompile.__version__}
    if meta_notes is not None:
        meta[META_NOTES] = meta_notes
    if recipe is not None:
        meta[META_RECIPE] = recipe.to_yaml()
    model_ir.metadata_props.update(meta)
    model_ir.producer_name = "qcompile"
    return write_folder(out, model_ir, tokenizer, fill, check)


def ort_check(path: Path) -> None:
    """The written file loads in onnxruntime (``onnx.checker`` does not know the ``SimplifiedLayerNormalization``
    that onnxruntime registers in the default domain and the builder writes there)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"onnxruntime cannot load the written {path.name}: {first}") from None


def _model_config(source: str, tokenizer, model_ir):
    """What ``export/onnx._genai_config`` reads of a Hugging Face config, for a source without one in the graph:
    the ``config.json`` beside the source file when there is one, else the tokenizer's special tokens and
    longest input (a graph with RoPE computed on the fly has no position limit of its own; 2048 when the
    tokenizer does not say) and the logits' width."""
    path = Path(source).parent / "config.json"
    if path.is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path.parent))
    longest = getattr(tokenizer, "model_max_length", None)
    vocab = model_ir.graph.outputs[0].shape[-1] if model_ir.graph.outputs[0].shape is not None else None
    return SimpleNamespace(max_position_embeddings=longest if isinstance(longest, int) and longest < 10**6 else 2048,
                           eos_token_id=getattr(tokenizer, "eos_token_id", None) or 0,
                           bos_token_id=getattr(tokenizer, "bos_token_id", None),
                           vocab_size=vocab if isinstance(vocab, int) else 0)
