"""Code the lessons truly share: runtime selection, timing, references, checks.

Import ``common.runtime`` (directly, or through any module here that needs it) before
numba or triton: it decides between the GPU and emulation. This package's ``__init__``
imports nothing, so ``common.cli`` can parse ``--cpu`` before the decision is made.
"""
