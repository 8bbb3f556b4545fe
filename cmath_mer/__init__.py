"""cmath_mer: CMATH multimodal emotion recognition in conversation, with fused Triton kernels."""
__version__ = "0.1.0"
