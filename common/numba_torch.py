"""Torch tensors into Numba kernels, without copies: the bridge the Numba lessons share.

The lessons keep their data in torch tensors (one reference, one way to check), and
launch Numba kernels on them:

* :func:`kernel_array` - on a GPU, a zero-copy device-array view through
  ``__cuda_array_interface__``; ``sync=False`` because we launch on torch's own stream
  (next function), so the work stays ordered without a host synchronization per call.
  Under the simulator, the NumPy view of the CPU tensor (shares its memory).
* :func:`torch_stream` - torch's current CUDA stream as a Numba stream (cached per
  stream), so a Numba kernel is ordered with the torch work around it, also inside
  ``torch.cuda.stream(...)`` blocks and CUDA-graph capture. 0 (the simulator's only
  stream) under emulation.
"""

from __future__ import annotations

from common import runtime  # before numba: selects the simulator when there is no GPU

import torch  # noqa: E402
from numba import cuda  # noqa: E402

_streams: dict[int, object] = {}


def kernel_array(t: torch.Tensor):
    """A tensor as a Numba kernel argument, sharing its memory (no copy)."""
    t = t.detach()
    if runtime.is_emulated():
        return t.numpy()
    return cuda.as_cuda_array(t, sync=False)


def torch_stream():
    """torch's current stream as a Numba stream (0 under emulation)."""
    if runtime.is_emulated():
        return 0
    ptr = torch.cuda.current_stream().cuda_stream
    if ptr not in _streams:
        _streams[ptr] = cuda.external_stream(ptr)
    return _streams[ptr]
