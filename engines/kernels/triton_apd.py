"""The fused APT op as ONE Triton kernel: ``y = o + rowmax(A) * (A @ V)``, ``A = ReLU(x_in @ K^T)``.

Layout: the batch is folded into rows, so ``x_in``/``o``/``y`` are ``[M, D]`` (M = B*n) and ``K``/``V`` are
``[P, D]``, all contiguous. One program owns ``BLOCK_M`` rows and ALL ``D`` output columns:

1. ``S = x_in @ K^T`` for every prompt at once (``BLOCK_P`` = P rounded up to a power of two, at most
   :data:`MAX_PROMPTS`), reducing over D in ``BLOCK_K`` chunks; ``A = ReLU(S)`` and the row max ``w`` in fp32.
   ``A`` stays in registers: it is computed exactly once per row tile.
2. for each ``BLOCK_N`` tile of output columns: ``y = o + w * (A @ V_tile)`` (one dot over all prompts,
   fp32 accumulation), stored in the input dtype.

So the multiply-adds are the minimum ``2 M P D`` up to tile padding (:func:`dot_macs`). The previous
layout (a program per row tile AND column tile) recomputed ``A`` for every column tile: about 3.5x the
minimum at fp16 and 6.5x at fp32 for d = 768. The price is one program per row tile (no parallelism
over columns), and ``BLOCK_M * BLOCK_P`` fp32 accumulators per program, which :meth:`KernelConfig.fit`
keeps at or under :data:`S_BUDGET` (64 registers a thread at 4 warps) by shrinking ``BLOCK_M`` as P grows,
and ``BLOCK_K``/``BLOCK_N`` so each streamed ``K``/``V`` tile stays within :data:`TILE_BYTES` of shared
memory (the AOT launch gets 48 KiB).

Padding prompts and padding columns load as 0, so their A is ReLU(0) = 0, which changes neither the
sums nor the max (A >= 0 everywhere). fp32 inputs use IEEE fp32 dots (no TF32) so the kernel meets the
fp32 tolerance; fp16/bf16 inputs use tensor-core dots with fp32 accumulation.

The kernel's argument order (tensor inputs, int32 scalars, output) is the order TensorRT's AOT plugin
launch uses (inputs, extra scalar args, outputs), so the same kernel serves torch and TensorRT; the
grid is one-dimensional (:func:`grid`). ``triton`` and ``torch`` are imported lazily; :func:`kernel`
returns the ``@triton.jit`` function.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError

log = logging.getLogger(__name__)

KERNEL_ARGS = ("x_ptr", "o_ptr", "k_ptr", "v_ptr", "M", "P", "D", "y_ptr")
"""Runtime arguments in launch order: 4 input pointers, 3 int32 scalars, 1 output pointer."""
SCALAR_ARGS = ("M", "P", "D")
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
INPUT_PRECISION = "ieee"
"""fp32 dots in IEEE fp32, never TF32 (TF32 would miss the fp32 tolerance); ignored for fp16/bf16 dots."""
AOT_MAX_SHARED_BYTES = 48 * 1024
MIN_AOT_TRITON = (3, 3)
MAX_PROMPTS = 512
"""Largest P the kernel takes: A [BLOCK_M, P] lives in registers (an APT model's prompts are 1-200)."""
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
S_BUDGET = {"float32": 4096, "float16": 8192, "bfloat16": 8192}
"""Elements of S/A per program (BLOCK_M * BLOCK_P): at most 64 fp32 registers a thread at 4 warps; fp32 gets
half, because its IEEE (FMA) dot stages A through shared memory at 4 bytes an element."""
TILE_BYTES = 16 * 1024
"""Shared memory for one streamed K^T [BLOCK_K, BLOCK_P] or V [BLOCK_P, BLOCK_N] tile per pipeline stage."""
AOT_PTX_VERSION = 80
"""PTX ISA 8.0 (CUDA 12.0) for the AOT plugin's PTX, the oldest ISA with sm_90a: TensorRT 10.x (CUDA 12) hands
the PTX to the driver's JIT, and a CUDA 12.x driver refuses a newer ISA (CUDA_ERROR_UNSUPPORTED_PTX_VERSION),
while Triton 3.9 by default writes the ISA of its bundled CUDA 13 ptxas (9.x)."""


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def prompt_block(p: int) -> int:
    """BLOCK_P for ``p`` prompts: the next power of two, at least 16; refuses p > MAX_PROMPTS."""
    if not 1 <= p <= MAX_PROMPTS:
        raise ConfigError(f"fused kernel with p = {p} prompts", f"1 <= p <= {MAX_PROMPTS} (A [rows, p] is kept in registers)",
                          "use fewer prompts, or run the unfused op (apt-deploy build --no-plugin; torch-cuda use_triton=False)")
    return max(MIN_BLOCK, _pow2_at_least(p))


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time tile sizes of one kernel variant (one TensorRT tactic). ``block_m``/``block_n``/``block_k``
    are upper bounds; :meth:`fit` shrinks them for a given P and dtype and sets ``block_p``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    block_p: int = 0  # 0 until fitted to a prompt count

    def fit(self, p: int, dtype: str) -> KernelConfig:
        """The variant for ``p`` prompts of ``dtype``: S/A within S_BUDGET, each K/V tile within TILE_BYTES."""
        bp = prompt_block(p)
        tile = max(MIN_BLOCK, _pow2_at_most(TILE_BYTES // (bp * ITEMSIZE[dtype])))
        block_m = max(MIN_BLOCK, min(self.block_m, _pow2_at_most(S_BUDGET[dtype] // bp)))
        # fp32's FMA dot holds its operands in registers: spread a full S budget over 8 warps (no spills, sm_90)
        warps = 8 if dtype == "float32" and block_m * bp >= S_BUDGET[dtype] else self.num_warps
        return replace(self, block_p=bp, block_m=block_m, block_k=min(self.block_k, tile),
                       block_n=min(self.block_n, tile), num_warps=warps)

    def constexprs(self, dot_fp32: bool = False) -> dict[str, Any]:
        """Compile-time arguments; ``dot_fp32`` upcasts dot operands (only for Triton's CPU interpreter, whose
        bf16 ``tl.dot`` returns garbage in triton 3.9; GPU launches keep half-precision tensor-core dots)."""
        if not self.block_p:
            raise ConfigError("a kernel config without block_p", "a config fitted to the prompt count", "call config.fit(p, dtype)")
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_P": self.block_p,
                "BLOCK_K": self.block_k, "INPUT_PRECISION": INPUT_PRECISION, "DOT_FP32": dot_fp32}


# Tactic table for the TensorRT plugin (tactic i+1 -> CONFIGS[i], fitted to P); pick_config chooses for torch.
CONFIGS: tuple[KernelConfig, ...] = (
    KernelConfig(64, 128, 32, num_warps=8, num_stages=2),   # half precision, many rows
    KernelConfig(32, 128, 32, num_warps=4, num_stages=2),   # half precision, fewer rows (more programs)
    KernelConfig(32, 64, 32, num_warps=4, num_stages=1),    # fp32 (IEEE dots, register heavy)
    KernelConfig(16, 64, 32, num_warps=4, num_stages=1),    # up to a few thousand rows: more programs
)
MANY_ROWS, FEW_ROWS = 8192, 4096  # rows from which 64- / 32-row tiles still give >= ~128 programs


def source_path() -> Path:
    """This file; its bytes are part of the TensorRT engine cache key (a kernel change rebuilds engines)."""
    return Path(__file__)


def pick_config(m: int, dtype: str, p: int) -> KernelConfig:
    """Heuristic variant for a launch with ``m`` rows and ``p`` prompts (torch path, JIT tactic outside the table).

    One program per row tile, so rows decide the parallelism: 64-row tiles only from MANY_ROWS rows, 32-row
    tiles from FEW_ROWS, else 16-row tiles so that even ~2k rows give a large GPU ~128 programs."""
    if m >= MANY_ROWS and dtype != "float32":
        base = CONFIGS[0]
    elif m >= FEW_ROWS:
        base = CONFIGS[2] if dtype == "float32" else CONFIGS[1]
    else:
        base = CONFIGS[3]
    return base.fit(p, dtype)


def aot_config(dtype: str, p: int) -> KernelConfig:
    """The one kernel variant the AOT plugin bakes into an engine (rows are unknown at build time, P is not)."""
    return (CONFIGS[2] if dtype == "float32" else CONFIGS[1]).fit(p, dtype)


def dot_macs(m: int, p: int, d: int, config: KernelConfig) -> int:
    """Multiply-adds the launch issues in ``tl.dot`` (padding included): per row tile, S over the D chunks
    and A @ V over the column tiles; the minimum is ``2 * m * p * d``."""
    cfg = config if config.block_p else config.fit(p, "float32")
    rows = -(-m // cfg.block_m) * cfg.block_m
    return rows * cfg.block_p * (-(-d // cfg.block_k) * cfg.block_k + -(-d // cfg.block_n) * cfg.block_n)


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
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        row_off = rows * D  # int32: the launcher refuses M * D >= 2**31
        prompts = tl.arange(0, BLOCK_P)
        p_ok = prompts < P
        p_off = prompts * D
        # 1. S = x_in K^T for every prompt, once per row tile
        s = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            x = tl.load(x_ptr + (row_off[:, None] + ks[None, :]), mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            kt = tl.load(k_ptr + (p_off[None, :] + ks[:, None]), mask=p_ok[None, :] & k_ok[:, None], other=0.0)
            if DOT_FP32:
                x, kt = x.to(tl.float32), kt.to(tl.float32)
            s = tl.dot(x, kt, acc=s, input_precision=INPUT_PRECISION)
        a = tl.maximum(s, 0.0)
        w = tl.max(a, axis=1)
        if DOT_FP32:
            a_op = a
        else:
            a_op = a.to(y_ptr.dtype.element_ty)
        # 2. every output column tile reuses A: y = o + w * (A V_tile)
        for n0 in range(0, D, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < D
            v = tl.load(v_ptr + (p_off[:, None] + cols[None, :]), mask=p_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                v = v.to(tl.float32)
            e = tl.dot(a_op, v, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
            out_mask = row_ok[:, None] & col_ok[None, :]
            out_off = row_off[:, None] + cols[None, :]
            o = tl.load(o_ptr + out_off, mask=out_mask, other=0.0)
            y = o.to(tl.float32) + w[:, None] * e
            tl.store(y_ptr + out_off, y.to(y_ptr.dtype.element_ty), mask=out_mask)

    return approx_prompt_diffusion_kernel


def grid(m: int, config: KernelConfig) -> tuple[int]:
    """One program per row tile (each owns all D columns)."""
    return (-(-m // config.block_m),)


def approx_prompt_diffusion_triton(x_in: Any, o: Any, k: Any, v: Any, config: KernelConfig | None = None,
                                   out: Any | None = None) -> Any:
    """Run the fused kernel on torch tensors: ``x_in``, ``o`` ``[..., n, d]``; ``k``, ``v`` ``[p, d]``.

    Tensors must share one dtype (fp32/fp16/bf16) and live on a CUDA device, or on the CPU when
    ``TRITON_INTERPRET=1`` was set before triton was imported. ``config`` (tile upper bounds) is fitted to
    P; None picks one. Returns ``y`` shaped like ``o`` (written into ``out`` when given: a contiguous
    tensor like ``o``, e.g. a TensorRT output buffer).
    """
    _check_inputs(x_in, o, k, v)
    d, p = o.shape[-1], k.shape[0]
    x2, o2 = x_in.reshape(-1, d).contiguous(), o.reshape(-1, d).contiguous()
    k2, v2 = k.contiguous(), v.contiguous()
    y = o2.new_empty(o2.shape) if out is None else _checked_out(out, o).view(o2.shape)
    m = x2.shape[0]
    if m == 0:
        return y.reshape(o.shape)
    if max(m, p) * d >= 2**31:
        raise ConfigError(f"fused kernel with {m} rows x d = {d}", "rows * d < 2**31 (the kernel's offsets are int32)",
                          "run the batch in smaller pieces")
    dtype = str(o.dtype).removeprefix("torch.")
    cfg = config.fit(p, dtype) if config else pick_config(m, dtype, p)
    interpreted = x2.device.type == "cpu"
    launch_options = {} if interpreted else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel()[grid(m, cfg)](x2, o2, k2, v2, m, p, d, y, **cfg.constexprs(dot_fp32=interpreted and dtype == "bfloat16"),
                           **launch_options)
    return y.reshape(o.shape)


def _checked_out(out: Any, o: Any) -> Any:
    if tuple(out.shape) != tuple(o.shape) or out.dtype != o.dtype or not out.is_contiguous() or out.device != o.device:
        raise ConfigError(f"out {tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})",
                          f"a contiguous {o.dtype} tensor of shape {tuple(o.shape)} on {o.device}", "allocate out like o")
    return out


def compile_for_aot(dtype: str, config: KernelConfig, target: Any = None, ptx_version: int | None = AOT_PTX_VERSION) -> Any:
    """Compile the kernel to PTX for TensorRT's AOT plugin (``target`` None: the current GPU).

    ``config`` must be fitted (:meth:`KernelConfig.fit`). The PTX declares ISA ``ptx_version`` (default
    :data:`AOT_PTX_VERSION`, loadable by every CUDA 12 driver; None: triton's default). Checks the
    contract TensorRT's AOT launch relies on: TensorRT passes exactly the 8 runtime arguments (inputs,
    M/P/D, output), so the kernel must need no Triton global/profile scratch buffer (the trailing pointer
    parameters Triton >= 3.3 appends are then never read), and its shared memory must fit the 48 KiB a
    launch gets without an opt-in attribute.
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
    options: dict[str, Any] = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(ASTSource(kernel(), signature, constexprs=constexprs), target=target, options=options)
    _check_aot_contract(compiled.metadata)
    return compiled


def ptx_isa_version(ptx: str) -> tuple[int, int]:
    """The ``.version MAJOR.MINOR`` a PTX module declares (what the driver's JIT checks)."""
    import re

    found = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, flags=re.MULTILINE)
    if not found:
        raise ConfigError("PTX without a .version line", "PTX text from triton.compile")
    return int(found.group(1)), int(found.group(2))


def _check_aot_contract(metadata: Any) -> None:
    scratch = {k: getattr(metadata, k, 0) or 0 for k in ("global_scratch_size", "profile_scratch_size")}
    if any(scratch.values()) or metadata.shared > AOT_MAX_SHARED_BYTES:
        raise ConfigError(f"the compiled APT kernel needs scratch {scratch} and {metadata.shared} B shared memory",
                          f"no scratch buffers and at most {AOT_MAX_SHARED_BYTES} B shared memory (TensorRT AOT launch)",
                          "fp32 AOT plugins take at most 256 prompts: export fp16/bf16, use the JIT plugin (mode='jit') or --no-plugin")


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
