"""Quantization: AWQ, GPTQ, RTN and their checkpoint formats."""
