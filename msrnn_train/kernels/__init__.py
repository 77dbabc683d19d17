"""Fast forms of `schedule.scan`: numba on the CPU (cpu_scan.py), Triton on CUDA (triton_scan.py).

Both run the same step loop over the same state; what they share (the rule numbers, `has_kernel`,
`start_state`) is in common.py, which they import instead of this module: here `default_scan`
picks one, importing them.
"""

from __future__ import annotations

import torch

from .common import H2O, SINKS, TOVA, WINDOW, has_kernel, start_state

__all__ = ["H2O", "SINKS", "TOVA", "WINDOW", "default_scan", "has_kernel", "start_state"]


def default_scan(device):
    """The scan implementation for a device: the Triton kernel on CUDA (kernels/triton_scan.py),
    the numba loop on the CPU (kernels/cpu_scan.py), the torch `scan` where neither is available.
    ``$MSRNN_SCAN`` = torch | numba | triton forces one (benchmarks, debugging). It lives here,
    not in schedule.py, so that the reference never imports its optimisations."""
    import os

    from ..schedule import scan

    forced = os.environ.get("MSRNN_SCAN", "").strip().lower()
    if forced not in ("", "torch", "numba", "triton"):
        raise ValueError(f"MSRNN_SCAN={forced!r}: use one of torch, numba, triton")
    if forced == "torch":
        return scan
    kind = torch.device(device).type
    if forced == "triton" or (not forced and kind == "cuda"):
        from .triton_scan import HAVE_TRITON, triton_scan

        if HAVE_TRITON:
            return triton_scan
    if forced == "numba" or (not forced and kind == "cpu"):
        from .cpu_scan import HAVE_NUMBA, fast_scan

        if HAVE_NUMBA:
            return fast_scan
    return scan
