"""`fused_on_cuda`: run a small elementwise function through torch.compile on CUDA tensors.

Norms in fp32, the DeltaNet conv taps, RoPE, SwiGLU and the cross-entropy's softmax are chains of
elementwise ops; eager PyTorch runs each as its own kernel over the whole tensor (forward and
backward), which made them a third of a `small` training step on an H200. Compiled, each chain is
one or two fused kernels. On CPU (tests, laptops) the same Python function runs eagerly, so the
eager function is both the reference and the CPU path. `compile_fusions(False)` (the trainer's
`trainer.compile_fusions=false`) runs them eagerly on CUDA too. For tests, the environment overrides
both: QWEN3NEXT_COMPILE=0 never compiles, QWEN3NEXT_COMPILE=always compiles on CPU too (inductor's
C++ backend), so that CPU tests can hold the compiled functions to their eager selves.
"""

import functools
import os

import torch

_enabled = True


def compile_fusions(enabled: bool) -> None:
    """Whether `fused_on_cuda` functions compile on CUDA tensors (default True)."""
    global _enabled
    _enabled = enabled


def compile_on(tensor: torch.Tensor) -> bool:
    mode = os.environ.get("QWEN3NEXT_COMPILE")  # a test override
    if mode is not None:
        return mode == "always" or (tensor.is_cuda and mode != "0")
    return tensor.is_cuda and _enabled


def fused_on_cuda(fn=None, *, dynamic: bool | None = False):
    """fn compiled on CUDA, as the module says. `dynamic=None` (torch.compile's automatic dynamic
    shapes) suits a function called eagerly at several shapes: after one recompilation its graph takes
    any size, where the default compiles a graph a shape."""
    if fn is None:
        return functools.partial(fused_on_cuda, dynamic=dynamic)
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        first = next(a for a in args if isinstance(a, torch.Tensor))
        # Inside a compiled decoder layer (Qwen3NextForCausalLM.compile_layers) dynamo traces fn itself.
        if torch.compiler.is_compiling() or not compile_on(first):
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=dynamic)
        return compiled(*args, **kwargs)

    wrapper.eager = fn
    return wrapper
