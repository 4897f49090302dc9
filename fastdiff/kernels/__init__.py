"""Triton kernels of fastdiff, installed as the subpackage ``fastdiff.kernels``.

Importing this package (or its modules) imports ``triton``; callers that must work without Triton
catch the ``ImportError``. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).

Modules:
    philox  in-kernel Philox4x32-10 and Box-Muller helpers (noise stream spec v1, docs/design.md §3),
            a mirror of csrc/include/fastdiff/philox.h, for use inside other @triton.jit kernels.
    randn   host wrappers: ``randn(seeds, stream, shape, offset, dtype)`` and
            ``philox4x32_10(counter, key)`` (known-answer checks).
"""
