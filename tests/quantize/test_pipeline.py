"""The layer-by-layer pipeline end to end on a tiny Llama: checkpoint files, reload, runtime, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmctl.quantize.calibration import BUILTIN, calibration_ids
from llmctl.quantize.dense import dense_model
from llmctl.quantize.export import write_checkpoint
from llmctl.quantize.methods import MethodConfig
from llmctl.quantize.pipeline import quantize_model
from llmctl.quantize.report import build_report

CONFIGS = {
    "rtn": MethodConfig("rtn", 4, 32, sym=False),
    "gptq": MethodConfig("gptq", 4, 32, sym=False, desc_act=True),
    "awq": MethodConfig("awq", 4, 32, sym=False),
}


def eval_windows(n=2, length=65):
    return torch.randint(2, 512, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory) -> dict:
    """Each method's checkpoint directory and pipeline result, quantized once for the module."""
    calib = calibration_ids(BUILTIN, tiny_llama, samples=8, seq_len=32)
    out = {}
    for name, cfg in CONFIGS.items():
        result = quantize_model(tiny_llama, cfg, calib, eval_windows(), batch_size=4)
        path = tmp_path_factory.mktemp(name)
        write_checkpoint(Path(tiny_llama), path, result.tensors, result.dtype, cfg.quantization_config(),
                         build_report(cfg, result, tiny_llama, {"source": BUILTIN}))
        out[name] = (path, result)
    return out


def test_checkpoint_files_and_configs(quantized):
    gptq_dir, _ = quantized["gptq"]
    config = json.loads((gptq_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    assert json.loads((gptq_dir / "quantize_config.json").read_text()) == qc
    assert config["dtype"] == "float16" and (gptq_dir / "tokenizer.json").is_file()
    assert (gptq_dir / "generation_config.json").is_file()
    awq_dir, _ = quantized["awq"]
    qc = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "version", "zero_point", "bits", "group_size")} == {
        "quant_method": "awq", "version": "gemm", "zero_point": True, "bits": 4, "group_size": 32}
    assert not (awq_dir / "quantize_config.json").exists()


def test_tensor_names_and_shapes(quantized):
    from safetensors import safe_open

    shapes = {}
    for name in ("gptq", "awq"):
        with safe_open(str(quantized[name][0] / "model.safetensors"), "pt") as f:
            shapes[name] = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    g = shapes["gptq"]
    # hidden 128, intermediate 256, group 32: q_proj is [128 out, 128 in], down_proj is [128 out, 256 in].
    assert g["model.layers.0.self_attn.q_proj.qweight"] == ((16, 128), "I32")
    assert g["model.layers.0.self_attn.q_proj.qzeros"] == ((4, 16), "I32")
    assert g["model.layers.0.self_attn.q_proj.scales"] == ((4, 128), "F16")
    assert g["model.layers.1.mlp.down_proj.g_idx"] == ((256,), "I32")
    assert "model.layers.0.self_attn.q_proj.weight" not in g and g["model.embed_tokens.weight"][1] == "F16"
    a = shapes["awq"]
    assert a["model.layers.0.mlp.down_proj.qweight"] == ((256, 16), "I32")
    assert a["model.layers.0.mlp.down_proj.qzeros"] == ((8, 16), "I32")
    assert a["model.layers.0.mlp.down_proj.scales"] == ((8, 128), "F16")
    assert not any(k.endswith("g_idx") for k in a)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_reloaded_checkpoint_reproduces_what_the_pipeline_measured(quantized, method):
    # The pipeline's "after" perplexity ran layer by layer on the weights it packed; the checkpoint,
    # dequantized into a whole transformers model, must give the same number on the same windows.
    path, result = quantized[method]
    model = dense_model(path)
    ids = eval_windows()
    logits = model(input_ids=ids[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert torch.exp(nll).item() == pytest.approx(result.perplexity["after"], rel=1e-3)
    assert result.perplexity["before"] != pytest.approx(result.perplexity["after"], rel=1e-4)


def test_gptq_layers_beat_rtn_layers_on_the_same_grid(quantized):
    rtn = sum(s.error for s in quantized["rtn"][1].layers)
    gptq = sum(s.error for s in quantized["gptq"][1].layers)
    assert gptq < rtn
    assert all(s.seconds > 0 for s in quantized["gptq"][1].layers)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_runtime_loads_the_checkpoint(quantized, method):
    from llmctl.runtime.llm import LLM
    from llmctl.runtime.sampling_params import SamplingParams

    path, _ = quantized[method]
    prompt = list(range(5, 25))
    ours = LLM(str(path), enforce_eager=True).generate([prompt], SamplingParams(max_tokens=8, temperature=0))
    reference = dense_model(path).generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert ours[0].outputs[0].token_ids == reference[0, len(prompt):].tolist()


def test_awq_rescales_norms_and_saves_them(quantized, tiny_llama):
    from safetensors.torch import load_file

    before = load_file(str(Path(tiny_llama) / "model.safetensors"))
    after = load_file(str(quantized["awq"][0] / "model.safetensors"))
    name = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(before[name], after[name])
    assert torch.equal(load_file(str(quantized["gptq"][0] / "model.safetensors"))[name], before[name])


def test_config_errors_name_the_bad_value(tiny_llama):
    with pytest.raises(ValueError, match="bits must be 4 for awq"):
        MethodConfig("awq", 8, 128, sym=False)
    with pytest.raises(ValueError, match="GPTQ options; awq"):
        MethodConfig("awq", 4, 128, sym=False, desc_act=True)
    with pytest.raises(ValueError, match="method must be awq, gptq, rtn or fp8, got 'fp4'"):
        MethodConfig("fp4")
    with pytest.raises(ValueError, match="--method fp8 takes no --bits"):
        MethodConfig("fp8", 4, 128, sym=True)
    with pytest.raises(ValueError, match="self_attn.q_proj: group size 96 does not divide the 128 input channels"):
        quantize_model(tiny_llama, MethodConfig("rtn", 4, 96, sym=True), None)
    with pytest.raises(ValueError, match="gptq needs calibration data"):
        quantize_model(tiny_llama, MethodConfig("gptq", 4, 32, sym=True), None)


@pytest.mark.gpu
def test_cuda_keeps_one_layer_on_the_device(tiny_llama):
    calib = calibration_ids(BUILTIN, tiny_llama, samples=8, seq_len=32)
    result = quantize_model(tiny_llama, MethodConfig("gptq", 4, 32, sym=True), calib, device="cuda")
    assert result.peak_memory["max_memory_allocated_bytes"] > 0
    assert all(t.device.type == "cpu" for t in result.tensors.values())


def test_awq_on_qwen2_without_gqa_scales_v_into_o(tmp_path):
    # Qwen2 has q/k/v biases, and with as many KV heads as heads v_proj's outputs are o_proj's inputs:
    # the v -> o scaling (bias included) runs and the checkpoint must still reproduce the pipeline.
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(str(tmp_path / "src"))
    cfg = MethodConfig("awq", 4, 32, sym=False)
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    result = quantize_model(tmp_path / "src", cfg, calib, eval_windows(1, 33), batch_size=4)
    v_bias = model.model.layers[0].self_attn.v_proj.bias.detach()
    assert not torch.allclose(result.tensors["model.layers.0.self_attn.v_proj.bias"].float(), v_bias, atol=1e-3)
    write_checkpoint(tmp_path / "src", tmp_path / "q", result.tensors, result.dtype, cfg.quantization_config(), {})
    ids = eval_windows(1, 33)
    logits = dense_model(tmp_path / "q")(input_ids=ids[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])
    assert torch.exp(nll).item() == pytest.approx(result.perplexity["after"], rel=1e-3)


def test_older_autogptq_layout_with_only_quantize_config_json(quantized, tmp_path):
    # Older AutoGPTQ checkpoints keep their settings in quantize_config.json alone.
    import shutil

    from llmctl.checkpoint.loader import iter_weights

    legacy = tmp_path / "legacy"
    shutil.copytree(quantized["gptq"][0], legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["quantization_config"]
    (legacy / "config.json").write_text(json.dumps(config))
    ours = dict(iter_weights(legacy, torch.float32, torch.device("cpu")))
    expected = dense_model(quantized["gptq"][0]).state_dict()
    read = ours["model.layers.1.mlp.down_proj.weight"].dequantize()  # a layout-neutral weight, read as GPTQ
    assert torch.equal(read, expected["model.layers.1.mlp.down_proj.weight"])
    assert not any(name.endswith("qweight") for name in ours)


def test_stages_are_announced_with_the_layer_count_before_any_layer_runs(tiny_llama):
    """What the CLI's progress bar shows: each stage as it begins, and the total before the first layer ends
    (it used to learn it from the first layer, showing 0/? for the whole load)."""
    events = []
    quantize_model(tiny_llama, MethodConfig("rtn", 4, 64, sym=True), None, eval_windows(),
                   on_stage=lambda name, steps: events.append((name, steps)),
                   on_layer=lambda stats, total: events.append(("layer", stats.index)))
    assert events == [("loading the model", None), ("rtn layers", 2), ("layer", 0), ("layer", 1),
                      ("held-out perplexity", None)]
