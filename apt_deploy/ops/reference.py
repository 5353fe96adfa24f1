"""Numpy reference of the fused op and of the APT training form: the arbiter of parity tests.

Computed in float64 and cast back to the dtype of ``o``, so the reference is more accurate than
any path it judges.
"""

from __future__ import annotations

import numpy as np


def approx_prompt_diffusion(x_in: np.ndarray, o: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """y = o + rowmax(A) * (A @ V), A = ReLU(x_in @ K^T). Shapes [..., n, d], [p, d]."""
    x64, o64 = x_in.astype(np.float64), o.astype(np.float64)
    a = np.maximum(x64 @ k.astype(np.float64).T, 0.0)
    w = a.max(axis=-1, keepdims=True)
    return (o64 + w * (a @ v.astype(np.float64))).astype(o.dtype)


def apt_training_form(
    x_in: np.ndarray,
    o: np.ndarray,
    prompt: np.ndarray,
    down: np.ndarray,
    up: np.ndarray,
    log_scale: float,
) -> np.ndarray:
    """specs/apt.md steps 1-6 (dropout off): y = e^s (o + w * (A @ P)), K = P + (P W_dn^T) W_up^T."""
    p64 = prompt.astype(np.float64)
    k = p64 + (p64 @ down.astype(np.float64).T) @ up.astype(np.float64).T
    a = np.maximum(x_in.astype(np.float64) @ k.T, 0.0)
    w = a.max(axis=-1, keepdims=True)
    y = np.exp(float(log_scale)) * (o.astype(np.float64) + w * (a @ p64))
    return y.astype(o.dtype)


def fold_constants(
    prompt: np.ndarray, down: np.ndarray, up: np.ndarray, log_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """K = P (I + W_dn^T W_up^T), V = e^s P (specs/apt.md, inference form)."""
    p64 = prompt.astype(np.float64)
    k = p64 + (p64 @ down.astype(np.float64).T) @ up.astype(np.float64).T
    return k.astype(prompt.dtype), (np.exp(float(log_scale)) * p64).astype(prompt.dtype)


def approx_prompt_diffusion_rows(x_in: np.ndarray, o: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Version 2 (per-row prompts): row b uses K[b], V[b]. Shapes [B, n, d], [B, n, d], [B, p, d], [B, p, d]."""
    x64, o64 = x_in.astype(np.float64), o.astype(np.float64)
    a = np.maximum(x64 @ np.swapaxes(k.astype(np.float64), -1, -2), 0.0)
    w = a.max(axis=-1, keepdims=True)
    return (o64 + w * (a @ v.astype(np.float64))).astype(o.dtype)
