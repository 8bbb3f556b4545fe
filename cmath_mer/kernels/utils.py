"""Helpers shared by the three Triton launchers: the device guard, the fp32 dot precision, the autocast rule
of the custom ops, and one compatibility shim for older Triton interpreters.

Imported only by the fused modules (it imports triton).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def interpreting() -> bool:
    """Read at call time: `python -m cmath_mer.kernels.aot` unsets TRITON_INTERPRET after this package is
    imported (the package __init__ imports this module) and before the kernel modules are."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------
# device guard (fla's `input_guard`): Triton launches on the *current* CUDA device, so tensors on cuda:1 with
# cuda:0 current would be read through the wrong context. Every launcher runs under the inputs' device.
# ----------------------------------------------------------------------------------------------------------
def device_context(device: torch.device):
    """The context that makes `device` current for a launch (nothing to do off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device())
    return contextlib.nullcontext()


def input_guard(fn):
    """Run `fn` with the device of its first tensor argument current (every Triton launcher is wrapped)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None:
            return fn(*args, **kwargs)
        with device_context(device):
            return fn(*args, **kwargs)
    return wrapper


def check_same_device(**tensors: torch.Tensor) -> None:
    """A clear error instead of a crash (or a wrong read) at launch: every tensor on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors of the op must live on one device; got {listed} "
                         "(move cu_seqlens with the batch: Batch.to(device))")


# ----------------------------------------------------------------------------------------------------------
# once-differentiable backward. The Triton backwards are kernels, not autograd graphs: a second derivative
# through them would silently be zero. torch.autograd.function.once_differentiable marks the gradients only
# when an incoming gradient requires grad; this marks them whenever the backward runs with create_graph=True,
# so a double backward through the op always raises (and a create_graph backward that never goes through
# the op twice still works).
# ----------------------------------------------------------------------------------------------------------
def same_device(a, b) -> bool:
    """Type and index: a seed on cuda:0 read by a kernel on cuda:1 is another device's pointer. A CUDA device
    named without an index is the current one (a tensor's .device always has its index)."""
    def indexed(d: torch.device) -> torch.device:
        d = torch.device(d)
        return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
    return indexed(a) == indexed(b)


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The variational seed as a (1,) int64 tensor on `device`, as the ops take it. A tensor is used as it
    is: its value may change between CUDA-graph replays (GraphedStepper writes it before each one).
    An int is filled in on the device (a fill kernel: no host-to-device copy, no synchronisation)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed: an int or a one-element int64 tensor, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)}")
        if not same_device(seed.device, device):
            raise ValueError(f"seed is on {seed.device} but the inputs are on {device}: the kernel would read "
                             "another device's memory; put the seed tensor on the inputs' device")
        return seed.reshape(1)
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def once_differentiable(backward):
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not create_graph:
            return outputs
        tensors = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)]
        if not tensors:
            return outputs
        err = torch._C._functions.DelayedError(
            f"{backward.__module__}: this op's backward is a Triton kernel and is differentiable once; a "
            "second derivative (trying to differentiate twice) through it is not supported", len(tensors))
        marked = err(*[outputs[i].detach().requires_grad_() for i in tensors])
        marked = marked if isinstance(marked, tuple) else (marked,)
        outputs = list(outputs)
        for i, m in zip(tensors, marked):
            outputs[i] = m
        return tuple(outputs)
    return wrapper


# ----------------------------------------------------------------------------------------------------------
# fp32 dot precision. On NVIDIA, Triton multiplies fp32 tl.dot operands in TF32 unless told otherwise, which
# is not fp32-accurate. Policy (docs/KERNELS.md): fp32 inputs give fp32-accurate results by default; TF32
# only when the user allows TF32 matmuls the PyTorch way: torch.backends.cuda.matmul.fp32_precision = "tf32" (or
# torch.backends.fp32_precision = "tf32", or the legacy torch.backends.cuda.matmul.allow_tf32 = True,
# torch.set_float32_matmul_precision("high")). The fp32-exact dot variants ("ieee" FMA dots, "tf32x3") spill
# registers in every tile config the AOT report tried, so on a GPU the kernels with tl.dot (attention,
# reconstruction) run fp32 inputs only when TF32 is allowed; otherwise those ops take the PyTorch reference
# (cuBLAS / SDPA in fp32). fp16/bf16 operands go to the tensor cores as they are (fp32 accumulation).
# ----------------------------------------------------------------------------------------------------------
def tf32_allowed() -> bool:
    """Whether cuBLAS fp32 matmuls may use TF32, read through torch's current API (fp32_precision, which also
    reflects the legacy setters and inherits torch.backends.fp32_precision). The legacy flag is read only on a
    torch without that API: since torch 2.9 reading it raises once TF32 was set the new way."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":                       # unset for matmul: the generic setting decides
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of the fp32 tl.dots: "tf32" on a GPU launch (only made when TF32 is allowed), "ieee"
    otherwise (the interpreter; float64). No effect on 16-bit operands."""
    if interpreting() or dtype == torch.float64:
        return "ieee"
    return "tf32"


def gpu_dots_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """May a kernel built on tl.dot run these inputs? Always under the interpreter (exact fp32 dots, the
    tests); on a GPU fp16/bf16, and fp32 only when TF32 is allowed."""
    if device.type != "cuda":
        return True
    if dtype in (torch.float16, torch.bfloat16):
        return True
    return dtype == torch.float32 and tf32_allowed()


# ----------------------------------------------------------------------------------------------------------
# autocast: a dispatcher rule registered with each custom op (torch.library.register_autocast casts to one
# fixed dtype; ours casts to whatever dtype the enclosing autocast region uses).
# ----------------------------------------------------------------------------------------------------------
_LIBS: list = []


def register_autocast_to_region_dtype(qualname: str, cast: tuple[int, ...], post=None) -> None:
    """In an autocast region (cuda or cpu), floating tensors at the positions `cast` (or in the lists there) are
    cast to the region's dtype (fp16/bf16) before the op runs with autocast off; `post(out)` may adjust the
    outputs (e.g. scalar losses returned in fp32). Both cast and op are recorded by autograd, as for any autocast op."""
    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")
    _LIBS.append(lib)
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in ("cuda", "cpu"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(_keyset, *args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            args = list(args)
            def to_region(a):
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == _device_type \
                        and a.dtype != torch.float64:
                    return a.to(dtype)
                return a
            for i in cast:                            # a Tensor[] argument (attention's sources) element-wise
                args[i] = [to_region(a) for a in args[i]] if isinstance(args[i], (list, tuple)) else to_region(args[i])
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                out = op(*args)
            return post(out) if post is not None else out

        lib.impl(name, kernel, key_name, with_keyset=True)


# ----------------------------------------------------------------------------------------------------------
# Triton 3.6's interpreter converts a scalar kernel argument used as a Python index (`range(S)`, loop bounds)
# with int() of a 1-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted
# to Python scalars"); later Triton squeezes first. The kernels are right (their sm_90 build is fine): this
# teaches an old interpreter the same conversion. Interpreter only; a no-op on Triton versions that squeeze.
# ----------------------------------------------------------------------------------------------------------
def patch_old_interpreter() -> None:
    """Called by each fused module when it is imported (never at this module's import, which may precede
    the AOT tool's unsetting of TRITON_INTERPRET)."""
    if not interpreting():
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_cmath_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._cmath_patched = True
    interpreter._patch_lang_tensor = patched


# ------------------------------------------------------------------------- ahead-of-time compile specs

def jit_function(fn):
    """The @triton.jit function under an autotuner or heuristics wrapper (what ASTSource compiles)."""
    import triton
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def divisible_by_16(names) -> dict:
    """tt.divisibility=16 for `names`, as the JIT specialises torch's 16-byte aligned pointers and strides that
    are multiples of 16 at launch ({arg: [[attr, value]]}, the format python -m cmath_mer.kernels.aot reads)."""
    return {n: [["tt.divisibility", 16]] for n in names}
