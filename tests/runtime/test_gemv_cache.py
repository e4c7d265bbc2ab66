"""Start-up GEMV choices kept between processes (`gemv_cache`): what is written is read back, merged with what
another process wrote; a missing, broken or unwritable file only costs a re-timing; `off` keeps none; the
file is per GPU and Triton version. On CUDA: a second start-up reads every choice instead of timing it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llmctl.runtime.kernels import gemv_cache
from llmctl.runtime.kernels.splitk import GemvConfig

W = torch.empty(12288, 4096)


def test_choices_round_trip_and_merge(tmp_path):
    file = tmp_path / "sub" / "gemv.json"
    assert gemv_cache.load(file) == {}
    one = {gemv_cache.name("dense", W, torch.float16, 1): GemvConfig(16, 512, 1, 4, 1),
           gemv_cache.name("dense", W.T, torch.bfloat16, 1): None}  # None: cuBLAS won
    gemv_cache.save(file, one)
    two = {gemv_cache.name("fp8", W, torch.float16, 4): GemvConfig(64, 256, 2, 4, 3, packed=False)}
    gemv_cache.save(file, two)  # another process's, added to the file's
    assert gemv_cache.load(file) == {**one, **two}
    assert list(one) == ["dense 12288x4096 float16 1", "dense 4096x12288 bfloat16 1"]


def test_a_broken_missing_or_unwritable_file_costs_only_a_retiming(tmp_path):
    broken = tmp_path / "gemv.json"
    for text in ("{", "[]", "null", b"\xff\xfe"):
        broken.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert gemv_cache.load(broken) == {}
    blocked = tmp_path / "file"
    blocked.write_text("")
    gemv_cache.save(blocked / "gemv.json", {"dense 1x1 float16 1": None})  # its folder is a file: no error
    assert gemv_cache.load(None) == {} and gemv_cache.save(None, {"x": None}) is None
    gemv_cache.save(Path("."), {"dense 1x1 float16 1": None})  # a name that is no file: no error either
    assert not list(tmp_path.rglob("*.tmp")), "a failed write leaves no temporary file"


def test_an_entry_that_is_no_configuration_is_left_out_and_the_rest_kept(tmp_path):
    file = tmp_path / "gemv.json"
    good = {"dense 1x1 float16 1": {"block_n": 16, "block_k": 512, "split_k": 3, "num_warps": 4, "num_stages": 1,
                                    "packed": False},
            "dense 2x1 float16 1": None}
    bad = [{"block_n": 8, "nope": 1}, {"block_n": "16", "block_k": 512}, {"block_n": 16, "block_k": 0},
           {"block_n": 24, "block_k": 512}, {"block_n": 16, "block_k": 512, "packed": "false"},
           {"block_n": 16, "block_k": 512, "num_warps": True}, [16, 512], 7]
    file.write_text(json.dumps({**good, **{f"dense {i + 3}x1 float16 1": v for i, v in enumerate(bad)}}))
    assert gemv_cache.load(file) == {"dense 1x1 float16 1": GemvConfig(16, 512, 3, 4, 1), "dense 2x1 float16 1": None}
    gemv_cache.save(file, {"dense 9x1 float16 1": None})  # what was readable survives the next save
    assert set(gemv_cache.load(file)) == {"dense 1x1 float16 1", "dense 2x1 float16 1", "dense 9x1 float16 1"}


def test_the_file_is_per_gpu_and_triton_and_can_be_turned_off(monkeypatch, tmp_path):
    import triton

    monkeypatch.setattr(gemv_cache, "gpu_name", lambda index: "NVIDIA H200")
    monkeypatch.delenv("LLMCTL_GEMV_CACHE", raising=False)
    default = gemv_cache.path(torch.device("cuda", 0))
    assert default.name == f"gemv-NVIDIA-H200-triton{triton.__version__}-{gemv_cache.VERSION}.json"
    monkeypatch.setenv("LLMCTL_GEMV_CACHE", str(tmp_path / "mine.json"))
    assert gemv_cache.path(torch.device("cuda", 0)) == tmp_path / "mine.json"
    for folder in (str(tmp_path), str(tmp_path / "new") + "/"):  # a folder: the default name inside it
        monkeypatch.setenv("LLMCTL_GEMV_CACHE", folder)
        assert gemv_cache.path(torch.device("cuda", 0)) == Path(folder) / default.name
    for off in ("off", "0", "none"):
        monkeypatch.setenv("LLMCTL_GEMV_CACHE", off)
        assert gemv_cache.path(torch.device("cuda", 0)) is None


def test_a_shipped_file_serves_its_gpu_and_the_cache_overrides_it(monkeypatch, tmp_path):
    monkeypatch.setattr(gemv_cache, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setattr(gemv_cache, "gpu_name", lambda index: "NVIDIA H200")
    monkeypatch.setenv("LLMCTL_GEMV_CACHE", str(tmp_path / "cache.json"))
    cuda = torch.device("cuda", 0)
    assert gemv_cache.known(cuda) == (tmp_path / "cache.json", {})
    ships = {"dense 4096x4096 float16 1": GemvConfig(8, 1024, 1, 4, 1), "dense 32000x4096 float16 1": None}
    gemv_cache.save(tmp_path / "shipped" / "NVIDIA-H200.json", ships)
    gemv_cache.save(tmp_path / "shipped" / "NVIDIA-H100-80GB-HBM3.json", {"dense 1x1 float16 1": None})
    assert gemv_cache.known(cuda)[1] == ships
    gemv_cache.save(tmp_path / "cache.json", {"dense 32000x4096 float16 1": GemvConfig(16, 512, 1, 4, 1)})
    assert gemv_cache.known(cuda)[1] == {**ships, "dense 32000x4096 float16 1": GemvConfig(16, 512, 1, 4, 1)}
    monkeypatch.setenv("LLMCTL_GEMV_CACHE", "off")
    assert gemv_cache.known(cuda) == (None, ships)


def test_the_shipped_files_are_choices_of_this_version():
    """Every shipped choice is one a start-up of this version could make: cuBLAS or a timed candidate for the
    one-row GEMV, a candidate for its rows or a shape default (`fp8_gemv.default_config`) for the FP8 GEMV."""
    from llmctl.runtime.kernels import dense_gemv, fp8_gemv, fp8_gemv_tune
    from llmctl.runtime.kernels.splitk import MAX_SPLIT

    splits = [1 << i for i in range(MAX_SPLIT.bit_length())]  # the defaults' splits: powers of two
    files = sorted(gemv_cache.SHIPPED.glob("*.json"))
    assert files, "a GEMV choices file ships for the GPUs we measure on (gpu.sh gemv-tune makes one)"
    for file in files:
        choices = gemv_cache.load(file)
        assert choices, file
        for key, cfg in choices.items():
            kind, _, _, rows = key.split()
            if kind == "dense":
                assert cfg is None or cfg in dense_gemv.CANDIDATES, (file, key)
                continue
            assert kind == "fp8" and cfg is not None, (file, key)
            base = fp8_gemv.default_config(int(rows), 4096, 4096, torch.device("cpu"))  # split 1 off CUDA
            default = dataclasses.replace(cfg, split_k=1) == base and cfg.split_k in splits
            assert cfg in fp8_gemv_tune.candidates(int(rows)) or default, (file, key, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="start-up timing needs CUDA weights")
def test_a_second_start_up_reads_the_choices_instead_of_timing(monkeypatch, tmp_path):
    from test_fp8_gemv import quantize_weight

    from llmctl.runtime.kernels import dense_gemv, fp8_gemv_tune

    monkeypatch.setenv("LLMCTL_GEMV_CACHE", str(tmp_path / "gemv.json"))
    monkeypatch.setattr(gemv_cache, "SHIPPED", tmp_path)  # none shipped
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16) * 0.02
    w8, s8 = quantize_weight(4096, 4096)
    for module in (dense_gemv, fp8_gemv_tune):
        monkeypatch.setattr(module, "_chosen", {})
    assert dense_gemv.pretune([w], torch.float16) == 1
    assert fp8_gemv_tune.pretune([(w8, s8)], torch.float16, 32) == 4
    first = (dense_gemv.chosen(w), [fp8_gemv_tune.chosen(m, w8, torch.float16) for m in (1, 4, 16, 32)])
    for module in (dense_gemv, fp8_gemv_tune):  # a new process
        monkeypatch.setattr(module, "_chosen", {})
    assert dense_gemv.pretune([w], torch.float16) == 0
    assert fp8_gemv_tune.pretune([(w8, s8)], torch.float16, 32) == 0
    assert (dense_gemv.chosen(w), [fp8_gemv_tune.chosen(m, w8, torch.float16) for m in (1, 4, 16, 32)]) == first
    # a choice read back that does not agree with the reference on this GPU (another Triton's build, say) is
    # timed again; dense_gemv's choice may be cuBLAS (None), which needs no check
    from llmctl.runtime.kernels import timing

    for module in (dense_gemv, fp8_gemv_tune):
        monkeypatch.setattr(module, "_chosen", {})
    monkeypatch.setattr(timing, "agrees", lambda run, cfg, want: False)
    assert dense_gemv.pretune([w], torch.float16) == (0 if first[0] is None else 1)
    assert fp8_gemv_tune.pretune([(w8, s8)], torch.float16, 32) == 4
