"""Benchmarks: one harness (``harness``) and one module per benchmark (``kernels``, ``train``,
``inference``, ``data``, ``demo``, and ``acceptance``, the GPU acceptance run over all of them)."""
