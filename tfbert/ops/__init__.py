"""Fused custom ops (C++ CPU kernels, CUDA kernels when built with WITH_CUDA=1).

Each op module holds the fused op's Python API, its gradient registration and a pure-TF
reference implementation of the same computation (the fallback and the test oracle).
"""
