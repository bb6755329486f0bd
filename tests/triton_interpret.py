"""Run Triton kernel checks in a child process that interprets (or compiles) Triton, whatever this one does.

Triton decides between compiling and interpreting once, when it is first imported (TRITON_INTERPRET).
A test can therefore not switch the interpreter on for itself inside a pytest process that may already
have imported triton, and setting the variable for the whole process would leak into every later test.
`TritonProcess` keeps one spawned child with the variable set (or cleared) before anything in it
imports triton; a test hands it a function and gets back its result, or its exception re-raised here
with the child's traceback attached.

    def check_rms_norm(device: str, dtype: str) -> None:   # module level: sent by reference
        from kernels.triton.rmsnorm import rms_norm_triton  # triton is imported in the child only
        ...

    def test_rms_norm(triton_interpreter):                 # fixture in tests/conftest.py
        triton_interpreter.run(check_rms_norm, "cpu", "float16")

The function must be importable by its module and name (a module-level function of a test module or
any package), and must import triton (or kernels.triton.*) inside itself, never at module level.
Fixtures `triton_interpreter` (interprets: kernels run on CPU tensors) and `triton_compiler` (compiles,
e.g. for an offline check that kernels build for a GPU architecture) hold one child each per session.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _enter(interpret: bool) -> None:
    # Runs in the child before any task, so before anything there imports triton.
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before TRITON_INTERPRET could be set in the child.")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    # The interpreter runs kernel programs one after another in numpy: threads only contend for cores.
    import torch

    torch.set_num_threads(1)


class TritonProcess:
    def __init__(self, interpret: bool, timeout: float = 1800.0):
        self.interpret = interpret
        self.timeout = timeout
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_enter, initargs=(interpret,))

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result(timeout=self.timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
