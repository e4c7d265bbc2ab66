"""Calibration text sources, windows and the errors for data that cannot calibrate anything."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from llmctl.quantize.calibration import BUILTIN, load_texts, token_windows


class CharTokenizer:
    """One token per character, bos 0 / eos 1: windows can be checked by eye."""

    bos_token_id, eos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_builtin_set_ships_with_the_package():
    texts = load_texts(BUILTIN)
    assert len(texts) == 128 and all(len(t) > 1000 for t in texts)


def test_jsonl_text_and_gzip_files(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "alpha"}\n\n{"text": "beta", "id": 3}\n')
    assert load_texts(str(jsonl)) == ["alpha", "beta"]
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert load_texts(str(packed)) == ["alpha", "beta"]
    plain = tmp_path / "c.txt"
    plain.write_text("def f():\n    return 1\n")
    assert load_texts(str(plain)) == ["def f():\n    return 1\n"]


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ("  \n\n", "is empty"),
    ('{"text": "ok"}\n{"text": 3}\n', r"c.jsonl:2: each JSONL line needs a string field \"text\""),
    ('{"text": "ok"}\nnot json\n', "c.jsonl:2: not valid JSON"),
    ('{"text": ""}\n', "is empty"),
])
def test_bad_files_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_texts(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="calibration file not found"):
        load_texts(str(tmp_path / "nope.txt"))


def test_windows_frame_texts_and_spread_evenly():
    ids = token_windows(["abc", "de"], CharTokenizer(), samples=2, seq_len=3)
    # stream: 0 a b c 1 0 d e 1 -> windows [0 a b] [c 1 0] [d e 1]; 2 samples: the first and the last
    assert ids.tolist() == [[0, 97, 98], [100, 101, 1]]
    assert ids.dtype == torch.int64


def test_too_short_data_says_how_short():
    with pytest.raises(ValueError, match="too short: 5 tokens, less than one window of --seq-len 8"):
        token_windows(["abc"], CharTokenizer(), samples=1, seq_len=8)
    with pytest.raises(ValueError, match="make 3 windows of 3, but --samples asks for 4"):
        token_windows(["abc", "de"], CharTokenizer(), samples=4, seq_len=3)


def test_jsonl_record_must_be_an_object(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(["text"]) + "\n")
    with pytest.raises(ValueError, match="c.jsonl:1"):
        load_texts(str(path))


def test_heldout_windows_use_the_model_tokenizer_and_context(tiny_llama, tmp_path):
    from llmctl.quantize.calibration import heldout_windows

    ids = heldout_windows(tiny_llama, 3)
    assert ids.shape == (3, 256)  # the tiny model's max_position_embeddings
    assert ids[0, 0].item() == 0  # the first held-out file starts with <bos>
    config = json.loads((Path(tiny_llama) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "bos_token_id": None}))
    (tmp_path / "tokenizer.json").write_text((Path(tiny_llama) / "tokenizer.json").read_text())
    assert heldout_windows(tmp_path, 3) is None  # no <bos> to frame the files with: no perplexity
