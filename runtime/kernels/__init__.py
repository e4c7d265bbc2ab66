"""Triton kernels of the runtime, each beside its plain-torch twin."""


def compiled_variants(kernel) -> int | None:
    """How many variants Triton holds compiled for a @triton.jit kernel, read from its in-memory cache (a
    Triton internal: None where this Triton keeps none). For checking that nothing compiles mid-run."""
    caches = getattr(kernel, "device_caches", None)
    return None if caches is None else sum(len(c[0]) for c in caches.values())
