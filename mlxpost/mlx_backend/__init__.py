"""mlxpost's MLX backend (Metal on Apple Silicon; CPU or CUDA builds elsewhere).

Importing it imports mlx.
"""

from mlxpost.mlx_backend.backend import MLXBackend as Backend

__all__ = ["Backend"]
