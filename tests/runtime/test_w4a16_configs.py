"""Tuned W4A16 files: what they hold, which GPU and kernels they apply to, and (on a GPU) that the runtime
uses a file's choice without timing anything, checks it first, and times a bucket whose choice fails."""

from __future__ import annotations

import json

import pytest
import torch
from test_w4a16 import DEVICE, check, packed  # (its random packed weights and reference check)

from llmctl.runtime.kernels.w4a16 import Config, configs
from llmctl.runtime.kernels.w4a16 import dispatch as w4a16_dispatch


@pytest.fixture
def files(tmp_path, monkeypatch):
    """No shipped files, no user cache, an empty process: only what the test writes applies."""
    monkeypatch.setattr(configs, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setenv("LLMCTL_W4A16_CACHE", "off")
    monkeypatch.delenv("LLMCTL_W4A16_CONFIGS", raising=False)
    for name, empty in (("_tuned", {}), ("_from_files", {}), ("_disk_loaded", set())):
        monkeypatch.setattr(w4a16_dispatch, name, empty)
    return tmp_path


def test_a_tuned_file_round_trips_and_applies_only_to_its_gpu_and_kernels(files, monkeypatch):
    choices = {"4096x12288:g128:seq:float16:m1": Config("gemv_h2", 1, 64, 128, 4, 4, 1),
               "4096x12288:g128:seq:float16:m64": Config("tiled", 64, 128, 64, 2, 4, 3)}
    configs.write_tuned(files / "h200.json", "NVIDIA H200", choices)
    configs.write_tuned(files / "h100.json", "NVIDIA H100 80GB HBM3", {"k:m1": Config("dense")})
    assert configs.read_tuned(files / "h200.json") == ("NVIDIA H200", configs.KERNELS_VERSION, choices)
    monkeypatch.setenv("LLMCTL_W4A16_CONFIGS", str(files / "h200.json") + ":" + str(files / "h100.json"))
    assert configs.tuned_for("NVIDIA H200") == choices
    assert configs.tuned_for("NVIDIA A100-SXM4-80GB") == {}
    old = json.loads((files / "h200.json").read_text())
    old["kernels_version"] -= 1  # made for older kernels: their blocks may mean something else now
    (files / "h200.json").write_text(json.dumps(old))
    assert configs.tuned_for("NVIDIA H200") == {}


def test_folders_are_searched_and_a_broken_file_is_named(files, monkeypatch):
    (files / "baked").mkdir()
    configs.write_tuned(files / "baked" / "a.json", "GPU X", {"k:m1": Config("dense")})
    configs.SHIPPED.mkdir()
    configs.write_tuned(configs.SHIPPED / "x.json", "GPU X", {"k:m1": Config("gemv", 1, 64, 128), "k:m2": Config("dense")})
    monkeypatch.setenv("LLMCTL_W4A16_CONFIGS", str(files / "baked"))
    assert configs.tuned_for("GPU X") == {"k:m1": Config("dense"), "k:m2": Config("dense")}  # baked over shipped
    (files / "baked" / "b.json").write_text('{"gpu": "GPU X"}')
    with pytest.raises(ValueError, match=r"b\.json is not a W4A16 tuned file"):
        configs.tuned_for("GPU X")


def test_the_shipped_files_are_tuned_files_for_these_kernels():
    shipped = sorted(configs.SHIPPED.glob("*.json"))
    for path in shipped:
        gpu, version, choices = configs.read_tuned(path)
        assert version == configs.KERNELS_VERSION, f"{path.name} was tuned for other kernels: tune it again"
        assert choices and all(c.kind in w4a16_dispatch.PATHS for c in choices.values())


def test_the_kinds_a_choice_may_name_are_the_kernels_dispatch_launches():
    from llmctl.runtime.kernels.w4a16.common import KINDS

    assert set(KINDS) == set(w4a16_dispatch.PATHS)


def test_a_user_cache_that_is_not_one_is_ignored(files):
    (files / "cache.json").write_text("[1, 2]")
    assert configs.read_cache(files / "cache.json") == {}
    assert configs.read_cache(files / "missing.json") == {}


def test_choices_of_kernels_that_no_longer_exist_are_timed_again(files):
    """An earlier release tuned `tiled_b` (removed: never the fastest on an H100, wrong on the GPU): a cache or
    tuned file naming it keeps its other choices, and that bucket is timed again."""
    keep = Config("tiled", 16, 64, 128, 2, 4, 3)
    stale = {"k:m1": vars(keep), "k:m16": {**vars(keep), "kind": "tiled_b", "block_m": 64}}
    (files / "cache.json").write_text(json.dumps(stale))
    assert configs.read_cache(files / "cache.json") == {"k:m1": keep}
    (files / "old.json").write_text(json.dumps({"gpu": "GPU X", "kernels_version": configs.KERNELS_VERSION,
                                                "configs": stale}))
    assert configs.read_tuned(files / "old.json")[2] == {"k:m1": keep}


@pytest.mark.gpu
def test_pretune_takes_a_tuned_file_without_timing_and_times_what_fails(files, monkeypatch):
    a = packed("gptq-asym", 1024, 512, 128)
    gpu = configs.gpu_name()
    good = {w4a16_dispatch._key_for(m, a, torch.float16): Config("dense") for m in (1, 2, 4, 8, 16)}
    bad = w4a16_dispatch._key_for(32, a, torch.float16)
    good[bad] = Config("tiled", 16, 64, 96, 1)  # a block that no group of 128 fits: fails its check
    configs.SHIPPED.mkdir()
    configs.write_tuned(configs.SHIPPED / "gpu.json", gpu, good)
    timed = []
    real_tune = w4a16_dispatch.tune
    monkeypatch.setattr(w4a16_dispatch, "tune", lambda x, w, bias=None: timed.append(x.shape[0]) or real_tune(x, w, bias))
    assert w4a16_dispatch.pretune([a], torch.float16, 32) == 1
    assert timed == [32]
    assert w4a16_dispatch.choose(torch.randn(3, 1024, device=DEVICE).half(), a) == Config("dense")
    for m in (1, 3, 32):
        x = torch.randn(m, 1024, device=DEVICE).half()
        check(w4a16_dispatch.w4a16_linear(x, a), x, a)


@pytest.mark.gpu
def test_a_bucket_met_while_compiling_ahead_is_neither_timed_nor_kept(files, monkeypatch):
    """compiling.ahead runs a forward whose kernels only compile: outputs are garbage, so no choice is made."""
    from llmctl.runtime.kernels import compiling

    a = packed("gptq-asym", 1024, 512, 128)
    monkeypatch.setattr(w4a16_dispatch, "tune", lambda *args, **kwargs: pytest.fail("timed while warming"))
    x = torch.randn(5, 1024, device=DEVICE).half()
    with compiling.warming():
        assert w4a16_dispatch.choose(x, a) == w4a16_dispatch.heuristic(5, a)
    assert not w4a16_dispatch._tuned


@pytest.mark.gpu
def test_tune_all_times_every_bucket_whatever_the_files_hold(files):
    a = packed("awq", 512, 256, 64)
    configs.SHIPPED.mkdir()
    configs.write_tuned(configs.SHIPPED / "gpu.json", configs.gpu_name(),
                        {w4a16_dispatch._key_for(1, a, torch.float16): Config("dense")})
    made = w4a16_dispatch.tune_all([a], torch.float16, 4)
    assert sorted(made) == sorted(w4a16_dispatch._key_for(m, a, torch.float16) for m in (1, 2, 4))
    configs.write_tuned(files / "new.json", configs.gpu_name(), made)
    assert configs.read_tuned(files / "new.json")[2] == made


# -- start-up: every configuration compiled in parallel first -----------------------------------------


def test_warming_compiles_instead_of_launching():
    from llmctl.runtime.kernels.compiling import start, warming

    class Kernel:
        def __init__(self):
            self.calls = []

        def warmup(self, *args, grid, **kwargs):
            self.calls.append(("compile", grid, args, kwargs))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append(("launch", grid, args, kwargs))

    kernel = Kernel()
    start(kernel, (2, 1), 7, BLOCK=16)
    with warming():
        start(kernel, (3, 1), 8, BLOCK=32)
    start(kernel, (4, 1), 9, BLOCK=64)
    assert kernel.calls == [("launch", (2, 1), (7,), {"BLOCK": 16}), ("compile", (3, 1), (8,), {"BLOCK": 32}),
                            ("launch", (4, 1), (9,), {"BLOCK": 64})]


def test_precompile_submits_each_untuned_buckets_launches_while_warming(files, monkeypatch):
    """Under Triton's AsyncCompileMode and `warming`: every candidate but the dense path for a bucket nothing
    holds, a tuned file's choice alone where it has one, nothing for a bucket already chosen; everything with
    retune. Without AsyncCompileMode (older Triton) or a second core it does nothing."""
    from llmctl.runtime.kernels import compiling

    entered = []

    class Mode:
        def __init__(self, pool, ignore_errors=False):
            entered.append(ignore_errors)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    launched = []

    def path(kind):
        return lambda x, w, bias, cfg: launched.append((x.shape[0], cfg, compiling._warming.get()))

    w = packed("gptq-asym", 256, 64, 128)
    monkeypatch.setattr(compiling.triton, "AsyncCompileMode", Mode, raising=False)
    monkeypatch.setattr(compiling.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(w4a16_dispatch, "PATHS", {kind: path(kind) for kind in w4a16_dispatch.PATHS})
    m4 = w4a16_dispatch._key_for(4, w, torch.float16)
    w4a16_dispatch._tuned[w4a16_dispatch._key_for(1, w, torch.float16)] = Config("gemv_h2")  # m1: already chosen
    w4a16_dispatch._from_files[m4] = Config("tiled", 16, 64, 128, 2, 4, 3)  # m4: a tuned file's choice

    assert w4a16_dispatch.precompile([w], torch.float16, 8) == len(launched) and entered == [True]
    want = [(2, c) for c in w4a16_dispatch.candidates(2, w)] + [(4, Config("tiled", 16, 64, 128, 2, 4, 3))] + \
        [(8, c) for c in w4a16_dispatch.candidates(8, w)]
    assert [(m, cfg) for m, cfg, _ in launched] == [(m, c) for m, c in want if c.kind != "dense"]
    assert all(warm for _, _, warm in launched) and not compiling._warming.get()

    launched.clear()
    w4a16_dispatch.precompile([w], torch.float16, 8, retune=True)
    assert [m for m, _, _ in launched].count(1) == len(w4a16_dispatch.candidates(1, w))
    assert [m for m, _, _ in launched].count(4) == len(w4a16_dispatch.candidates(4, w))

    monkeypatch.setattr(compiling.os, "cpu_count", lambda: 1)
    assert w4a16_dispatch.precompile([w], torch.float16, 8) == 0
    monkeypatch.delattr(compiling.triton, "AsyncCompileMode", raising=False)
    monkeypatch.setattr(compiling.os, "cpu_count", lambda: 4)
    assert w4a16_dispatch.precompile([w], torch.float16, 8) == 0


def test_tuning_times_everything_briefly_then_the_fastest_four_again(files, monkeypatch):
    """The first round (short budget) only picks finalists; the full-budget round among them decides, so a
    candidate that looked fastest by noise loses to the truly fastest finalist. None that agrees: dense."""
    w = packed("gptq-asym", 256, 64, 128)
    cands = [Config("tiled", 16, 64, 128, split) for split in (1, 2, 3, 4, 5, 6)]
    quick = {1: 1.0, 2: 5.0, 3: 2.0, 4: 3.0, 5: 4.0, 6: 9.0}  # split: short-budget ms (6 is last)
    full = {1: 3.0, 3: 2.5, 4: 1.5, 5: 4.0}  # ... and full-budget ms of the four finalists
    timed = []

    def graph_ms(fn, warmup=2, rep=8):
        fn()  # the candidate's own launch: it tells which one this is
        split = launched[-1].split_k
        timed.append((split, rep))
        return quick[split] if rep == w4a16_dispatch.QUICK_MS else full[split]

    launched = []
    monkeypatch.setattr(w4a16_dispatch, "candidates", lambda m, w, dtype: cands)
    monkeypatch.setattr(w4a16_dispatch, "agrees", lambda cfg, x, w, bias, want: True)
    monkeypatch.setattr(w4a16_dispatch, "graph_ms", graph_ms)
    monkeypatch.setattr(w4a16_dispatch, "PATHS", dict(w4a16_dispatch.PATHS, tiled=lambda x, w, b, cfg: launched.append(cfg)))
    x = torch.randn(16, 256, device=DEVICE).half()
    assert w4a16_dispatch.tune(x, w).split_k == 4
    assert sorted(s for s, rep in timed if rep != w4a16_dispatch.QUICK_MS) == [1, 3, 4, 5]
    assert len([s for s, rep in timed if rep == w4a16_dispatch.QUICK_MS]) == 6

    monkeypatch.setattr(w4a16_dispatch, "agrees", lambda cfg, x, w, bias, want: False)
    assert w4a16_dispatch.tune(x, w) == Config("dense")
