"""Checking a `device` argument before any work is done on it."""
from __future__ import annotations

import torch


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """`device` as a torch.device; a ValueError naming `name` for a string torch cannot parse, a device type
    other than cpu and cuda (mps, xpu, meta: the models and kernels here run on CPUs and CUDA GPUs only) or a
    CUDA device this process cannot use (torch built without CUDA, no GPU visible, an index past the GPUs)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected 'cpu', 'cuda' or 'cuda:N', got {str(device)!r} (genrec-fast runs on "
                         "CPUs and CUDA GPUs only)")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no CUDA GPU visible"
            raise ValueError(f"{name}: {str(device)!r} needs a CUDA GPU, but torch {torch.__version__} has none "
                             f"({why}); use 'cpu'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {str(device)!r}, but this process sees {torch.cuda.device_count()} GPU(s)")
    return d
