"""eqat-dist: EfficientQAT (Block-AP, E2E-QP) quantization, single GPU or distributed."""
__version__ = "0.1.0"
