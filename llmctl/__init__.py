"""llmctl: from an LLM checkpoint to a measured production service."""

__version__ = "0.1.0"
