"""mlxpost's PyTorch backend (CUDA and CPU). Importing it imports torch."""

from torch_backend.backend import TorchBackend as Backend

__all__ = ["Backend"]
