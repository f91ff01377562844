"""tfbert: BERT pretraining and fine-tuning at scale with TensorFlow 2, Horovod and fused ops."""

__version__ = "0.1.0"

import os as _os

# TensorFlow turns oneDNN on by default only on x86 CPUs with AVX-512 class features; without it
# the CPU allocator keeps no memory statistics, so the peak memory that every run and benchmark
# reports could not be measured on other CPUs (AMD EPYC without AVX-512, say). Asked for here,
# before TensorFlow is imported; a user's own TF_ENABLE_ONEDNN_OPTS wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
