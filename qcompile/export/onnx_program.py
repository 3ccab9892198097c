"""ONNX out: write a lowered ONNX Program (``Program.from_onnx`` → recipe → ``lower``) as a folder.

    OUT/model.onnx (+ model.onnx.data)  the source graph with its linears replaced by INT4 ops
    OUT/tokenizer.json, ...             the tokenizer, where one was given

The file is the one ``export/onnx.py`` writes for a PyTorch source, as far as the source allows: the same
ONNX Runtime ops for the quantized linears (``kernels/ort``'s translations: ``MatMulNBits``, per-token int8
and ``MatMulInteger``, Hadamards as reshapes and small matmuls: the online ops' functions are inlined here),
weights as external data, the recipe and source in ``metadata_props``. The source's signature is kept:
``input_ids → logits`` for a graph exported without a KV cache (no ``genai_config.json``: onnxruntime-genai
decodes with a cache), or onnxruntime-genai's decoder step with its cache, its names, its fused
``SkipSimplifiedLayerNormalization`` ops and the files beside it (``genai_config.json``, tokenizer) copied
(``graph/onnx_genai``), which ``og.Model(OUT)`` runs. ``qcompile eval OUT`` scores either.

As the export does, everything is checked before anything is written (a linear the lowering left in float
is refused with its name, an existing OUT without ``force``), and the folder is written under a temporary
name next to OUT, renamed once ``onnx.checker`` has passed.
"""

from __future__ import annotations

from pathlib import Path

import qcompile
from qcompile.errors import ExportError
from qcompile.export.onnx import META_MODEL, META_NOTES, META_RECIPE, META_VERSION, _lower_skips, write_folder
from qcompile.export.onnx_rewrites import quantize_vocab_tables, tie_lm_head
from qcompile.graph.onnx_genai import copy_companions, fuse_skip_norms


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
    model_ir = program.graph.clone().model
    InlinePass()(model_ir)  # the qcompile online ops become their ONNX bodies
    RemoveUnusedNodesPass()(model_ir)
    model_ir.opset_imports.pop("qcompile", None)
    cache, fill, check = getattr(program.graph, "cache", None), None, None
    if cache is None:
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
    if cache is not None:
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
