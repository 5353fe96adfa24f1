"""The fused APT op: one declaration (:mod:`.schema`), a numpy reference (:mod:`.reference`),
a torch custom op (:mod:`.torch_op`, imported lazily because it needs torch)."""

from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION, APPROX_PROMPT_DIFFUSION_ROWS, FUSED_OPS, FusedOpSpec

__all__ = ["APPROX_PROMPT_DIFFUSION", "APPROX_PROMPT_DIFFUSION_ROWS", "FUSED_OPS", "FusedOpSpec"]
