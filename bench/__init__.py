"""Load generation against OpenAI-compatible servers."""
