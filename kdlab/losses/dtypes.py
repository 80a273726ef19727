"""The precision kdlab's objectives compute in: at least float32, float64 kept (the float64 parity tests)."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """float32 for half-precision values (a softmax in bf16 loses the tail); float64 stays float64 (the parity tests)."""
    return x.to(wide_dtype(x.dtype))


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kdlab's objectives compute in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)
