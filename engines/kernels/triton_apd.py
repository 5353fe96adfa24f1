"""The fused APT op as ONE Triton kernel: ``y = o + rowmax(A) * (A @ V)``, ``A = ReLU(x_in @ K^T)``.

Layout: the batch is folded into rows, so ``x_in``/``o``/``y`` are ``[M, D]`` (M = B*n) and ``K``/``V`` are
``[P, D]``, all contiguous. One program owns ``BLOCK_M`` rows and ``BLOCK_N`` output columns:

1. for each tile of ``BLOCK_P`` prompts: ``S = x_in @ K_tile^T`` over the whole D (``BLOCK_K`` chunks),
   ``A = ReLU(S)`` in fp32;
2. the row max ``w`` is tracked as a running max over the prompt tiles; because ``w`` is one scalar per
   row it can be applied after the loop, so ``A @ V_tile`` accumulates unscaled in fp32;
3. ``y = o + w * acc``, stored in the input dtype.

Padding prompts and padding columns load as 0, so their A is ReLU(0) = 0, which changes neither the
sums nor the max (A >= 0 everywhere). fp32 inputs use IEEE fp32 dots (no TF32) so the kernel meets the
fp32 tolerance; fp16/bf16 inputs use tensor-core dots with fp32 accumulation.

The kernel's argument order (tensor inputs, int32 scalars, output) is the order TensorRT's AOT plugin
launch uses (inputs, extra scalar args, outputs), so the same kernel serves torch and TensorRT.
``triton`` and ``torch`` are imported lazily; :func:`kernel` returns the ``@triton.jit`` function.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError

log = logging.getLogger(__name__)

KERNEL_ARGS = ("x_ptr", "o_ptr", "k_ptr", "v_ptr", "M", "P", "D", "y_ptr")
"""Runtime arguments in launch order: 4 input pointers, 3 int32 scalars, 1 output pointer."""
SCALAR_ARGS = ("M", "P", "D")
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
INPUT_PRECISION = "ieee"
"""fp32 dots in IEEE fp32, never TF32 (TF32 would miss the fp32 tolerance); ignored for fp16/bf16 dots."""
AOT_MAX_SHARED_BYTES = 48 * 1024
MIN_AOT_TRITON = (3, 3)


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time tile sizes of one kernel variant (one TensorRT tactic)."""

    block_m: int
    block_n: int
    block_p: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def constexprs(self, dot_fp32: bool = False) -> dict[str, Any]:
        """Compile-time arguments; ``dot_fp32`` upcasts dot operands (only for Triton's CPU interpreter, whose
        bf16 ``tl.dot`` returns garbage in triton 3.9; GPU launches keep half-precision tensor-core dots)."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_P": self.block_p,
                "BLOCK_K": self.block_k, "INPUT_PRECISION": INPUT_PRECISION, "DOT_FP32": dot_fp32}


# Tactic table for the TensorRT plugin (tactic i+1 -> CONFIGS[i]); pick_config chooses among them for torch.
CONFIGS: tuple[KernelConfig, ...] = (
    KernelConfig(64, 128, 32, 32, num_warps=4, num_stages=2),   # half precision, many rows
    KernelConfig(32, 128, 32, 32, num_warps=4, num_stages=2),   # half precision, few rows
    KernelConfig(32, 64, 32, 32, num_warps=4, num_stages=1),    # fp32 (IEEE dots, register heavy)
    KernelConfig(16, 64, 32, 32, num_warps=4, num_stages=1),    # tiny batches (n = 1 decoding-like calls)
)


def source_path() -> Path:
    """This file; its bytes are part of the TensorRT engine cache key (a kernel change rebuilds engines)."""
    return Path(__file__)


def pick_config(m: int, dtype: str) -> KernelConfig:
    """Heuristic choice for a launch with ``m`` rows (torch path, and a JIT plugin tactic outside the table)."""
    if m <= 16:
        return CONFIGS[3]
    if dtype == "float32":
        return CONFIGS[2]
    return CONFIGS[0] if m >= 256 else CONFIGS[1]


def aot_config(dtype: str) -> KernelConfig:
    """The one kernel variant the AOT plugin bakes into an engine (rows are unknown at build time)."""
    return CONFIGS[2] if dtype == "float32" else CONFIGS[1]


@functools.cache
def kernel() -> Any:
    """The ``@triton.jit`` kernel (compiled lazily by triton; defined here so importing this module is cheap)."""
    import triton
    import triton.language as tl

    @triton.jit
    def approx_prompt_diffusion_kernel(
        x_ptr, o_ptr, k_ptr, v_ptr, M, P, D, y_ptr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < D
        row_off = rows.to(tl.int64) * D
        w = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            prompts = p0 + tl.arange(0, BLOCK_P)
            p_ok = prompts < P
            p_off = prompts.to(tl.int64) * D
            s = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                x = tl.load(x_ptr + row_off[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                kt = tl.load(k_ptr + p_off[None, :] + ks[:, None], mask=p_ok[None, :] & k_ok[:, None], other=0.0)
                if DOT_FP32:
                    x, kt = x.to(tl.float32), kt.to(tl.float32)
                s = tl.dot(x, kt, acc=s, input_precision=INPUT_PRECISION)
            a = tl.maximum(s, 0.0)
            w = tl.maximum(w, tl.max(a, axis=1))
            v = tl.load(v_ptr + p_off[:, None] + cols[None, :], mask=p_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a, v.to(tl.float32), acc=acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a.to(v.dtype), v, acc=acc, input_precision=INPUT_PRECISION)
        out_mask = row_ok[:, None] & col_ok[None, :]
        o = tl.load(o_ptr + row_off[:, None] + cols[None, :], mask=out_mask, other=0.0)
        y = o.to(tl.float32) + w[:, None] * acc
        tl.store(y_ptr + row_off[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)

    return approx_prompt_diffusion_kernel


def grid(m: int, d: int, config: KernelConfig) -> tuple[int, int]:
    return (-(-m // config.block_m), -(-d // config.block_n))


def approx_prompt_diffusion_triton(x_in: Any, o: Any, k: Any, v: Any, config: KernelConfig | None = None,
                                   out: Any | None = None) -> Any:
    """Run the fused kernel on torch tensors: ``x_in``, ``o`` ``[..., n, d]``; ``k``, ``v`` ``[p, d]``.

    Tensors must share one dtype (fp32/fp16/bf16) and live on a CUDA device, or on the CPU when
    ``TRITON_INTERPRET=1`` was set before triton was imported. Returns ``y`` shaped like ``o``
    (written into ``out`` when given: a contiguous tensor like ``o``, e.g. a TensorRT output buffer).
    """
    _check_inputs(x_in, o, k, v)
    d, p = o.shape[-1], k.shape[0]
    x2, o2 = x_in.reshape(-1, d).contiguous(), o.reshape(-1, d).contiguous()
    k2, v2 = k.contiguous(), v.contiguous()
    y = o2.new_empty(o2.shape) if out is None else _checked_out(out, o).view(o2.shape)
    m = x2.shape[0]
    if m == 0:
        return y.reshape(o.shape)
    dtype = str(o.dtype).removeprefix("torch.")
    cfg = config or pick_config(m, dtype)
    interpreted = x2.device.type == "cpu"
    launch_options = {} if interpreted else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel()[grid(m, d, cfg)](x2, o2, k2, v2, m, p, d, y, **cfg.constexprs(dot_fp32=interpreted and dtype == "bfloat16"), **launch_options)
    return y.reshape(o.shape)


def _checked_out(out: Any, o: Any) -> Any:
    if tuple(out.shape) != tuple(o.shape) or out.dtype != o.dtype or not out.is_contiguous() or out.device != o.device:
        raise ConfigError(f"out {tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})",
                          f"a contiguous {o.dtype} tensor of shape {tuple(o.shape)} on {o.device}", "allocate out like o")
    return out


def compile_for_aot(dtype: str, config: KernelConfig, target: Any = None) -> Any:
    """Compile the kernel to PTX for TensorRT's AOT plugin (``target`` None: the current GPU).

    Checks the contract TensorRT's AOT launch relies on: TensorRT passes exactly the 8 runtime arguments
    (inputs, M/P/D, output), so the kernel must need no Triton global/profile scratch buffer (the
    trailing pointer parameters Triton >= 3.3 appends are then never read), and its shared memory must
    fit the 48 KiB a launch gets without an opt-in attribute.
    """
    import triton
    from triton.compiler import ASTSource

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < MIN_AOT_TRITON:
        raise ConfigError(f"triton {triton.__version__}", "triton >= 3.3 for the AOT plugin (ASTSource constexprs API)",
                          "pip install -U triton, or build with the JIT plugin (mode='jit')")
    if dtype not in TRITON_DTYPES:
        raise ConfigError(f"plugin dtype {dtype!r}", f"one of {list(TRITON_DTYPES)}")
    constexprs = config.constexprs()
    signature = {n: (f"*{TRITON_DTYPES[dtype]}" if n.endswith("_ptr") else "i32") for n in KERNEL_ARGS}
    signature.update({n: "constexpr" for n in constexprs})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(ASTSource(kernel(), signature, constexprs=constexprs), target=target, options=options)
    _check_aot_contract(compiled.metadata)
    return compiled


def _check_aot_contract(metadata: Any) -> None:
    scratch = {k: getattr(metadata, k, 0) or 0 for k in ("global_scratch_size", "profile_scratch_size")}
    if any(scratch.values()) or metadata.shared > AOT_MAX_SHARED_BYTES:
        raise ConfigError(f"the compiled APT kernel needs scratch {scratch} and {metadata.shared} B shared memory",
                          f"no scratch buffers and at most {AOT_MAX_SHARED_BYTES} B shared memory (TensorRT AOT launch)",
                          "use smaller tiles in engines.kernels.triton_apd.CONFIGS or the JIT plugin (mode='jit')")


def _check_inputs(x_in: Any, o: Any, k: Any, v: Any) -> None:
    names = {"x_in": x_in, "o": o, "K": k, "V": v}
    dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in names.items()}
    if len(set(dtypes.values())) != 1 or dtypes["o"] not in TRITON_DTYPES:
        raise ConfigError(f"fused-op inputs with dtypes {dtypes}", f"one dtype for all four, one of {list(TRITON_DTYPES)}",
                          "cast x_in, o, K and V to the same floating dtype")
    if x_in.shape != o.shape or k.shape != v.shape or k.dim() != 2 or o.dim() < 2 or k.shape[1] != o.shape[-1]:
        raise ConfigError(f"fused-op shapes x_in {tuple(x_in.shape)}, o {tuple(o.shape)}, K {tuple(k.shape)}, V {tuple(v.shape)}",
                          "x_in and o [..., n, d], K and V [p, d] with the same d", "check the folded module's constants")
    if k.shape[0] == 0:
        raise ConfigError("fused op with p = 0 prompts", "at least one prompt row in K and V", "re-fold the model")
    devices = {str(t.device) for t in names.values()}
    if len(devices) != 1:
        raise ConfigError(f"fused-op inputs on devices {sorted(devices)}", "all four on one device", "move them with .to(device)")
