"""tfbert: BERT pretraining and fine-tuning at scale with TensorFlow 2, Horovod and fused ops."""

__version__ = "0.1.0"
