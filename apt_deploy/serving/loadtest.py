"""A bounded load test of a KServe v2 (Triton) endpoint with tritonclient: N requests from C threads,
stopped at a deadline; latency percentiles, requests/s and errors. Loopback only unless asked.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from apt_deploy.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSettings:
    concurrency: int = 8
    requests: int = 500
    deadline_s: float = 120.0  # stop sending after this; unsent requests are reported, not retried
    timeout_s: float = 30.0  # per-request network timeout
    top_k: int = 5


def check_url(url: str, allow_remote: bool = False) -> str:
    """``host:port`` of an http URL; a host that is not loopback is refused unless ``allow_remote``."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ConfigError(f"URL {url!r}", "http://HOST:PORT of a KServe v2 HTTP endpoint", "e.g. http://127.0.0.1:8000")
    if not allow_remote and not is_loopback(parts.hostname):
        raise ConfigError(f"host {parts.hostname!r} is not a loopback address",
                          "127.0.0.1, ::1 or localhost (a load test sends many requests)",
                          "pass --allow-remote to load-test another machine you are allowed to load")
    return f"{parts.hostname}:{parts.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name: not resolved here, so not known to be loopback


def default_image(size: int = 64, seed: int = 0) -> bytes:
    """A PNG of random pixels (the load test's default request)."""
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def client_module() -> Any:
    try:
        import tritonclient.http as http
    except ImportError as e:
        raise MissingDependencyError(f"tritonclient is not importable ({e})", "tritonclient[http]",
                                     'pip install "apt-deploy[serve]"') from e
    return http


def infer_once(client: Any, model: str, image: bytes, question: str | None, task: str | None = None) -> dict[str, Any]:
    """One request to an apt-deploy ensemble -> {"labels": [...], "scores": [...]} (first row); ``task`` names
    the task of a multi-task artifact."""
    http = client_module()
    image_in = http.InferInput("image", [1, 1], "BYTES")
    image_in.set_data_from_numpy(np.array([[image]], dtype=np.object_))
    inputs = [image_in]
    for name, text in (("question", question), ("task", task)):
        if text is not None:
            tensor = http.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
            inputs.append(tensor)
    outputs = [http.InferRequestedOutput("labels"), http.InferRequestedOutput("scores")]
    result = client.infer(model, inputs, outputs=outputs)
    return {"labels": [b.decode("utf-8") for b in result.as_numpy("labels")[0]],
            "scores": [float(s) for s in result.as_numpy("scores")[0]]}


def model_inputs(host_port: str, model: str, timeout_s: float) -> list[str]:
    """The names of the served model's inputs (its metadata)."""
    client = client_module().InferenceServerClient(host_port, connection_timeout=timeout_s, network_timeout=timeout_s)
    try:
        return [i["name"] for i in client.get_model_metadata(model)["inputs"]]
    finally:
        client.close()



def run_loadtest(url: str, model: str, image: bytes, question: str | None, settings: LoadSettings,
                 allow_remote: bool = False, task: str | None = None) -> dict[str, Any]:
    """Send ``settings.requests`` requests from ``settings.concurrency`` threads (one client each); ``task``
    names the task on a multi-task model."""
    if settings.concurrency < 1 or settings.requests < 1:
        raise ConfigError(f"concurrency {settings.concurrency}, requests {settings.requests}", "both >= 1")
    host_port = check_url(url, allow_remote)
    inputs = model_inputs(host_port, model, settings.timeout_s)
    if question is None and "question" in inputs:
        question = "what color is the shape?"
    if task is None and "task" in inputs:
        raise ConfigError(f"model {model!r} serves several tasks and no --task was given", "--task NAME",
                          "pass --task with one of the artifact's task names (its manifest.json, tasks.names)")
    if task is not None and "task" not in inputs:
        raise ConfigError(f"--task {task!r} for model {model!r}, which serves one task", "no --task", "drop --task")
    counter, lock, deadline = iter(range(settings.requests)), threading.Lock(), time.monotonic() + settings.deadline_s
    latencies: list[float] = []
    errors: list[str] = []
    answers: list[dict[str, Any]] = []

    def worker(_: int) -> None:
        client = client_module().InferenceServerClient(host_port, connection_timeout=settings.timeout_s,
                                                       network_timeout=settings.timeout_s)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    answer = infer_once(client, model, image, question, task)
                except Exception as e:  # tritonclient raises InferenceServerException, socket errors, ...
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if len(answers) < 1:
                        answers.append(answer)
        finally:
            client.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(settings.concurrency) as pool:
        list(pool.map(worker, range(settings.concurrency)))
    report = _report(url, model, question, settings, time.perf_counter() - t0, latencies, errors, answers)
    return {**report, "task": task} if task is not None else report


def _report(url: str, model: str, question: str | None, settings: LoadSettings, seconds: float,
            latencies: list[float], errors: list[str], answers: list[dict[str, Any]]) -> dict[str, Any]:
    from engines.machine import load_average, machine_info

    ms = np.asarray(latencies, dtype=np.float64) * 1e3
    pct = dict(zip(("p50_ms", "p90_ms", "p99_ms"), np.percentile(ms, [50, 90, 99]).tolist())) if ms.size else {}
    sent = len(latencies) + len(errors)
    return {"url": url, "model": model, "question": question, "settings": asdict(settings),
            "sent": sent, "completed": len(latencies), "errors": len(errors), "not_sent": settings.requests - sent,
            "error_samples": sorted(set(errors))[:5], "seconds": round(seconds, 3),
            "requests_per_s": round(len(latencies) / seconds, 2) if seconds > 0 else None,
            "latency_ms": {**{k: round(v, 3) for k, v in pct.items()},
                           "mean_ms": round(float(ms.mean()), 3) if ms.size else None,
                           "max_ms": round(float(ms.max()), 3) if ms.size else None},
            "first_answer": answers[0] if answers else None,
            "machine": machine_info(), "load_average_after": load_average()}
