"""efficientnet_tpu: large-batch EfficientNet training on TPU pods, GPUs and CPUs."""

__version__ = '0.1.0'
