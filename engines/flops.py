"""Multiply-accumulate counts of a ViLT-style single-stream transformer, and what a prompt method adds
(pure Python; the prediction printed beside every measured overhead in docs/benchmarks.md).

Per block, n tokens, hidden d, FFN width f (f = 4d for ViLT-B):
    QKV + output projection  4 n d^2
    FFN                      2 n d f          (= 8 n d^2 for f = 4d)
    scores + weighted values 2 n^2 d
    -> 12 n d^2 + 2 n^2 d for f = 4d.
Whole model: L blocks + the patch embedding (n_img * 3 * P^2 * d) + pooler (d^2) + VQA head
(d * 2d + 2d * labels). Softmax, LayerNorm, GELU, ReLU, row-max and adds are O(n d) or O(n p), ignored.

What each method adds per block (p prompts):
    APT, fused or op-free      2 n p d          (x_in K^T and A V)
    deep prompt, prefix K/V    2 n p d          (n queries against p extra keys and values)
    deep prompt, naive         block(n + p) - block(n)   (the p tokens run through the whole block)
"""

from __future__ import annotations

from dataclasses import dataclass

from apt_deploy.errors import ConfigError

MAC_MODELS = ("none", "apt", "deep_prompt")  # the methods extra_macs has a model for


@dataclass(frozen=True)
class VitShape:
    """The shape numbers that set the MAC count."""

    hidden: int = 768
    layers: int = 12
    ffn: int = 3072
    patch: int = 32
    text_len: int = 40
    labels: int = 3129

    def tokens(self, image: int) -> int:
        """text tokens + image patches + the image [CLS] token."""
        return self.text_len + (image // self.patch) ** 2 + 1


def block_macs(n: int, d: int, ffn: int) -> int:
    return 4 * n * d * d + 2 * n * d * ffn + 2 * n * n * d


def model_macs(shape: VitShape, image: int) -> int:
    """MACs of one forward at batch 1 (the base model)."""
    d, n = shape.hidden, shape.tokens(image)
    patches = (image // shape.patch) ** 2
    rest = patches * 3 * shape.patch**2 * d + d * d + d * 2 * d + 2 * d * shape.labels
    return shape.layers * block_macs(n, d, shape.ffn) + rest


def extra_macs(shape: VitShape, image: int, method: str, form: str, prompt_len: int) -> int:
    """MACs a method adds to the base model (``form``: folded / training; method none adds 0)."""
    if method not in MAC_MODELS:
        raise ConfigError(f"no MAC model for method {method!r}", f"one of {', '.join(MAC_MODELS)}",
                          "add the method's per-block MACs to engines/flops.py")
    if method == "none":
        return 0
    d, n, p = shape.hidden, shape.tokens(image), prompt_len
    if method == "deep_prompt" and form == "training":
        return shape.layers * (block_macs(n + p, d, shape.ffn) - block_macs(n, d, shape.ffn))
    return shape.layers * 2 * n * p * d


def predicted_overhead(shape: VitShape, image: int, method: str, form: str, prompt_len: int) -> float:
    """Extra MACs / base-model MACs: the compute floor of the method's latency overhead."""
    return extra_macs(shape, image, method, form, prompt_len) / model_macs(shape, image)


def block_floor(shape: VitShape, image: int, prompt_len: int) -> float:
    """specs/apt.md's per-block floor 2p / (12d + 2n) (exact for f = 4d)."""
    return 2 * prompt_len / (12 * shape.hidden + 2 * shape.tokens(image))
