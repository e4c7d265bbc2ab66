"""`llmctl bench kernels --tune --save`: its refusals, and the int4 shapes it reads from a model's config
(the tuning itself needs a GPU: tests/runtime/test_w4a16_configs.py)."""

from __future__ import annotations

import json

import pytest
import torch

from llmctl.bench.w4a16_tune import LLAMA2_7B, LLAMA3_8B, model_shapes


@pytest.mark.parametrize(("args", "message"), [
    (["--save", "x.json"], "--tune and --save go together"),
    (["--tune"], "--tune and --save go together"),
    (["--dtype", "bfloat16"], "add --tune --save FILE"),
    (["--tune", "--save", "x.json", "--dtype", "int8"], "--dtype must be float16 or bfloat16"),
])
def test_tune_refusals_name_the_option(run_bench, args, message):
    result = run_bench("kernels", *args)
    assert result.exit_code != 0 and message in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_tune_needs_a_gpu(run_bench, tmp_path):
    result = run_bench("kernels", "--tune", "--save", tmp_path / "x.json")
    assert result.exit_code != 0 and "needs a CUDA GPU" in result.output
    assert not (tmp_path / "x.json").exists()


def write_config(path, **fields) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(fields))
    return str(path)


def test_model_shapes_are_the_runtime_s_fused_projections(tmp_path):
    llama2 = write_config(tmp_path / "l2", hidden_size=4096, num_attention_heads=32, intermediate_size=11008)
    assert model_shapes(llama2) == (sorted(LLAMA2_7B), 128, False)
    llama3 = write_config(tmp_path / "l3", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=14336, quantization_config={"group_size": 64, "desc_act": False})
    assert model_shapes(llama3) == (sorted(LLAMA3_8B), 64, False)


def test_act_order_tunes_each_module_and_moe_leaves_its_experts_out(tmp_path):
    act = write_config(tmp_path / "act", hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                       intermediate_size=6144, quantization_config={"group_size": 128, "desc_act": True})
    assert model_shapes(act) == (sorted({(2048, 2048), (2048, 512), (2048, 2048), (2048, 6144), (6144, 2048)}), 128, True)
    moe = write_config(tmp_path / "moe", text_config={"hidden_size": 2048, "num_attention_heads": 32,
                       "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "num_experts": 128})
    assert model_shapes(moe) == ([(2048, 5120), (4096, 2048)], 128, False)


def test_a_config_without_a_decoder_s_fields_is_named(tmp_path):
    with pytest.raises(ValueError, match="has no hidden_size"):
        model_shapes(write_config(tmp_path / "bad", model_type="bert"))
    with pytest.raises(ValueError, match="cannot read"):
        model_shapes(tmp_path / "missing")
