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


# Declared once; every parity check in code and tests uses these. Comparison rule (engines/compare.py):
# atol + rtol * |expected| on entries finite on both sides; infinities must match exactly (same sign and
# place, e.g. Grounding DINO's -inf logits at padded text slots); NaN or a one-sided inf always fails.
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
    # a row of a multi-task artifact vs its task's single-task artifact, both on ONNX Runtime, fp32
    "multitask_vs_single_task": Tolerance(1e-5, 0.0, "e^s applied after, not folded into, W_o; batched per-row GEMMs"),
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
    components: tuple[str, ...] | None = None  # multi-component models (sd): export only these; None: all


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
    cross_modal_lr_mult: float = 1.0  # METER: APT modules and poolers at lr x this (spec.cross_modal_parameters)

    def __post_init__(self) -> None:
        from apt_deploy.errors import ConfigError

        for name in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}", "a positive integer")
        if self.lr <= 0 or self.head_lr_mult <= 0 or self.cross_modal_lr_mult <= 0:
            raise ConfigError(f"lr={self.lr}, head_lr_mult={self.head_lr_mult}", "positive values (recipe: 5e-4, 10)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio}", "a fraction in [0, 1) (recipe: 0.1)")
        if self.weight_decay < 0 or self.eval_every < 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            raise ConfigError(f"weight_decay={self.weight_decay}, eval_every={self.eval_every}, grad_clip={self.grad_clip}",
                              "weight_decay >= 0, eval_every >= 0, grad_clip None or > 0")


# Per-backbone overrides of TrainSettings for the official recipe (apt-deploy train fills in what is not given).
# METER APT VQA (shared/specs/meter.md §3.5): base lr 2.5e-5 (token types, token4classifier), APT modules and
# poolers x5 (1.25e-4), the head x50 (1.25e-3).
BACKBONE_TRAIN_DEFAULTS: dict[str, dict[str, float]] = {
    "meter": {"lr": 2.5e-5, "cross_modal_lr_mult": 5.0, "head_lr_mult": 50.0},
}


@dataclass(frozen=True)
class DemoSettings:
    workdir: str = "apt-deploy-demo"
    backbone: str = "vilt"  # or "meter" (a tiny random METER; apt-deploy demo --backbone meter)
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
    threads: int | None = None  # None: the physical cores (resolved by engines.bench), for ORT and torch alike
    seed: int = 0  # the inputs and the per-round order
    shuffle: bool = True  # a seeded random order per round (False: the rotation A B C, B C A, ...)
    spinning: bool = False  # ONNX Runtime threads may busy-wait after a run (steals cores from the next path)
    peers: tuple[str, ...] = ()  # PyTorch peers timed beside each artifact: torch-eager, torch-compile

    def __post_init__(self) -> None:
        from apt_deploy.errors import ConfigError

        if self.batch < 1 or self.iterations < 1 or self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise ConfigError(f"batch={self.batch}, iterations={self.iterations}, warmup={self.warmup}, "
                              f"threads={self.threads}", "batch >= 1, iterations >= 1, warmup >= 0, threads >= 1",
                              "fix --batch / --iterations / --warmup / --threads")


@dataclass(frozen=True)
class GateSettings:
    """The statistical latency gate (``bench --compare`` and ``--baseline``; engines.stats, docs/benchmarks.md).

    ``--compare`` times blocks: each block creates ``sessions`` fresh sessions per artifact and times them
    in paired, shuffled rounds for ``block_s`` seconds (at least ``block_min_rounds`` rounds); after
    ``min_blocks`` blocks it stops at the first block where the interval's half-width is <=
    ``target_half_width``, or once ``budget_s`` seconds (session creation included) or ``max_blocks`` are
    spent. ``--baseline`` times one session per artifact: it stops at the first check where the half-width
    is <= the target (after ``min_iterations`` rounds), or when ``budget_s`` of timing or ``max_iterations``
    rounds are spent."""

    max_regression: float = 0.02  # regression: the whole CI of the p50 ratio above 1 + this
    max_regression_p99: float = 0.10  # the same for p99 (--baseline only)
    confidence: float = 0.95
    resamples: int = 2000  # bootstrap resamples (--baseline)
    target_half_width: float = 0.01  # stop once the CI is +-1 % wide
    budget_s: float = 60.0  # seconds at most (--compare: no block starts after it; --baseline: timing only)
    min_iterations: int = 20  # --baseline: rounds before the first check
    max_iterations: int = 5000  # --baseline: rounds at most
    check_every: int = 10  # --baseline: rounds between interval checks
    sessions: int = 1  # --compare: fresh sessions per artifact in each block
    block_s: float = 1.0  # --compare: timing seconds per block
    block_min_rounds: int = 10  # --compare: rounds per block at least (slow models: blocks last longer)
    min_blocks: int = 8  # --compare: blocks always timed (the budget cannot stop it before)
    max_blocks: int = 500  # --compare: blocks at most

    def __post_init__(self) -> None:
        from apt_deploy.errors import ConfigError

        if not (0 < self.confidence < 1 and self.resamples >= 100 and self.target_half_width > 0 and self.budget_s > 0
                and 2 <= self.min_iterations <= self.max_iterations and self.check_every >= 1 and self.sessions >= 1
                and self.block_s > 0 and self.block_min_rounds >= 1 and 2 <= self.min_blocks <= self.max_blocks
                and self.max_regression >= 0 and self.max_regression_p99 >= 0):
            raise ConfigError(f"gate settings {self}", "0 < confidence < 1, resamples >= 100, target CI > 0, budget > 0, "
                              "2 <= min_iterations <= max_iterations, check_every >= 1, sessions >= 1, block seconds > 0, "
                              "block rounds >= 1, 2 <= min_blocks <= max_blocks, thresholds >= 0",
                              "fix --confidence / --target-ci / --budget / --min-iterations / --max-iterations / --sessions / "
                              "--block-seconds / --min-blocks")


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


@dataclass(frozen=True)
class TritonRepoSettings:
    """``apt-deploy triton-repo`` / ``serve``: how each artifact becomes Triton models (serving/triton_repo.py)."""

    backend: str = "onnxruntime"  # model step: onnxruntime (onnxruntime_onnx), tensorrt (tensorrt_plan), python (ORT)
    max_batch: int | None = None  # None: the export's max batch
    instances: int = 1  # instance_group count of every model
    top_k: int = 5
    queue_delay_us: int = 500  # dynamic batcher's max queue delay
    max_image_bytes: int = 16 * 2**20  # larger encoded images are refused with HTTP 400
    intra_op_threads: int = 1  # ONNX Runtime threads per python-backend model instance
    engine: str | None = None  # tensorrt: the .plan (default: the artifact's model.<dtype>.plan)


@dataclass(frozen=True)
class ScaleSettings:
    """Scale-out knobs shared by every training loop (docs/distributed.md): gradient accumulation, autocast
    precision, training checkpoints every N optimizer steps into ``checkpoint_dir``, resuming from ``resume``.
    The world size comes from torchrun, not from here."""

    grad_accum: int = 1
    precision: str = "fp32"
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: str | None = None

    def __post_init__(self) -> None:
        from apt_deploy.errors import ConfigError

        if self.grad_accum < 1 or self.checkpoint_every < 0:
            raise ConfigError(f"grad_accum={self.grad_accum}, checkpoint_every={self.checkpoint_every}",
                              "grad_accum >= 1 and checkpoint_every >= 0", "fix --grad-accum / --checkpoint-every")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision {self.precision!r}", "one of fp32, bf16, fp16", "fix --precision")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} without a checkpoint directory",
                              "a directory for the training checkpoint", "pass --checkpoint-dir (or --out)")


@dataclass(frozen=True)
class DetectionTrainSettings:
    """Few-shot detection training (Grounding DINO + SDPT): the SDPT README's AdamW (weight decay 0.01,
    gradient clipping 1.0); its lr 1e-5 is for 2000 steps on GLIP-L, the default here suits small runs."""

    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-2
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    warmup_ratio: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        from apt_deploy.errors import ConfigError

        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}, "
                              f"warmup_ratio={self.warmup_ratio}", "steps >= 1, batch_size >= 1, lr > 0, warmup in [0, 1)",
                              "fix --steps / --batch-size / --lr")


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
