"""Settings and tolerances: frozen dataclasses with their defaults in one module (pure Python).

Tolerances are data, declared once with the reason, and printed in every parity failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Declared once; every parity check in code and tests uses these.
TOLERANCES: dict[str, Tolerance] = {
    # fused op (torch / ONNX function body) vs the float64 numpy reference, fp32 inputs
    "fused_op_vs_reference": Tolerance(1e-5, 0.0, "fp32 GEMM accumulation order vs float64 reference"),
    # training form vs folded form of the same PyTorch model, fp32
    "training_vs_folded": Tolerance(1e-5, 0.0, "K, V and e^s folded into constants change rounding only"),
    # ONNX Runtime vs the folded PyTorch model, fp32
    "onnxruntime_vs_torch": Tolerance(1e-4, 0.0, "ORT fuses and reorders fp32 kernels (MatMul, LayerNorm, Softmax)"),
    # half-precision artifacts vs fp32 PyTorch (used by fp16/bf16 exports)
    "fp16_vs_fp32": Tolerance(2e-2, 2e-2, "fp16 storage with fp32 accumulation"),
    "bf16_vs_fp32": Tolerance(6e-2, 6e-2, "bf16 has 8 mantissa bits"),
}


def tolerance(name: str) -> Tolerance:
    from apt_deploy.errors import UnknownNameError

    if name not in TOLERANCES:
        raise UnknownNameError("tolerance", name, TOLERANCES)
    return TOLERANCES[name]


@dataclass(frozen=True)
class ExportSettings:
    """What ``apt-deploy export`` does; CLI flags override only what is given."""

    batch_min: int = 1
    batch_opt: int = 1
    batch_max: int = 8
    text_len: int | None = None  # None: min(40, max_position_embeddings)
    image_size: int | None = None  # None: the model's config.image_size
    dynamic_image: bool = False
    image_min: int | None = None
    image_max: int | None = None
    dtype: str = "fp32"
    validate: bool = True
    seed: int = 0
    overwrite: bool = False
    external_data: bool | None = None  # None: only when the model is over ~100 MB
