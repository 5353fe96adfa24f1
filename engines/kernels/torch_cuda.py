"""The Triton kernel as the CUDA implementation of ``torch.ops.apt.approx_prompt_diffusion``, and the
``torch-cuda`` runner backend: the folded PyTorch model on a GPU with CUDA graphs or torch.compile.

Nothing is registered on import: :func:`enable_triton_kernel` registers the kernel explicitly, and the
backend calls it when ``use_triton=True`` (the default). torch is imported inside functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.errors import ConfigError
from apt_deploy.features import require
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as SPEC
from engines.runners import Feed, Runner, register_backend, serialized, to_host_numpy

log = logging.getLogger(__name__)
MODES = ("eager", "graphs", "compile")
_ENABLED: list[bool] = []


def enable_triton_kernel() -> None:
    """Register the fused Triton kernel for CUDA tensors on the torch custom op (idempotent).

    CPU tensors keep the op's default (unfused PyTorch) kernel; the fake kernel is unchanged, so
    export and torch.compile tracing are unaffected.
    """
    if _ENABLED:
        return
    require("triton", "the fused Triton kernel")
    import torch

    if not hasattr(getattr(torch.ops, SPEC.torch_namespace), SPEC.torch_name):
        # defined by apt_deploy.ops.torch_op (the torch side, which this layer does not import): the
        # caller's model loader or the caller itself imports it first
        raise ConfigError(f"the custom op {SPEC.torch_qualname} is not defined yet", "the op defined before "
                          "its CUDA kernel is registered", "import apt_deploy.ops.torch_op (or load the model) first")
    torch.library.register_kernel(SPEC.torch_qualname, "cuda", _cuda_kernel)
    _ENABLED.append(True)
    log.info("registered the Triton kernel as the CUDA implementation of %s", SPEC.torch_qualname)


def _cuda_kernel(x_in: Any, o: Any, k: Any, v: Any) -> Any:
    from engines.kernels.triton_apd import approx_prompt_diffusion_triton

    return approx_prompt_diffusion_triton(x_in, o, k, v)


class TorchCudaRunner(Runner):
    """The folded model of an artifact on CUDA: ``eager``, ``graphs`` (one CUDA graph per input-shape
    set, replayed with static buffers) or ``compile`` (``torch.compile``)."""

    def __init__(self, artifact_dir: str | Path, load_model: Callable[[], Any], mode: str = "graphs",
                 use_triton: bool = True) -> None:
        """``load_model()`` returns the artifact's PyTorch form on CPU in fp32 (apt_deploy.pipeline's
        ReferenceModule: ``forward(**feed)`` -> outputs in manifest order, export patches applied); the caller
        builds it, so this runner never imports apt_deploy's torch side."""
        if mode not in MODES:
            raise ConfigError(f"torch-cuda mode {mode!r}", f"one of {', '.join(MODES)}", "pass mode=graphs (default)")
        self.artifact_dir, self.mode, self.use_triton, self.load_model = Path(artifact_dir), mode, use_triton, load_model
        self.name = f"torch-cuda[{mode}{',triton' if use_triton else ''}]"
        self._module: Any = None
        self._graphs: dict[tuple, CapturedGraph] = {}

    @serialized  # thread safety: one activation, one infer at a time (shared bindings / graph buffers)
    def activate(self) -> None:
        if self._module is not None:
            return
        require("cuda", "the torch-cuda backend")
        self._load()  # the model loader defines the custom op (apt_deploy.ops.torch_op)
        if self.use_triton:
            try:
                enable_triton_kernel()
            except Exception:
                self.deactivate()
                raise

    def _load(self) -> None:
        """Load and move the model; state is set only after every step succeeded, and a model already moved
        to the GPU is released when a later step fails (a failed activation leaves the runner inactive)."""
        import torch

        from apt_deploy.manifest import read_manifest

        manifest = read_manifest(self.artifact_dir)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[manifest["dtype"]]
        module = None
        try:
            module = self.load_model().to(device="cuda", dtype=dtype).eval()
            compiled = torch.compile(module, mode="max-autotune-no-cudagraphs") if self.mode == "compile" else module
        except BaseException:
            del module
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        self.manifest, self.dtype = manifest, dtype
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self._module = compiled

    def deactivate(self) -> None:
        self._module, self._graphs = None, {}

    @serialized
    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        self.activate()
        inputs = self._to_device(feed)
        if self.mode == "graphs":
            key = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in inputs.items())
            if key not in self._graphs:
                self._graphs[key] = CapturedGraph(self._forward, inputs, self._capture_context())
            outputs = self._graphs[key].replay(inputs)
        else:
            outputs = self._forward(inputs)
        return {n: to_host_numpy(t) for n, t in zip(self.output_names, outputs)}

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()

    def _capture_context(self) -> Any:
        """The model's context for a sync-free forward (ReferenceModule.capture_context: attention masks built
        without data-dependent branches); a module without one cannot be captured safely."""
        hook = getattr(self._module, "capture_context", None)
        if hook is None:
            raise ConfigError(f"a load_model module ({type(self._module).__name__}) without capture_context()",
                              "a module whose forward has no host synchronisation (apt_deploy.pipeline.ReferenceModule)",
                              "pass load_model=apt_deploy.pipeline.load_reference_module(...), or use mode='eager'/'compile'")
        return hook()

    def _to_device(self, feed: Feed) -> dict[str, Any]:
        import torch

        out = {}
        for name in self.input_names:
            if name not in feed:
                raise ConfigError(f"feed without input {name!r} (got {sorted(feed)})", f"every input of {self.input_names}")
            t = torch.from_numpy(np.ascontiguousarray(feed[name]))
            out[name] = t.to(device="cuda", dtype=self.dtype if t.is_floating_point() else t.dtype)
        return out

    def _forward(self, inputs: dict[str, Any]) -> list[Any]:
        import torch

        with torch.no_grad():
            return list(self._module(**inputs))


class CapturedGraph:
    """One CUDA graph over static input/output buffers (warm-up on a side stream, then capture), both inside
    the model's capture context so that no host synchronisation or data-dependent branch is captured."""

    def __init__(self, forward: Any, inputs: dict[str, Any], capture_context: Any) -> None:
        import torch

        self.static_inputs = {n: t.clone() for n, t in inputs.items()}
        with capture_context:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward(self.static_inputs)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_outputs = forward(self.static_inputs)
        log.info("captured a CUDA graph for shapes %s", {n: tuple(t.shape) for n, t in inputs.items()})

    def replay(self, inputs: dict[str, Any]) -> list[Any]:
        for name, t in inputs.items():
            self.static_inputs[name].copy_(t)
        self.graph.replay()
        return [t.clone() for t in self.static_outputs]


@register_backend("torch-cuda")
def _torch_cuda_backend(artifact_dir: str | Path, **kwargs: Any) -> Runner:
    if kwargs.get("load_model") is None:
        raise ConfigError("the torch-cuda backend without a PyTorch model loader",
                          "load_model=callable returning the artifact's PyTorch form",
                          "use apt-deploy verify/bench, which pass apt_deploy.pipeline.load_reference_module")
    known = {"mode", "use_triton", "load_model"}
    return TorchCudaRunner(artifact_dir, **{k: v for k, v in kwargs.items() if k in known})
