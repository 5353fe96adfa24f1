"""One runner shared by many threads: one session, correct results (ONNX Runtime), serialized infer for
runners with shared buffers (the TensorRT / CUDA-graph runners use engines.runners.serialized)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engines.runners import CallableRunner, OnnxRuntimeRunner, Runner, serialized


def _feeds(artifact, n):
    from apt_deploy.manifest import read_manifest
    from engines.bench import build_feed

    manifest = read_manifest(artifact)
    return [build_feed(manifest, batch=1 + i % 3, seed=i) for i in range(n)]


def test_concurrent_first_calls_create_one_session(apt_artifact, monkeypatch):
    import onnxruntime as ort

    created, real = [], ort.InferenceSession

    def slow_session(*args, **kwargs):
        created.append(threading.get_ident())
        time.sleep(0.2)  # widen the race window: without the lock every thread would create its own
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", slow_session)
    runner = OnnxRuntimeRunner(apt_artifact / "model.onnx", threads=1)
    feed = _feeds(apt_artifact, 1)[0]
    barrier = threading.Barrier(4)

    def first_call(_):
        barrier.wait()
        return runner.infer(feed)["logits"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(first_call, range(4)))
    assert len(created) == 1, f"{len(created)} sessions created"
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_shared_runner_gives_each_thread_its_own_answer(apt_artifact):
    feeds = _feeds(apt_artifact, 24)
    with OnnxRuntimeRunner(apt_artifact / "model.onnx", threads=1) as runner:
        expected = [runner.infer(f)["logits"] for f in feeds]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda f: runner.infer(f)["logits"], feeds * 3))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, expected[i % len(feeds)], err_msg=f"request {i}")


class _SharedBuffer(Runner):
    """A runner that, like a CUDA-graph replay, writes its input into one shared buffer and reads it back."""

    def __init__(self) -> None:
        self.buffer = np.zeros(4)
        self.inside = 0
        self.max_inside = 0

    @serialized
    def infer(self, feed):
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        self.buffer[:] = feed["x"]
        time.sleep(0.002)
        out = {"y": self.buffer.copy()}
        self.inside -= 1
        return out


def test_serialized_infer_never_overlaps_and_keeps_answers_apart():
    runner = _SharedBuffer()
    feeds = [{"x": np.full(4, float(i))} for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(runner.infer, feeds))
    assert runner.max_inside == 1
    assert all(np.all(g["y"] == i) for i, g in enumerate(got))


def test_lock_is_per_runner_and_reentrant():
    a, b = CallableRunner(lambda f: f, "a"), CallableRunner(lambda f: f, "b")
    assert a.lock is a.lock and a.lock is not b.lock
    with a.lock, a.lock:
        pass


@pytest.mark.parametrize("module", ["engines.trt_runner", "engines.kernels.torch_cuda"])
def test_gpu_runners_serialize_infer(module):
    import importlib

    cls = next(c for c in vars(importlib.import_module(module)).values()
               if isinstance(c, type) and issubclass(c, Runner) and c is not Runner and "infer" in vars(c))
    assert getattr(cls.infer, "__wrapped__", None) is not None, f"{cls.__name__}.infer is not @serialized"
