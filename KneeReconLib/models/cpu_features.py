"""What the CPU can do fast, asked without importing PyTorch at module level (the inference path
imports this and must stay torch-free until a torch backend is chosen)."""
from __future__ import annotations


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16/AMX); elsewhere bf16 would be
    emulated and slower than fp32, so inference falls back to fp32
    and training to fp32 without autocast (on an AVX2-only EPYC, a 32x128x128 training step took
    75 s with bf16 autocast against 5 s in fp32)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
