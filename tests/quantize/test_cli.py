"""`llmctl quantize`: a run's output, and one clear line with exit code 1 for each kind of bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from llmctl.cli.quantize import quantize


@pytest.fixture(scope="module")
def run():
    app = typer.Typer()
    app.command("quantize")(quantize)
    app.callback()(lambda: None)  # keep `quantize` a subcommand, as under `llmctl`
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["quantize", *map(str, args)])


def test_quantize_writes_a_checkpoint_and_a_report(run, tiny_llama, tmp_path):
    out = tmp_path / "rtn"
    result = run(tiny_llama, out, "--method", "rtn", "--group-size", "64", "--samples", "4", "--seq-len", "32",
                 "--eval-windows", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "rtn via llmctl" in result.output and "gptq 4-bit, group size 64" in result.output
    assert "held-out perplexity" in result.output and "(255 tokens)" in result.output
    assert f"wrote {out}" in result.output
    report = json.loads((out / "quant_report.json").read_text())
    assert report["method"] == "rtn" and len(report["layers"]) == 2 and report["perplexity"]["tokens"] == 255
    assert report["calibration"] == {"source": "builtin", "samples": 4, "seq_len": 32}
    assert all(layer["error"] > 0 for layer in report["layers"])
    # Readable by a server running as another user, as every other file it wrote is (safetensors writes 0600).
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    doc = run(tiny_llama, tmp_path / "json", "--method", "rtn", "--group-size", "64", "--samples", "4",
              "--seq-len", "32", "--eval-windows", "1", "--device", "cpu", "--output", "json")
    assert doc.exit_code == 0, doc.output
    parsed = json.loads(doc.stdout)  # the report alone: no bar, no table
    assert parsed["output"] == str(tmp_path / "json") and len(parsed["layers"]) == 2
    assert parsed["perplexity"] == json.loads((tmp_path / "json" / "quant_report.json").read_text())["perplexity"]

    again = run(out, tmp_path / "again", "--method", "rtn")  # a quantized model as the source
    assert again.exit_code == 1 and "Traceback" not in again.output
    assert f"{out} is already quantized (gptq, 4 bits): quantize the original" in " ".join(again.output.split())
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("args,message", [
    (["--method", "awq", "--bits", "8"], "bits must be 4 for awq"),
    (["--method", "awq", "--desc-act"], "--desc-act and static groups are GPTQ options"),
    (["--method", "rtn", "--group-size", "96"], "group size 96 does not divide"),
    (["--device", "tpu"], "device must be auto, cuda or cpu, got 'tpu'"),
    (["--backend", "nope"], "backend must be llmctl, autoawq, gptqmodel, llmcompressor; got 'nope'"),
    (["--backend", "autoawq", "--method", "gptq"], "--backend autoawq runs --method awq, not gptq"),
    (["--samples", "100000"], "calibration data is too short"),
    (["--method", "fp8", "--bits", "8"], "--method fp8 takes no --bits: its weights are FP8"),
    (["--method", "fp8", "--group-size", "64"], "--method fp8 takes no --group-size"),
    (["--method", "fp8", "--asym"], "--method fp8 takes no --sym/--asym"),
    (["--method", "fp8", "--desc-act"], "--method fp8 takes no --desc-act"),
    (["--method", "fp8", "--damp-percent", "0.1"], "--method fp8 takes no --damp-percent"),
    (["--method", "fp8", "--format", "native"], "--method fp8 writes the compressed-tensors format"),
    (["--backend", "gptqmodel", "--method", "fp8"], "--backend gptqmodel runs --method gptq or awq, not fp8"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 needs --format compressed-tensors: the native AWQ GEMM "
                                  "format has no place for KV-cache scales"),
    (["--method", "gptq", "--kv-cache-dtype", "fp8"], "needs --format compressed-tensors: the native GPTQ v1"),
    (["--method", "fp8", "--kv-cache-dtype", "int8"], "--kv-cache-dtype must be auto or fp8, got 'int8'"),
    (["--method", "gptq", "--format", "compressed-tensors", "--kv-cache-dtype", "fp8", "--backend", "gptqmodel"],
     "--backend gptqmodel writes no KV-cache scales: --kv-cache-dtype fp8 runs with --backend llmctl or llmcompressor"),
])
def test_bad_options_fail_with_one_line(run, tiny_llama, tmp_path, args, message):
    result = run(tiny_llama, tmp_path / "out", "--seq-len", "32", "--samples", "4", *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_environment_setting_fp8_has_no_use_for_is_named(run, tiny_llama, tmp_path, monkeypatch):
    """A deployment's LLMCTL_QUANT_GROUP_SIZE (meant for its int4 jobs) is refused for fp8 naming the variable,
    so the user knows where the setting came from."""
    monkeypatch.setenv("LLMCTL_QUANT_GROUP_SIZE", "128")
    result = run(tiny_llama, tmp_path / "out", "--method", "fp8", "--samples", "4", "--seq-len", "32")
    assert result.exit_code == 1 and "takes no --group-size (or LLMCTL_QUANT_GROUP_SIZE)" in " ".join(result.output.split())


def test_fp8_writes_float_quantized_weights_and_the_same_report(run, tiny_llama, tmp_path):
    from llmctl.cli.console import NORMAL, set_verbosity

    set_verbosity(NORMAL)  # an earlier test's --output json left the shared console quiet
    out = tmp_path / "fp8"
    result = run(tiny_llama, out, "--method", "fp8", "--samples", "4", "--seq-len", "32", "--eval-windows", "1",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "fp8 via llmctl" in text and "held-out perplexity" in text and f"wrote {out}" in text
    assert ("compressed-tensors float-quantized: float8 weights, a scale per output channel; float8 activations "
            "per token at run time") in text
    report = json.loads((out / "quant_report.json").read_text())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert report["method"] == "fp8" and report["quantization_config"] == config
    assert config["format"] == "float-quantized" and config["ignore"] == ["lm_head"]
    assert all(0 < layer["error"] < 1e-2 for layer in report["layers"])  # measured on the calibration windows
    ppl = report["perplexity"]
    assert ppl["tokens"] == 255 and abs(ppl["after"] / ppl["before"] - 1) < 0.05

    doc = run(tiny_llama, tmp_path / "json", "--method", "fp8", "--samples", "2", "--seq-len", "32",
              "--eval-windows", "0", "--device", "cpu", "--output", "json")
    assert doc.exit_code == 0, doc.output
    parsed = json.loads(doc.stdout)
    assert parsed["method"] == "fp8" and parsed["perplexity"] is None and len(parsed["layers"]) == 2


@pytest.mark.parametrize("args", [["--method", "fp8"], ["--method", "rtn", "--format", "compressed-tensors"]])
def test_kv_cache_dtype_fp8_writes_scales_the_runtime_uses(run, tiny_llama, tmp_path, args):
    from llmctl.checkpoint.formats.compressed_tensors import fp8_kv_cache_scheme
    from llmctl.checkpoint.loader import read_tensors
    from llmctl.quantize.report import scheme_line
    from llmctl.runtime import LLM
    from llmctl.runtime.layers.attention import Attention

    out = tmp_path / "out"
    result = run(tiny_llama, out, *args, "--kv-cache-dtype", "fp8", "--seq-len", "32", "--samples", "4",
                 "--eval-windows", "0")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == fp8_kv_cache_scheme() and config["quant_method"] == "compressed-tensors"
    assert scheme_line(config).endswith("; float8 KV cache, calibrated k and v scales per layer")
    scales = {name: t for name, t in read_tensors(out) if name.endswith(("self_attn.k_scale", "self_attn.v_scale"))}
    assert len(scales) == 4 and all(t.dtype == torch.float16 and t.shape == (1,) and t.item() > 0
                                    for t in scales.values())  # the tiny model is fp16
    llm = LLM(str(out), dtype="float32", device="cpu", enforce_eager=True, kv_cache_dtype="fp8")
    used = [(m.k_scale, m.v_scale) for m in llm.engine.model_runner.model.modules() if isinstance(m, Attention)]
    assert used == [(scales[f"model.layers.{i}.self_attn.k_scale"].item(),
                     scales[f"model.layers.{i}.self_attn.v_scale"].item()) for i in range(2)]


def test_bad_directories_and_calibration_files(run, tiny_llama, tmp_path):
    assert "no model in" in run(tmp_path, tmp_path / "out").output
    legacy = tmp_path / "autogptq"  # AutoGPTQ's layout: the settings in quantize_config.json only
    legacy.mkdir()
    (legacy / "config.json").write_text((Path(tiny_llama) / "config.json").read_text())
    (legacy / "quantize_config.json").write_text('{"bits": 4, "group_size": 128}')
    result = run(legacy, tmp_path / "out")
    assert result.exit_code == 1 and "is already quantized (gptq, 4 bits)" in " ".join(result.output.split())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    result = run(tiny_llama, taken)
    assert result.exit_code == 1 and "exists and is not empty" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run(tiny_llama, tmp_path / "out", "--calib", empty)
    assert result.exit_code == 1 and "is empty" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(run, tiny_llama, tmp_path):
    result = run(tiny_llama, tmp_path / "out", "--device", "cuda")
    assert result.exit_code == 1 and "CUDA is not available" in result.output


def test_missing_peer_library_says_what_to_install(run, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "awq", None)  # import awq now fails as if it were not installed
    result = run(tiny_llama, tmp_path / "out", "--backend", "autoawq")
    assert result.exit_code == 1
    assert "--backend autoawq needs the autoawq package" in result.output and "pip install" in result.output


def test_quiet_prints_only_what_it_wrote(tiny_llama, tmp_path):
    from llmctl.cli.console import NORMAL, set_verbosity
    from llmctl.cli.main import app

    out = tmp_path / "q"
    try:
        result = CliRunner().invoke(app, ["-q", "quantize", str(tiny_llama), str(out), "--method", "rtn",
                                          "--group-size", "64", "--samples", "2", "--seq-len", "32",
                                          "--eval-windows", "0", "--device", "cpu"])
    finally:
        set_verbosity(NORMAL)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out}\n"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compressed_tensors_output_loads_in_transformers_and_in_llmctl(run, quant_model, tmp_path, dtype):
    """`--format compressed-tensors` writes what llm-compressor writes: transformers (through compressed-tensors)
    decompresses it to the same weights llmctl reads, in the model's own dtype (scales are fitted in it)."""
    pytest.importorskip("compressed_tensors")
    import transformers

    from llmctl.checkpoint.formats import dequantize_checkpoint, quantization_config
    from llmctl.checkpoint.loader import read_tensors

    src = quant_model(tmp_path / "src", dtype=getattr(torch, dtype))
    out = tmp_path / "ct"
    result = run(src, out, "--method", "gptq", "--format", "compressed-tensors", "--group-size", "32", "--asym",
                 "--samples", "4", "--seq-len", "32", "--eval-windows", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = quantization_config(out)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    from compressed_tensors.quantization.lifecycle.helpers import disable_quantization

    ours = dict(dequantize_checkpoint(read_tensors(out), config, torch.float32))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    theirs.apply(disable_quantization)
    theirs = theirs.float().eval()
    for name, tensor in theirs.state_dict().items():
        if name.endswith("proj.weight"):
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.arange(3, 40)[None]
    from llmctl.quantize.dense import dense_model

    with torch.no_grad():
        torch.testing.assert_close(dense_model(out)(input_ids=ids).logits, theirs(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)


def test_compressed_tensors_refuses_act_order_without_static_groups(run, tiny_llama, tmp_path):
    result = run(tiny_llama, tmp_path / "ct", "--method", "gptq", "--format", "compressed-tensors", "--desc-act",
                 "--samples", "4", "--seq-len", "32")
    assert result.exit_code == 1 and "stores no act-order groups" in result.output
