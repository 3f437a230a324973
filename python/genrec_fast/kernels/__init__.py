"""Attention backends: a fused CUDA kernel and the PyTorch reference, chosen by `backend=`."""
from .attention import attention, attention_reference, cuda_kernels_available

__all__ = ["attention", "attention_reference", "cuda_kernels_available"]
