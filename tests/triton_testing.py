"""Shared by the Triton kernel tests: their marks and device, and compile-only checks for sm_90.

The marks: the tests need triton (a GPU, or TRITON_INTERPRET=1, which tests/conftest.py sets without one).
Compile-only checks of Triton kernels for sm_90 without a GPU: a script runs a kernel's wrapper with
the kernel replaced by a recorder, then compiles each recorded launch to a cubin through Triton's own
argument binder, in a subprocess without TRITON_INTERPRET (the interpreter forgives what the compiler
does not). Exit code 77: this Triton build has no NVIDIA backend (or its internals moved): skip."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdiff

TRITON_MARKS = [
    pytest.mark.triton,
    pytest.mark.skipif(not fastdiff.backends()["triton"].available,
                       reason=f"triton: {fastdiff.backends()['triton'].reason}"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PROLOGUE = r'''
import sys
import torch
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
except Exception as e:  # no NVIDIA backend in this Triton build, or its internals moved
    print(f"skip: {type(e).__name__}: {e}")
    sys.exit(77)
calls = []


class Record:  # stands in for a kernel: records the wrapper's launch arguments
    def __init__(self, name=""):
        self.name = name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: calls.append((self.name, args, kwargs))


def compile_sm90(kernel, args, kwargs, kind="cubin"):
    """The cubin (or ``kind``: "ptx", "ttgir", ...) of one recorded launch of ``kernel`` (the JITFunction itself,
    not the recorder)."""
    if not hasattr(kernel, "_pack_args"):
        print("skip: JITFunction._pack_args is gone")
        sys.exit(77)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    assert compiled.asm["cubin"]
    return compiled.asm[kind]
'''


def run_script(body: str, tmp_path) -> str:
    """Runs PROLOGUE + body in a subprocess (no TRITON_INTERPRET); skips on exit 77; returns its stdout."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run([sys.executable, "-c", PROLOGUE + body], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
