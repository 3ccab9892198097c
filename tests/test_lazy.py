"""Lazy loading (``qcompile.lazy``): a Program over a sharded safetensors checkpoint whose block weights stay in the
shards equals the eagerly loaded one (logits, and GPTQ/RTN codes bit for bit), keeps host memory below the
checkpoint's size, and refuses a checkpoint that does not fit its config by name."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompile import api, models
from qcompile.errors import QCompileError
from qcompile.graph.lazy_weights import CheckpointError, Dequantized, Stored
from qcompile.lazy import load_program
from qcompile.passes.quantize import quantize
from qcompile.program import Program
from qcompile.recipe import load_recipe

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))


def _tokenizer():
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chr(97 + i % 26) * (1 + i // 26): 3 + i for i in range(253)}
    tok = Tokenizer(tm.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _save(model, folder, dtype=torch.float32, shard="20KB"):
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (tied embeddings) in float32, over a dozen shards."""
    return _save(models.tiny("llama"), tmp_path_factory.mktemp("llama"))


def _eager(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    model.config.use_cache = False
    return Program.capture(model)


def test_lazy_program_computes_the_eager_logits(llama):
    lazy, tok = load_program(llama)
    assert len(list(llama.glob("model-*.safetensors"))) > 5
    assert tok is not None
    mm = lazy.model_map
    block_linears = {lin.weight for n, lin in mm.linears.items() if n != mm.lm_head}
    assert set(lazy.lazy) == block_linears and all(isinstance(s, Stored) for s in lazy.lazy.values())
    assert all(lazy.module.get_parameter(w).is_meta for w in block_linears)
    assert not lazy.module.get_parameter("lm_head.weight").is_meta  # tied to the embedding: read at load
    assert lazy.module.get_parameter("lm_head.weight") is lazy.module.get_parameter("model.embed_tokens.weight")
    assert torch.equal(lazy.logits(IDS), _eager(llama).logits(IDS))


@pytest.mark.parametrize("arch,dtype", [("qwen2", torch.bfloat16), ("mistral", torch.float16)])
def test_lazy_reads_half_precision_shards_as_float32(tmp_path, arch, dtype):
    """Stored in bf16/fp16, read as stored and computed in float32: the eager float32 load's logits exactly
    (q/k/v biases, untied lm_head)."""
    folder = _save(models.tiny(arch), tmp_path, dtype, shard="40KB")
    lazy, _ = load_program(folder)
    key = next(iter(lazy.lazy.values())).key
    assert lazy.lazy and next(iter(lazy.lazy.values())).checkpoint.tensor(key).dtype == dtype
    assert torch.equal(lazy.logits(IDS), _eager(folder).logits(IDS))


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantize_gives_the_eager_codes_bit_for_bit(llama, method):
    recipe = load_recipe(method).with_bits(group=32)
    calib = CALIB if method == "gptq" else None
    eager = quantize(_eager(llama), recipe, calib, progress=False, device="cpu")
    lazy_program, _ = load_program(llama)
    lazy = api.compile(lazy_program, recipe, calibration=CALIB, progress=False)
    assert set(eager.quantized) == set(lazy.quantized)
    for w, qe in eager.quantized.items():
        ql = lazy.quantized[w]
        assert torch.equal(qe.codes, ql.codes) and torch.equal(qe.scales, ql.scales) and torch.equal(qe.zeros, ql.zeros)
    # the quantized weights are kept as codes only (dequantized when read) and give the same logits
    assert set(lazy.lazy) == set(lazy_program.lazy)
    assert all(isinstance(s, Dequantized) for s in lazy.lazy.values())
    assert all(lazy.quantized[w].weight.numel() == 0 for w in lazy.lazy)
    assert torch.equal(lazy.logits(IDS), eager.logits(IDS))
    assert all(isinstance(s, Stored) for s in lazy_program.lazy.values())  # the source Program is untouched


def test_cli_quantize_lazy_writes_the_eager_model(llama, tmp_path, capsys):
    from qcompile import artifact
    from qcompile.cli import main

    flags = ["--recipe", "rtn", "--group", "32", "--no-progress"]
    assert main(["quantize", str(llama), "--out", str(tmp_path / "lazy"), "--lazy", *flags]) == 0
    assert main(["quantize", str(llama), "--out", str(tmp_path / "eager"), "--no-lazy", *flags]) == 0
    lazy, eager = artifact.load(tmp_path / "lazy"), artifact.load(tmp_path / "eager")
    assert torch.equal(lazy.logits(IDS), eager.logits(IDS))
    assert main(["quantize", str(llama), "--out", str(tmp_path / "q"), "--lazy", "--recipe", "quarot+gptq"]) == 2
    assert "pass fold_norms rewrites every weight" in capsys.readouterr().err


def test_set_weight_copies_a_lazy_weight_on_write(llama):
    lazy, _ = load_program(llama)
    clone = lazy.clone()
    w = "model.layers.0.self_attn.q_proj.weight"
    new = torch.randn(lazy.weight(w).shape)
    clone.set_weight(w, new)
    assert torch.equal(clone.weight(w), new) and w not in clone.lazy and not clone.module.get_parameter(w).is_meta
    assert lazy.is_lazy(w) and not torch.equal(lazy.weight(w), new)  # the source Program still reads the shard


def test_auto_lazy_only_for_a_checkpoint_over_half_the_available_memory(llama, monkeypatch):
    from qcompile import lazy

    assert not lazy.should_be_lazy(str(llama)) and not lazy.should_be_lazy("tiny:llama")
    monkeypatch.setattr(lazy, "available_bytes", lambda: 2 * lazy.Checkpoint(llama).float32_bytes() - 1)
    assert lazy.should_be_lazy(str(llama))
    assert not lazy.should_be_lazy(str(llama), False) and lazy.should_be_lazy(str(llama), True)  # --lazy/--no-lazy
    with pytest.raises(QCompileError, match="pass fold_norms rewrites every weight"):  # auto: refused before loading
        api.quantize_to(str(llama), "quarot+gptq", "unused", progress=False, lazy=None)


def test_lazy_refuses_moving_the_whole_program(llama):
    lazy, _ = load_program(llama)
    with pytest.raises(QCompileError, match="cannot be moved whole"):
        lazy.to("cpu")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_shard(folder, key, change):
    """Rewrite the shard holding ``key`` with ``change(tensors)`` applied, and the index to match."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    tensors = load_file(folder / shard)
    change(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index["weight_map"] = {k: s for k, s in index["weight_map"].items() if s != shard} | {k: shard for k in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


KEY = "model.layers.1.mlp.down_proj.weight"


def test_missing_tensor_is_named(llama, tmp_path):
    folder = _copy(llama, tmp_path / "ckpt")
    _rewrite_shard(folder, KEY, lambda t: t.pop(KEY))
    with pytest.raises(CheckpointError, match=f"missing tensor {KEY}"):
        load_program(folder)


def test_extra_tensor_is_named(llama, tmp_path):
    folder = _copy(llama, tmp_path / "ckpt")
    shard = _rewrite_shard(folder, KEY, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor model.layers.9.extra.weight in {shard}"):
        load_program(folder)


def test_wrong_shape_is_named(llama, tmp_path):
    folder = _copy(llama, tmp_path / "ckpt")
    shard = _rewrite_shard(folder, KEY, lambda t: t.update({KEY: t[KEY][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{KEY} in {shard} has shape \[64, 95\], the model expects \[64, 96\]"):
        load_program(folder)


def test_truncated_shard_is_named(llama, tmp_path):
    folder = _copy(llama, tmp_path / "ckpt")
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][KEY]
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"shard .*{shard} cannot be read .*truncated or corrupt"):
        load_program(folder)
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard .*{shard} \(listed in .*\) is missing"):
        load_program(folder)


def test_lazy_load_leaves_the_weights_out_of_anonymous_memory(tmp_path):
    """A bf16 checkpoint of 6 blocks (hidden 1024, 4 MiB an attention linear in float32, 297 MiB in all in float32):
    loading it lazily and running it grows the process's anonymous memory (RssAnon) by far less than the float32
    model (the capture's graph and one block: ~55 MB); an eager load grows it by the whole model, which the same
    measurement shows. Both measured in a fresh process after the imports and one meta model built, with glibc's
    mmap threshold fixed (its default rises to the size of the largest block freed so far, which keeps later blocks of
    that size in the heap after they are freed: 49-89 MB for the same live memory, by what ran before)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="30MB")
    fp32 = sum(4 * t.numel() for f in tmp_path.glob("*.safetensors") for t in load_file(f).values())
    code = textwrap.dedent(f"""
        import torch, sys
        def anon():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))
        import qcompile.lazy, qcompile.passes.blockwise, transformers
        from transformers import AutoModelForCausalLM
        ids = torch.randint(0, 256, (1, 16))
        qcompile.lazy.meta_model({str(tmp_path)!r})  # the imports a model's construction makes, before measuring
        base = anon()
        if sys.argv[1] == "lazy":
            p, _ = qcompile.lazy.load_program({str(tmp_path)!r})
            p.logits(ids)
        else:
            m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.float32)
            m(input_ids=ids)
        print(anon() - base)
    """)
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    grown = {how: int(subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, env=env,
                                     check=True).stdout.split()[-1]) for how in ("lazy", "eager")}
    assert grown["eager"] > 0.9 * fp32  # the measurement sees a float32 model
    assert grown["lazy"] < 0.3 * fp32, (grown, fp32)


MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory):
    """Tiny MoE checkpoints in bf16 over several shards, as transformers 5 saves them: one tensor per expert and
    projection (``experts.{e}.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``)."""
    return {arch: _save(models.tiny(arch), tmp_path_factory.mktemp(arch), torch.bfloat16, shard="40KB")
            for arch in MOE}


@pytest.mark.parametrize("arch", MOE)
def test_lazy_moe_builds_the_stacked_experts_from_the_per_expert_tensors(moe_folders, arch, monkeypatch):
    """The stacked expert weights are lazy (built from the per-expert tensors when read: loading reads none of
    them) and the lazy Program computes the eager float32 load's logits exactly."""
    from qcompile.graph.lazy_weights import Checkpoint, Converted

    folder = moe_folders[arch]
    assert any(".experts.0." in k for k in Checkpoint(folder).keys())
    read = []
    original = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, key: read.append(key) or original(self, key))
    lazy, _ = load_program(folder)
    experts = {lin.weight for lin in lazy.model_map.linears.values() if lin.experts}
    assert experts and all(isinstance(lazy.lazy[w], Converted) for w in experts)
    assert not [k for k in read if ".experts." in k]  # binding read no expert's tensor
    assert torch.equal(lazy.logits(IDS), _eager(folder).logits(IDS))
    assert [k for k in read if ".experts." in k]  # running the blocks did


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_lazy_moe_quantizes_to_the_eager_codes(moe_folders, method):
    folder = moe_folders["qwen2_moe"]  # routed experts, a shared expert and its gate
    recipe = load_recipe(method).with_bits(group=32)
    eager = quantize(_eager(folder), recipe, CALIB if method == "gptq" else None, progress=False, device="cpu")
    lazy = api.compile(load_program(folder)[0], recipe, calibration=CALIB, progress=False)
    assert set(eager.quantized) == set(lazy.quantized) and any(".experts." in w for w in lazy.quantized)
    for w, qe in eager.quantized.items():
        ql = lazy.quantized[w]
        assert torch.equal(qe.codes, ql.codes) and torch.equal(qe.scales, ql.scales) and torch.equal(qe.zeros, ql.zeros)
    # the stacked experts too are kept as codes, dequantized when read (GPTQ's block by block, after the dense)
    assert all(isinstance(lazy.lazy[w], Dequantized) for w in lazy.quantized if ".experts." in w)
    assert torch.equal(lazy.logits(IDS), eager.logits(IDS))


@pytest.mark.parametrize("arch,key", [("qwen3_moe", "model.layers.1.mlp.experts.2.up_proj.weight"),
                                      ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w1.weight")])
def test_missing_expert_is_named(moe_folders, tmp_path, arch, key):
    folder = _copy(moe_folders[arch], tmp_path / "ckpt")
    _rewrite_shard(folder, key, lambda t: t.pop(key))
    stacked = key.replace("block_sparse_moe", "mlp").rsplit(".experts.", 1)[0] + ".experts.gate_up_proj"
    with pytest.raises(CheckpointError, match=rf"missing tensor {key} \(stored form of {stacked}\)"):
        load_program(folder)


def test_wrong_expert_shape_is_named(moe_folders, tmp_path):
    folder = _copy(moe_folders["qwen3_moe"], tmp_path / "ckpt")
    key = "model.layers.0.mlp.experts.1.down_proj.weight"
    shard = _rewrite_shard(folder, key, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{key} in {shard} has shape \[64, 47\], the model expects \[64, 48\]"):
        load_program(folder)
