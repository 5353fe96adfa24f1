"""apt-deploy serve + loadtest against the real tritonserver bundled in nvidia-pytriton, on 127.0.0.1 with free
ports: concurrent answers equal predict's, bad requests get a 400 naming what was wrong and the server keeps
serving, HTTP + gRPC + metrics, and SIGTERM leaves no process behind. Bounded: ~100 requests, 120 s deadlines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from apt_deploy.features import has, why_missing
from apt_deploy.experiments.serve_loadtest import free_ports
from tests.test_serving_artifact import png_bytes

pytestmark = [pytest.mark.skipif(not has(m), reason=why_missing(m)) for m in ("pytriton", "tritonclient")]
ROOT = Path(__file__).resolve().parents[1]
MAX_IMAGE_BYTES = 50_000


@contextlib.contextmanager
def serving(artifact: Path, name: str, log_dir: Path, *extra: str):
    """``apt-deploy serve ARTIFACT --name NAME`` as a user runs it, in a subprocess on free loopback ports;
    yields (process, http url, grpc address, metrics url); killed afterwards."""
    from apt_deploy.serving.server import http_ready

    http, grpc, metrics = free_ports(3)
    log = log_dir / "triton.log"
    cmd = [sys.executable, "-m", "apt_deploy", "-q", "serve", str(artifact), "--name", name, "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra, "--log", str(log)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{http}", time.monotonic() + 120
    while not http_ready(url) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
    if not http_ready(url):
        proc.kill()
        pytest.fail(f"server not ready: {proc.communicate()[0][-3000:]}\n{log.read_text()[-3000:] if log.exists() else ''}")
    try:
        yield {"proc": proc, "url": url, "grpc": f"127.0.0.1:{grpc}", "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(vqa_artifact, tmp_path_factory):
    with serving(vqa_artifact, "vqa", tmp_path_factory.mktemp("serve"), "--max-image-bytes", str(MAX_IMAGE_BYTES)) as s:
        yield s


def _client(server):
    import tritonclient.http as http

    return http.InferenceServerClient(server["url"].removeprefix("http://"), network_timeout=60)


def ask(server, model: str, request: tuple) -> dict:
    """One request (image, question[, task]) through ``loadtest.infer_once`` on a client of its own."""
    from apt_deploy.serving.loadtest import infer_once

    client = _client(server)
    try:
        return infer_once(client, model, *request)
    finally:
        client.close()


def test_concurrent_answers_equal_predict(server, vqa_artifact):
    from apt_deploy import Predictor

    predictor = Predictor(vqa_artifact)
    requests = [(png_bytes(32 + 8 * (i % 3), 32, i), q) for i, q in
                enumerate(["what color is the shape?", "is it a square?", "which side is the shape on?"] * 8)]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda req: ask(server, "vqa", req), requests))
    for (image, question), got in zip(requests, answers):
        want = predictor.predict(image, question, top_k=5)
        assert got["labels"] == [p["label"] for p in want]
        np.testing.assert_allclose(got["scores"], [p["score"] for p in want], atol=1e-5)


def test_loadtest_has_zero_errors(server):
    from apt_deploy.serving.loadtest import LoadSettings, default_image, run_loadtest

    report = run_loadtest(server["url"], "vqa", default_image(), None, LoadSettings(concurrency=8, requests=64, deadline_s=120))
    assert report["errors"] == 0 and report["completed"] == 64 and report["question"] == "what color is the shape?"
    assert report["latency_ms"]["p50_ms"] <= report["latency_ms"]["p99_ms"] and report["requests_per_s"] > 0


def _infer(server, image, question, image_shape=(1, 1), question_dtype="BYTES"):
    import tritonclient.http as http

    img = http.InferInput("image", list(image_shape), "BYTES")
    img.set_data_from_numpy(np.array(image, dtype=np.object_).reshape(image_shape))
    q = http.InferInput("question", [1, 1], question_dtype)
    q.set_data_from_numpy(np.array([[question]], dtype=np.object_ if question_dtype == "BYTES" else np.float32))
    client = _client(server)
    try:
        return client.infer("vqa", [img, q])
    finally:
        client.close()


@pytest.mark.parametrize("case,match", [
    ("undecodable", "image 0 .* cannot be decoded"),
    ("empty_question", "question 0 is empty"),
    ("oversized", f"over the limit of {MAX_IMAGE_BYTES}"),
    ("wrong_dtype", "data-type is 'FP32', but model 'vqa' expects 'BYTES'"),
    ("wrong_shape", "unexpected shape for input 'image'"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, case, match):
    from tritonclient.utils import InferenceServerException

    good = png_bytes(32, 32)
    args = {"undecodable": ([b"not an image"], b"what?"), "empty_question": ([good], b"  "),
            "oversized": ([good + b"\0" * MAX_IMAGE_BYTES], b"what?"), "wrong_dtype": ([good], 1.0),
            "wrong_shape": ([good, good], b"what?")}[case]
    kwargs = {"wrong_dtype": {"question_dtype": "FP32"}, "wrong_shape": {"image_shape": (1, 2)}}.get(case, {})
    with pytest.raises(InferenceServerException, match=match) as e:
        _infer(server, *args, **kwargs)
    assert e.value.status() == "400"
    assert _infer(server, [good], b"what color?").as_numpy("labels").shape == (1, 5)


def test_grpc_and_metrics(server):
    import urllib.request

    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(server["grpc"])
    img = grpc.InferInput("image", [1, 1], "BYTES")
    img.set_data_from_numpy(np.array([[png_bytes(32, 32)]], dtype=np.object_))
    q = grpc.InferInput("question", [1, 1], "BYTES")
    q.set_data_from_numpy(np.array([[b"is it a square?"]], dtype=np.object_))
    assert client.infer("vqa", [img, q]).as_numpy("scores").dtype == np.float32
    client.close()
    with urllib.request.urlopen(server["metrics"], timeout=10) as r:
        metrics = r.read().decode()
    assert 'nv_inference_request_success{model="vqa",version="1"}' in metrics


def test_sigterm_stops_the_server_and_its_stubs(server):
    import psutil

    proc = server["proc"]
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any(c.name() == "tritonserver" for c in children), [c.name() for c in children]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped (SIGTERM)" in out, out[-2000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.name() for c in alive]
