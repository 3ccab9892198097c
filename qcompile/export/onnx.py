"""ONNX export of a lowered program: one decoder graph with a KV cache, for onnxruntime and onnxruntime-genai.

    OUT/model.onnx (+ model.onnx.data)  the decoder step (below), qcompile ops by ``kernels/ort``'s translations
    OUT/genai_config.json               what onnxruntime-genai needs to run it (``og.Model(OUT)``)
    OUT/tokenizer.json, ...             the source model's tokenizer (``save_pretrained``)

The graph is the ``kv_cache`` pass's decoder step, with onnxruntime-genai's names::

    (input_ids [B, S], attention_mask [B, P + S] (ones), past_key_values.{i}.key/value [B, n_kv, P, D])
        → (logits [B, S, V], present.{i}.key/value [B, n_kv, P + S, D])

P = 0 (empty past) is full-sequence scoring, so one graph serves perplexity and generation. The attention's
lengths come from the mask, so onnxruntime-genai can keep one cache buffer per layer and write each new token
in place (``past_present_share_buffer``; the past then has the context length as its dim 2). Linears are
translated by ``qcompile.kernels.ort`` (W4A16 → MatMulNBits, W4A8/W4A4 → per-token quantization and
MatMulInteger, online Hadamards as reshapes and small matmuls, KV fake-quant emulated exactly); the rest is
``torch.onnx``'s own aten translation. The recipe (YAML) and the source model are stored in the model's
``metadata_props`` (``qcompile.recipe``, ``qcompile.model``).

Everything is checked before anything is written: a linear the lowering left in float (a codebook, other
bit widths) is refused with its name, as is an existing OUT without ``force``. The folder is written under a
temporary name next to OUT and renamed when ``onnx.checker`` has passed, so a failure leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

import qcompile
from qcompile.errors import ExportError
from qcompile.export.gqa import (attention_as_gqa, lengths_from_mask, simplify_attention, to_token_major,
                                 token_attention, token_attention_onnx)
from qcompile.export.onnx_rewrites import fold, fuse_for_ort, quantize_vocab_tables, tie_lm_head
from qcompile.graph.onnx_genai import NAMES as GENAI_NAMES, cache_names
from qcompile.passes.fuse_linears import fuse_shared_input_linears
from qcompile.passes.kv_cache import CacheLayout, with_kv_cache

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
META_RECIPE, META_MODEL, META_VERSION, META_INT8 = "qcompile.recipe", "qcompile.model", "qcompile.version", \
    "qcompile.int8_path"
META_NOTES = "qcompile.export_notes"
INT8_PATHS = ("matmulinteger", "matmulnbits")


def is_onnx_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding ``model.onnx`` (an export, or something claiming to be one)."""
    p = Path(path)
    return p.is_dir() and (p / MODEL_FILE).is_file()


def _lower_skips(pass_lines: list[str]) -> list[str]:
    """The ``lower`` pass's ``skipped SITE: REASON`` lines (linears it left fake-quantized in float)."""
    out, current = [], None
    for line in pass_lines:
        if not line.startswith(" "):
            current = line.split(":", 1)[0]
        elif current == "lower" and line.strip().startswith("skipped "):
            out.append(line.strip()[len("skipped "):])
    return out


def _check_expressible(gm: torch.fx.GraphModule, pass_lines: list[str], where: str) -> None:
    """Refuse, naming the first offender, what the ONNX export cannot express as the recipe meant it."""
    from qcompile.kernels.ort import translation_table

    skips = _lower_skips(pass_lines)
    if skips:
        site, _, reason = skips[0].partition(": ")
        raise ExportError(f"{where}: linear {site} was not lowered to an INT4 op ({reason}); ONNX export would "
                          "store it in float and drop its quantization. Quantize with a uniform (affine) 4-bit recipe.")
    known = set(translation_table())
    for node in gm.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith("qcompile."):
            continue
        if node.target not in known:
            raise ExportError(f"{where}: node {node.name} calls {node.target}, which has no ONNX translation")
        if node.target == torch.ops.qcompile.fake_quant.default and any(
                u.op == "call_function" and u.target == torch.ops.aten.linear.default for u in node.users):
            raise ExportError(f"{where}: node {node.name} fake-quantizes the input of a float linear "
                              f"({next(iter(node.users)).name}): a leftover the lowering could not make an INT4 op")


def _source(source, model: str | None, recipe, tokenizer, hf_config):
    """(GraphModule, layout, recipe, model spec, pass lines, tokenizer, HF config, where) of a saved directory or
    a lowered Program."""
    from qcompile import artifact
    from qcompile.program import Program

    if isinstance(source, Program):
        layout = CacheLayout.of(source.model_map)
        lines = [line for r in source.reports for line in r.lines()]
        gm = copy.deepcopy(source.module)
        return gm, layout, recipe, model or "program", lines, tokenizer, hf_config, "program"
    root = Path(source)
    if not artifact.is_artifact(root):
        raise ExportError(f"{root} is not a directory written by `qcompile quantize` (no manifest.json)")
    loaded = artifact.load(root)
    if "cache" not in loaded.manifest:
        raise ExportError(f"{root}: the manifest records no KV-cache layout; quantize the model again")
    layout = CacheLayout.from_dict(loaded.manifest["cache"])
    if tokenizer is None or hf_config is None:
        from qcompile.api import load_model

        hf_model, tok = load_model(loaded.manifest["model"])
        tokenizer, hf_config = tokenizer or tok, hf_config or hf_model.config
    return (loaded.module, layout, loaded.recipe, loaded.manifest["model"], loaded.manifest.get("passes", []),
            tokenizer, hf_config, str(root))


def _names(layout: CacheLayout) -> tuple[list[str], list[str]]:
    past, present = cache_names(layout.layers)
    return ["input_ids", *(n for kv in past for n in kv)], ["logits", *(n for kv in present for n in kv)]


def _int4_linears(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("qcompile.linear"))


def _step_inputs(layout: CacheLayout, past: int, seq: int) -> tuple:
    """The decoder step's inputs for one sequence: ``seq`` new token ids and an all-zero cache of length ``past``."""
    ids = torch.zeros(1, seq, dtype=torch.long)
    return ids, *(torch.zeros(1, h, past, layout.head_dim) for h in layout.n_kv_heads for _ in (0, 1))


def _export(gm: torch.fx.GraphModule, layout: CacheLayout, int8_path: str, max_positions: int,
            vocab_bits: int | None = None, accuracy_level: int | None = None):
    """torch.onnx (dynamo) export of the decoder step with batch, S and P dynamic; returns the ir.Model."""
    from qcompile.kernels.ort import pack_matmulnbits, translation_table, w4ax_as_matmulnbits

    rewritten, level = w4ax_as_matmulnbits(gm) if int8_path == "matmulnbits" else (0, 0)
    chosen = level if accuracy_level is None else accuracy_level
    n_linears = _int4_linears(gm)
    fuse_shared_input_linears(gm)
    n_ops = _int4_linears(gm)
    fused = attention_as_gqa(gm)
    simplified = simplify_attention(gm, lambda past, seq: _step_inputs(layout, past, seq), max_positions)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=8191)
    past_len = torch.export.Dim("past", min=0, max=8191)
    ids = torch.zeros(2, 3, dtype=torch.long)
    past = [t.normal_() for t in [torch.empty(2, h, 4, layout.head_dim) for h in layout.n_kv_heads for _ in (0, 1)]]
    dynamic = ({0: batch, 1: seq}, *({0: batch, 2: past_len} for _ in past))
    ins, outs = _names(layout)
    table = translation_table(chosen) | {token_attention: token_attention_onnx}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            # traced first: every node then has its symbolic shape (one batch, S and P for all layers), which
            # the token-major rewrite proves its layout changes with
            traced = torch.export.export(gm, (ids, *past), dynamic_shapes=dynamic, strict=False)
            simplified |= to_token_major(traced.graph_module)
            prog = torch.onnx.export(traced, (ids, *past), dynamic_shapes=dynamic, dynamo=True, input_names=ins,
                                     output_names=outs, custom_translation_table=table,
                                     optimize=False, verbose=False)
        except Exception as e:  # the exporter raises many types; keep its first line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"torch.onnx could not export the decoder graph: {type(e).__name__}: {first}") from e
    model = prog.model
    fold(model, unpack_weights=int8_path == "matmulinteger")
    pack_matmulnbits(model)
    notes = [quantize_vocab_tables(model, vocab_bits) if vocab_bits else tie_lm_head(model), f"attention: {fused} of {layout.layers} layers as GroupQueryAttention",
             f"linears: {n_linears} INT4 linears in {n_ops} ops (those sharing an input fused)",
             "attention inputs: " + (", ".join(f"{k} ×{v}" for k, v in simplified.items()) or "as captured")]
    masked = lengths_from_mask(model)
    fusions = fuse_for_ort(model)
    notes.append(f"attention lengths: from the attention_mask input, read by {masked} layers")
    notes.append("fused: " + ", ".join(f"{k} ×{v}" for k, v in fusions.items()))
    if rewritten:
        notes.append(f"W4A8/W4A4: {rewritten} linears as MatMulNBits, accuracy_level {level}")
    if chosen != level:
        notes.append(f"accuracy_level {chosen} on every INT4 MatMulNBits as asked (onnxruntime's int8 activations "
                     "per block of K)" if chosen else "accuracy_level 0 as asked (float activations)")
    return model, rewritten, notes


def _context_length(hf_config) -> int:
    return int(getattr(hf_config, "max_position_embeddings", None) or 2048)


def _genai_config(layout: CacheLayout, hf_config, tokenizer, filename: str) -> dict:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    eos = eos if eos is not None else getattr(hf_config, "eos_token_id", 0)
    bos = getattr(hf_config, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    ctx = _context_length(hf_config)
    return {
        "model": {
            "bos_token_id": bos if bos is not None else eos,
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": layout.head_dim,
                "hidden_size": int(getattr(hf_config, "hidden_size", layout.head_dim * layout.n_heads[0])),
                "inputs": dict(zip(("input_ids", "attention_mask", "past_key_names", "past_value_names"),
                                   GENAI_NAMES[:4])),
                "outputs": {"logits": "logits", "present_key_names": GENAI_NAMES[4],
                            "present_value_names": GENAI_NAMES[5]},
                "num_attention_heads": layout.n_heads[0],
                "num_hidden_layers": layout.layers,
                "num_key_value_heads": layout.n_kv_heads[0],
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos,
            "type": "llama",
            "vocab_size": int(getattr(hf_config, "vocab_size", 0)),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def export_onnx(source, out: str | Path, *, force: bool = False, int8_path: str = "matmulnbits",
                accuracy_level: int | None = None, model: str | None = None, recipe=None, tokenizer=None,
                hf_config=None) -> Path:
    """Export a saved directory (``qcompile quantize``'s output) or a lowered ``Program`` to the ONNX folder
    ``out`` (see the module docstring). ``int8_path`` (W4A8/W4A4 linears): ``"matmulnbits"`` keeps the
    weights 4-bit in ``MatMulNBits`` (A8: ``accuracy_level=4``, onnxruntime's int8 activations per block of K —
    the same perplexity as the exact route on SmolLM2 and twice its speed; A4: the recipe's per-token codes
    exactly); ``"matmulinteger"`` computes the recipe's per-token int8 codes and ``MatMulInteger`` (exact A8;
    the weights stored as int8). ``accuracy_level`` (0 or 4) overrides the one chosen for every INT4
    ``MatMulNBits``: 4 on a W4A16 model trades its float activations for onnxruntime's int8 compute (what the
    onnxruntime-genai builder's int4 does by default). ``model``/``recipe``/``tokenizer``/
    ``hf_config`` describe a Program source (a directory records them)."""
    if int8_path not in INT8_PATHS:
        raise ExportError(f"int8_path must be one of {INT8_PATHS}, got {int8_path!r}")
    if accuracy_level not in (None, 0, 4):
        raise ExportError(f"accuracy_level must be 0 (float activations) or 4 (int8), got {accuracy_level!r}")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; choose a new folder or pass --force to replace it")
    gm, layout, recipe, spec, lines, tokenizer, hf_config, where = _source(source, model, recipe, tokenizer,
                                                                           hf_config)
    _check_expressible(gm, lines, where)
    gm = with_kv_cache(gm, layout)
    vocab_bits = recipe.weights.vocab_bits if recipe is not None and recipe.weights is not None else None
    ir_model, rewritten, notes = _export(gm, layout, int8_path, _context_length(hf_config), vocab_bits,
                                         accuracy_level)
    meta = {META_MODEL: spec, META_VERSION: qcompile.__version__, META_INT8: int8_path if rewritten else "none",
            META_NOTES: "\n".join(notes)}
    if recipe is not None:
        meta[META_RECIPE] = recipe.to_yaml()
    ir_model.metadata_props.update(meta)
    ir_model.producer_name = "qcompile"

    def fill(tmp: Path) -> None:
        config = _genai_config(layout, hf_config, tokenizer, MODEL_FILE)
        (tmp / GENAI_CONFIG).write_text(json.dumps(config, indent=1))

    return write_folder(out, ir_model, tokenizer, fill)


def write_folder(out: Path, ir_model, tokenizer=None, fill=None, check=None) -> Path:
    """Write ``OUT/model.onnx`` (+ external data), the tokenizer and what ``fill(tmp)`` adds, under a temporary
    name next to ``out``, renamed to ``out`` once ``onnx.checker`` (or ``check(path)``) has passed (an existing
    ``out`` is replaced): a failure leaves nothing behind."""
    import onnx
    import onnx_ir as ir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ir.save(ir_model, tmp / MODEL_FILE, external_data=MODEL_FILE + ".data")
        (check or (lambda f: onnx.checker.check_model(str(f), full_check=False)))(tmp / MODEL_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if fill is not None:
            fill(tmp)
        for f in (tmp, *tmp.iterdir()):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

