"""Limits of the kernels themselves and the names of the TiSSD's backends and paths, declared here once (the kernels,
the dispatcher, the model config and the CLI import them).

QUADRATIC_MAX_LEN: the quadratic TiSSD kernels (Triton, and CUDA's kTissdMaxLen in csrc/tissd_quadratic.cuh) hold a
whole sequence in one L x L tile, so the longest sequence they accept is 256.  The native CPU scan has no such
limit (it loops over steps); the torch backend's einsum form neither (it allocates L x L per sequence and head).
"""
QUADRATIC_MAX_LEN = 256

BACKENDS = ("auto", "triton", "cuda", "torch")          # the TiSSD's backends
PATHS = ("auto", "quadratic", "chunked", "reference")   # the TiSSD's paths
