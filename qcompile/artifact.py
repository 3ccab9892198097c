"""Save and load a compiled model: one directory, verified before anything is used.

    DIR/model.pt2            the lowered graph and all its weights (torch.export.save)
    DIR/weights.safetensors  the packed quantized tensors by source-derived name (<weight>_packed, ...)
    DIR/recipe.yaml          the recipe that made it, every flag
    DIR/manifest.json        format version, versions, model spec, plan, the KV-cache layout (heads per
                             attention op), and sha256 + size of each file

The directory is written under a temporary name and renamed when complete, so a failure never leaves a
half-written output. ``load`` checks the manifest's format version, every file's size and hash (a
tampered or truncated file is refused by name), and that the packed tensors in the safetensors file are
the ones the graph uses, before returning anything.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

import qcompile
from qcompile.errors import ArtifactError, UnsafeRewriteError
from qcompile.graph.fx import export_inputs
from qcompile.passes.kv_cache import CacheLayout, with_kv_cache
from qcompile.program import Program
from qcompile.recipe import Recipe

FORMAT_VERSION = 1
FILES = ("model.pt2", "weights.safetensors", "recipe.yaml")
_PACKED_SUFFIXES = ("_packed", "_scales", "_zeros")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _export(program: Program):
    ids, dims = export_inputs(program.module, torch.zeros(2, 16, dtype=torch.long))
    with torch.no_grad():
        return torch.export.export(program.module, (), {"input_ids": ids}, dynamic_shapes={"input_ids": dims},
                                   strict=False)


def _cache_layout(program: Program) -> dict | None:
    """The KV-cache layout to record, or None for a model whose attention was not matched (no generation)."""
    try:
        return CacheLayout.of(program.model_map).to_dict()
    except UnsafeRewriteError:
        return None


def save(program: Program, out_dir: str | Path, recipe: Recipe, model: str, plan: list[str] | None = None) -> Path:
    """Write the compiled program to ``out_dir`` (which must not exist yet), atomically. A Program with lazy
    weights has those the lowered graph still reads (linears left in float) read into host memory first."""
    out = Path(out_dir)
    if out.exists():
        raise ArtifactError(f"{out} already exists; choose a new directory or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    if program.lazy:  # weights still in a checkpoint's shards (qcompile.lazy): the export traces real tensors
        from qcompile.lazy import read_all

        read_all(program)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.export.save(_export(program), tmp / "model.pt2")
        state = program.module.state_dict()
        packed = {k: v.contiguous() for k, v in state.items() if k.endswith(_PACKED_SUFFIXES)}
        save_file(packed, tmp / "weights.safetensors")
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        manifest = {
            "format_version": FORMAT_VERSION,
            "qcompile_version": qcompile.__version__,
            "torch_version": torch.__version__,
            "model": model,
            "recipe": recipe.name,
            "plan": plan or [],
            "passes": [line for r in program.reports for line in r.lines()],
            "cache": _cache_layout(program),
            "files": {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in FILES},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        for f in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors create owner-only files
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class LoadedModel:
    """A compiled model read back from disk: call ``logits(input_ids)``."""

    module: torch.nn.Module
    manifest: dict
    recipe: Recipe

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.module(input_ids=input_ids)
        return out.logits if hasattr(out, "logits") else out[0]

    def decoder(self):
        """A ``decoding.CachedDecoder`` over a copy of the graph made into a KV-cache step (``kv_cache``)."""
        from qcompile.decoding import CachedDecoder

        if not self.manifest.get("cache"):
            raise ArtifactError("this model directory records no KV-cache layout (its attention was not matched, "
                                "or an older qcompile wrote it): generate with use_cache=False")
        layout = CacheLayout.from_dict(self.manifest["cache"])
        return CachedDecoder(with_kv_cache(copy.deepcopy(self.module), layout), layout)


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load(path: str | Path) -> LoadedModel:
    """Read a saved model, refusing (ArtifactError) anything missing, tampered, truncated or of another format."""
    import qcompile.kernels.ops  # noqa: F401  (the graph calls torch.ops.qcompile.*)
    import transformers.modeling_outputs  # noqa: F401  (registers the output classes the graph's pytree names)

    root = Path(path)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{root} holds no manifest.json: not a qcompile model directory") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{root / 'manifest.json'} is not valid JSON ({e}): truncated or tampered") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{root} has format version {version}; this qcompile reads version {FORMAT_VERSION}")
    for name in FILES:
        meta = manifest.get("files", {}).get(name)
        f = root / name
        if meta is None or not f.is_file():
            raise ArtifactError(f"{root}: {name} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"{f} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}: truncated?")
        if _sha256(f) != meta["sha256"]:
            raise ArtifactError(f"{f} does not match its sha256 in the manifest: the file was modified")
    module = torch.export.load(root / "model.pt2").module()
    state = module.state_dict()
    for name, tensor in load_file(root / "weights.safetensors").items():
        if name not in state or not torch.equal(state[name], tensor):
            raise ArtifactError(f"{root}: packed tensor {name} differs between weights.safetensors and model.pt2")
    recipe = Recipe.from_dict(yaml.safe_load((root / "recipe.yaml").read_text()), where=str(root / "recipe.yaml"))
    return LoadedModel(module, manifest, recipe)
