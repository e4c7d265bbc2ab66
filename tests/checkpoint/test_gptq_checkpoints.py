"""GPTQ checkpoints as people download them: GPTQModel's v2 (zero points without v1's offset), 8 bits,
one group a row, act-order, asymmetric grids; and AutoGPTQ's layout (TheBloke's collection), which saves a
bias for every quantized linear. llmctl's logits equal those of the library's own dequantized weights.

AutoGPTQ itself cannot be installed here, so its layout is reproduced exactly: llmctl's GPTQ v1 tensors
(the same bits, checked against AutoGPTQ's packing loop in test_formats.py) plus an fp16 `.bias` for every
quantized linear, zero as AutoGPTQ writes it, or not zero as a model with biases has.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

from llmctl.checkpoint.formats import dequantize_checkpoint, quantization_config
from llmctl.checkpoint.loader import read_tensors

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPT = torch.arange(5, 37)[None]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def tiny_llama(path, **overrides) -> str:
    import transformers

    from llmctl.reference import default_model_path

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    transformers.LlamaForCausalLM(config).to(torch.float16).save_pretrained(str(path))
    for name in TOKENIZER_FILES:  # the reference model's tokenizer (4,096 ids): GPTQModel loads one
        if (default_model_path() / name).is_file():
            shutil.copy2(default_model_path() / name, path / name)
    return str(path)


def reference_model(weights: dict[str, torch.Tensor], config: dict):
    """A transformers Llama in fp32 holding exactly these dense weights (biases where given)."""
    import transformers

    config = {k: v for k, v in config.items() if k not in ("quantization_config", "dtype", "torch_dtype")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("bias" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    return model


def llmctl_logits(model_dir: str) -> torch.Tensor:
    """The runtime's own forward pass on CPU (its dequantizing path), last-token logits of PROMPT."""
    from llmctl.runtime.llm import LLM
    from llmctl.runtime.sampling_params import SamplingParams

    llm = LLM(model_dir, dtype="float32", enforce_eager=True)
    out = llm.generate([PROMPT[0].tolist()], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
    return out.outputs[0]


# -- AutoGPTQ's layout, with its bias tensors -----------------------------------------------------------

@pytest.fixture(scope="module")
def gptq_v1(tmp_path_factory) -> str:
    from llmctl.quantize.export import write_checkpoint
    from llmctl.quantize.methods import MethodConfig
    from llmctl.quantize.pipeline import quantize_model

    root = tmp_path_factory.mktemp("autogptq")
    src = tiny_llama(root / "fp16")
    cfg = MethodConfig("rtn", 4, 32, sym=True)
    result = quantize_model(src, cfg, None, device="cpu")
    write_checkpoint(root / "fp16", root / "v1", result.tensors, result.dtype, cfg.quantization_config(), {})
    return str(root / "v1")


def with_biases(src: str, dst, values) -> str:
    """src's checkpoint with an fp16 `.bias` beside every quantized linear, as AutoGPTQ saves one."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tensors = dict(read_tensors(src))
    for name, tensor in list(tensors.items()):
        if name.endswith(".qweight"):
            out_features = tensor.shape[1]
            tensors[name.replace(".qweight", ".bias")] = values(name, out_features).half()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("kind", ["zero", "nonzero"])
def test_autogptq_layout_with_bias_tensors_loads_and_applies_them(gptq_v1, tmp_path, kind):
    gen = torch.Generator().manual_seed(1)
    biased = with_biases(gptq_v1, tmp_path / kind, lambda name, n: torch.zeros(n) if kind == "zero"
                         else torch.randn(n, generator=gen) * 0.1)
    config = json.loads((tmp_path / kind / "config.json").read_text())
    dense = dict(dequantize_checkpoint(read_tensors(biased), quantization_config(biased), torch.float32))
    assert all(dense[f"model.layers.0.{m}.bias"].dtype == torch.float32 for m in LINEARS)
    reference = reference_model(dense, {**config, "attention_bias": True, "mlp_bias": True})
    with torch.no_grad():
        expected = torch.log_softmax(reference(input_ids=PROMPT).logits[0, -1], -1)
    got = llmctl_logits(biased)
    top = dict(got.top_logprobs[0])
    for token, logprob in top.items():
        assert logprob == pytest.approx(expected[token].item(), abs=1e-4)
    assert got.token_ids[0] == int(expected.argmax())


# -- GPTQModel's checkpoints: v2, 8 bits, one group a row, act-order, asymmetric ---------------------------

def gptqmodel():
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed (pip install 'llmctl[quantize-peers]')")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel

    return gptqmodel


@pytest.mark.parametrize("fmt,bits,group_size,sym,desc_act", [
    ("gptq_v2", 4, 32, True, False),
    ("gptq_v2", 4, 64, False, True),
    ("gptq", 8, 32, True, False),
    ("gptq", 4, -1, True, False),
])
def test_gptqmodel_checkpoints_load_with_its_own_logits(tmp_path, fmt, bits, group_size, sym, desc_act):
    gm = gptqmodel()
    src = tiny_llama(tmp_path / "fp16")
    extra = {"act_group_aware": False} if group_size == -1 else {}  # GPTQModel's own rule for one group a row
    qcfg = gm.QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, format=fmt, **extra)
    model = gm.GPTQModel.load(src, qcfg, device="cpu")
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 4000, (1, 48), generator=gen)} for _ in range(8)]
    for c in calib:
        c["attention_mask"] = torch.ones_like(c["input_ids"])
    model.quantize(calib, batch_size=1)
    model.save(str(tmp_path / "q"))
    saved = quantization_config(tmp_path / "q")
    assert saved.get("checkpoint_format", saved.get("format")) == fmt and saved["bits"] == bits

    # Its torch kernel dequantizes in the model's dtype, fp16 here (fp32 it refuses for 8 bits): the fp16
    # product of an fp16 scale and a small integer is the exact product rounded once, as ours rounded is.
    theirs = gm.GPTQModel.load(str(tmp_path / "q"), device="cpu", dtype=torch.float16).model
    dense = dict(dequantize_checkpoint(read_tensors(tmp_path / "q"), saved, torch.float32))
    for i in range(TINY["num_hidden_layers"]):
        for name in LINEARS:
            qlinear = theirs.model.layers[i].get_submodule(name)
            with torch.no_grad():
                their_weight = qlinear.dequantize_weight().T  # [out, in], the library's own arithmetic
            ours = dense[f"model.layers.{i}.{name}.weight"]
            assert torch.equal(ours.half(), their_weight.half()), f"layer {i} {name}"
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    # The library's forward runs its CPU kernels in bfloat16; its weights, checked above through its own
    # dequantize_weight in fp32, are what an fp32 transformers model holding them computes with.
    with torch.no_grad():
        expected = torch.log_softmax(reference_model(dense, config)(input_ids=PROMPT).logits[0, -1], -1)
    got = llmctl_logits(str(tmp_path / "q"))
    for token, logprob in got.top_logprobs[0]:
        assert logprob == pytest.approx(expected[token].item(), abs=1e-4)
