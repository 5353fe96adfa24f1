"""Settings and tolerances: frozen dataclasses with their defaults in one module (pure Python).

Tolerances are data, declared once with the reason, and printed in every parity failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    # (rtol: at ViLT-B size, d=768, p=200, |y| ~ 4, fp32 rounding alone reaches 1.05e-5 abs; docs/pitfalls.md)
    "fused_op_vs_reference": Tolerance(1e-5, 1e-5, "fp32 GEMM accumulation order vs float64 reference"),
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


@dataclass(frozen=True)
class TrainSettings:
    """The official APT recipe (specs/apt.md): AdamW(0.9, 0.98, eps 1e-8, wd 0.01, none on biases and
    LayerNorm), lr 5e-4 (ViLT VQA), the task head at ``head_lr_mult`` x lr, linear warm-up over 10 % of
    the steps then linear decay to 0. ``grad_clip`` None: no clipping. ``eval_every`` 0: evaluate at the end only."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float | None = None
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        from apt_deploy.errors import ConfigError

        for name in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}", "a positive integer")
        if self.lr <= 0 or self.head_lr_mult <= 0:
            raise ConfigError(f"lr={self.lr}, head_lr_mult={self.head_lr_mult}", "positive values (recipe: 5e-4, 10)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio}", "a fraction in [0, 1) (recipe: 0.1)")
        if self.weight_decay < 0 or self.eval_every < 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            raise ConfigError(f"weight_decay={self.weight_decay}, eval_every={self.eval_every}, grad_clip={self.grad_clip}",
                              "weight_decay >= 0, eval_every >= 0, grad_clip None or > 0")


@dataclass(frozen=True)
class DemoSettings:
    workdir: str = "apt-deploy-demo"
    steps: int = 1500
    batch_size: int = 32
    num_train: int = 2000
    num_test: int = 500
    prompt_len: int = 50  # the official code's default; the published ViLT-B runs use 200 at d=768
    rank: int = 4
    latency_iterations: int = 100
    seed: int = 0


@dataclass(frozen=True)
class BenchSettings:
    """What ``apt-deploy bench`` does; CLI flags override only what is given."""

    backend: str = "onnxruntime"
    batch: int = 1
    iterations: int = 30
    warmup: int = 3
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from apt_deploy.errors import ConfigError

        if self.batch < 1 or self.iterations < 1 or self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise ConfigError(f"batch={self.batch}, iterations={self.iterations}, warmup={self.warmup}, "
                              f"threads={self.threads}", "batch >= 1, iterations >= 1, warmup >= 0, threads >= 1",
                              "fix --batch / --iterations / --warmup / --threads")


@dataclass(frozen=True)
class EngineSettings:
    """Everything that changes the built engine (all of it goes into the cache key)."""

    precision: str = "fp32"
    use_plugin: bool = True
    plugin_mode: str = "auto"  # resolved to "aot" / "jit" before hashing when the plugin is used
    workspace_bytes: int | None = None
    builder_optimization_level: int | None = None
    tf32: bool = False
    profiles: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_LR = {"sgd": 2e-3, "adamw": 5e-4}


@dataclass(frozen=True)
class ClipTrainSettings:
    steps: int = 200
    batch_size: int = 32
    lr: float | None = None  # None: 2e-3 for sgd (CoOp), 5e-4 for adamw (APT)
    optimizer: str | None = None  # None: sgd for coop/gram, adamw when APT trains
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0

    def resolved(self, method: str) -> tuple[str, float]:
        from apt_deploy.errors import ConfigError

        opt = self.optimizer or ("adamw" if method.startswith("apt") else "sgd")
        if opt not in DEFAULT_LR:
            raise ConfigError(f"optimizer {opt!r}", f"one of {', '.join(DEFAULT_LR)}")
        return opt, self.lr if self.lr is not None else DEFAULT_LR[opt]


SD_SCHEDULERS = ("ddim", "euler", "dpm")


@dataclass(frozen=True)
class GenerateSettings:
    """What ``apt-deploy generate`` does (Stable Diffusion artifacts). ``height`` / ``width`` None: the
    artifact's export size; ``scheduler`` None: the model's own scheduler class."""

    prompt: str = ""
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    steps: int = 30
    guidance: float = 7.5
    scheduler: str | None = None
    seed: int = 0
    batch: int = 1
    backend: str = "onnxruntime"
    threads: int | None = None

    def __post_init__(self) -> None:
        import math

        from apt_deploy.errors import ConfigError

        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"--{name} {value}", "a positive multiple of 8 (the VAE works on 8x8 pixel cells)",
                                  f"pass e.g. --{name} {max(8, round(value / 8) * 8)}")
        if self.steps < 1:
            raise ConfigError(f"--steps {self.steps}", "at least 1 denoising step", "pass e.g. --steps 30")
        if not math.isfinite(self.guidance):
            raise ConfigError(f"--guidance {self.guidance}", "a finite guidance scale (<= 1 turns guidance off)",
                              "pass e.g. --guidance 7.5")
        if self.batch < 1:
            raise ConfigError(f"--batch {self.batch}", "at least 1 image per prompt", "pass e.g. --batch 1")
        if self.scheduler is not None and self.scheduler not in SD_SCHEDULERS:
            raise ConfigError(f"--scheduler {self.scheduler!r}", f"one of {', '.join(SD_SCHEDULERS)}")
