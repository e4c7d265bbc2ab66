"""The reference model that ships inside llmctl: a small Llama trained on the Python standard library.

Every command falls back to it when no model is given. Importing this module is cheap (no torch):
the CLI imports it to resolve its defaults.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
DATA_DIR = Path(__file__).resolve().parent / "data"

# What a model directory needs before transformers or llmctl's runtime can load it.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_path() -> Path:
    """The shipped model's directory; FileNotFoundError names what is missing and how to rebuild it."""
    missing = [name for name in REQUIRED_FILES if not (MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the reference model in {MODEL_DIR} is missing {', '.join(missing)}; "
            "rebuild it with `nox -s reference` or pass a model directory explicitly"
        )
    return MODEL_DIR
