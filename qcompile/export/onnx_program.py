"""ONNX out: write a lowered ONNX Program (``Program.from_onnx`` → recipe → ``lower``) as a folder.

    OUT/model.onnx (+ model.onnx.data)  the source graph with its linears replaced by INT4 ops
    OUT/tokenizer.json, ...             the tokenizer, where one was given

The file is the one ``export/onnx.py`` writes for a PyTorch source, as far as the source allows: the same
ONNX Runtime ops for the quantized linears (``kernels/ort``'s translations: ``MatMulNBits``, per-token int8
and ``MatMulInteger``, Hadamards as reshapes and small matmuls: the online ops' functions are inlined here),
weights as external data, the recipe and source in ``metadata_props``. The source's signature is kept
(``input_ids → logits``, no KV cache: a graph exported without one has none to offer), so there is no
``genai_config.json``: onnxruntime-genai decodes with a cache. ``qcompile eval OUT`` scores it.

As the export does, everything is checked before anything is written (a linear the lowering left in float
is refused with its name, an existing OUT without ``force``), and the folder is written under a temporary
name next to OUT, renamed once ``onnx.checker`` has passed.
"""

from __future__ import annotations

from pathlib import Path

import qcompile
from qcompile.errors import ExportError
from qcompile.export.onnx import META_MODEL, META_RECIPE, META_VERSION, _lower_skips, write_folder


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
    names = {o.name for n in model_ir.graph for o in n.outputs}
    for v, name in ((model_ir.graph.inputs[0], "input_ids"), (model_ir.graph.outputs[0], "logits")):
        if v.name != name and name not in names:  # the names qcompile's ONNX runtime reads
            v.name = name
    meta = {META_MODEL: model, META_VERSION: qcompile.__version__}
    if recipe is not None:
        meta[META_RECIPE] = recipe.to_yaml()
    model_ir.metadata_props.update(meta)
    model_ir.producer_name = "qcompile"
    return write_folder(out, model_ir, tokenizer)
