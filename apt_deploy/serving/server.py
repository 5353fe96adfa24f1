"""A local Triton server: the real ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel.

That bundle carries only the python backend (no onnxruntime / tensorrt backend), so an artifact is
served through a repository whose model step is ONNX Runtime inside a python-backend model
(``triton-repo --backend python``). KServe v2 HTTP + gRPC, dynamic batching and Prometheus metrics are
Triton's own.

Fresh-machine pitfalls handled here (docs/serving.md): the python backend stub links ``libpython``
dynamically and would pick up the system's libpython of the same minor version before this interpreter's,
so the interpreter's LIBDIR goes first on ``LD_LIBRARY_PATH``; the stub finds this environment's
packages through ``PATH`` (not ``PYTHONPATH``); an interpreter built without a shared libpython cannot
run the stub at all and is refused with the reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError, InputPathError, MissingDependencyError

log = logging.getLogger(__name__)
SUPPORTED_PLATFORMS = ("ensemble",)  # plus backend "python"; onnxruntime_onnx / tensorrt_plan need NVIDIA's container


@dataclass(frozen=True)
class Endpoints:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


@dataclass(frozen=True)
class Bundle:
    """Where the pytriton wheel keeps tritonserver, the python backend, its stubs and shared libraries."""

    binary: Path
    backend: Path
    stub: Path
    libs: Path


def find_bundle() -> Bundle:
    try:
        import pytriton
    except ImportError as e:
        raise MissingDependencyError("nvidia-pytriton (which bundles tritonserver) is not installed",
                                     "the serve extra", 'pip install "apt-deploy[serve]"') from e
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = Bundle(root / "bin" / "tritonserver", root / "backends" / "python",
                    root / "python_backend_stubs" / version / "triton_python_backend_stub",
                    Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs")
    for path in (bundle.binary, bundle.backend, bundle.stub):
        if not path.exists():
            raise MissingDependencyError(f"{path} is missing from the nvidia-pytriton install",
                                         f"tritonserver, the python backend and a stub for Python {version}",
                                         "reinstall nvidia-pytriton, or use a Python it ships a stub for (3.8-3.13)")
    return bundle


def libpython_dir() -> Path:
    """This interpreter's shared-libpython directory (put first on LD_LIBRARY_PATH: docs/pitfalls.md)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise MissingDependencyError(f"this Python ({sys.executable}) was built without a shared libpython",
                                     "a Python built with --enable-shared (Triton's python stub links libpython)",
                                     "use a distribution / pyenv Python built with PYTHON_CONFIGURE_OPTS=--enable-shared")
    return Path(sysconfig.get_config_var("LIBDIR"))


def server_env(bundle: Bundle) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libs = [str(libpython_dir()), str(bundle.libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def backend_dir(bundle: Bundle, work: Path) -> Path:
    """A backend directory holding the python backend and the stub for this Python (as PyTriton lays it out)."""
    python = work / "backends" / "python"
    shutil.copytree(bundle.backend, python, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(bundle.stub, python / bundle.stub.name)
    return python.parent


def check_servable(repo: Path) -> None:
    """The bundled server runs python-backend models and ensembles only."""
    from apt_deploy.serving.triton_validate import parse_config

    for config in sorted(repo.glob("*/config.pbtxt")):
        cfg = parse_config(config)
        if cfg.backend != "python" and cfg.platform not in SUPPORTED_PLATFORMS:
            raise ConfigError(f"model {cfg.name!r} uses {cfg.platform or cfg.backend!r}",
                              "python-backend models and ensembles (the tritonserver bundled in nvidia-pytriton "
                              "has no onnxruntime or tensorrt backend)",
                              "serve the artifact itself, or regenerate with apt-deploy triton-repo --backend python; "
                              "run onnxruntime/tensorrt repositories in NVIDIA's Triton container (docs/serving.md)")


def command(bundle: Bundle, repo: Path, backends: Path, endpoints: Endpoints) -> list[str]:
    e = endpoints
    return [str(bundle.binary), f"--model-repository={repo}", f"--backend-directory={backends}",
            f"--http-address={e.host}", f"--http-port={e.http_port}", f"--grpc-address={e.host}",
            f"--grpc-port={e.grpc_port}", f"--metrics-address={e.host}", f"--metrics-port={e.metrics_port}",
            "--allow-metrics=true", "--allow-cpu-metrics=true", "--allow-gpu-metrics=false",
            "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0"]


class TritonServer:
    """``with TritonServer(repo, endpoints) as server: ...``: start, wait until ready, stop (the whole
    process group: tritonserver and its python stubs) on exit."""

    def __init__(self, repo: str | Path, endpoints: Endpoints = Endpoints(), log_file: str | Path | None = None,
                 ready_timeout: float = 120.0) -> None:
        self.repo, self.endpoints, self.ready_timeout = Path(repo).resolve(), endpoints, ready_timeout
        self.log_file = Path(log_file) if log_file else None
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_seconds: float | None = None
        self._work: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        check_servable(self.repo)
        bundle = find_bundle()
        self._work = tempfile.TemporaryDirectory(prefix="apt-deploy-triton-")
        backends = backend_dir(bundle, Path(self._work.name))
        out = open(self.log_file, "wb") if self.log_file else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._log_handle = out
        self.process = subprocess.Popen(command(bundle, self.repo, backends, self.endpoints), env=server_env(bundle),
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("tritonserver started (pid %d) on %s, repository %s", self.process.pid, self.endpoints.http_url, self.repo)

    def wait_ready(self) -> float:
        """Poll ``/v2/health/ready``; a server that exits or stays unready fails with its log's tail."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.ready_timeout:
            if self.process is None or self.process.poll() is not None:
                raise ConfigError(f"tritonserver exited with code {self.process and self.process.returncode} before "
                                  f"it was ready. {self.log_tail()}", "a repository the server can load",
                                  "read the log (--log FILE) and fix the failing model")
            if http_ready(self.endpoints.http_url):
                self.ready_seconds = time.perf_counter() - t0
                log.info("tritonserver ready in %.1f s", self.ready_seconds)
                return self.ready_seconds
            time.sleep(0.2)
        raise ConfigError(f"tritonserver not ready after {self.ready_timeout:.0f} s. {self.log_tail()}",
                          "a server that loads its models", "read the log (--log FILE)")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to tritonserver (it unloads the models and ends its python stubs), SIGKILL after
        ``timeout``; then any stub that outlived it is killed by pid, so nothing is left running."""
        import psutil

        proc, self.process = self.process, None
        if proc is not None:
            children = _children(proc.pid)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                    proc.kill()
                    proc.wait()
            _, alive = psutil.wait_procs(children, timeout=10)
            for child in alive:  # psutil.Process checks the pid still names the same process
                log.warning("killing leftover %s (pid %d)", child.name(), child.pid)
                child.kill()
        if getattr(self, "_log_handle", None) not in (None, subprocess.DEVNULL):
            self._log_handle.close()
        if self._work is not None:
            self._work.cleanup()
            self._work = None
        return proc.returncode if proc is not None else None

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_file or not self.log_file.is_file():
            return "(no log file; pass --log FILE to keep the server's output)"
        text = self.log_file.read_text(errors="replace").splitlines()
        useful = [t for t in text if not t.startswith("W") and "NVML" not in t and "DCGM" not in t]
        return "Server log tail: " + " | ".join(useful[-lines:])


def _children(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def http_ready(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=timeout) as r:  # noqa: S310 - loopback by default
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def repository_for(path: str | Path, name: str | None, work: Path, **settings: Any) -> Path:
    """``path`` itself when it is a model repository; for an artifact, a python-backend repository built in
    ``work`` (model name ``name`` or the artifact directory's name)."""
    from apt_deploy.manifest import MANIFEST_NAME

    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        from apt_deploy.serving.triton_repo import build_repository, parse_artifact_args
        from apt_deploy.settings import TritonRepoSettings

        artifacts = parse_artifact_args([f"{name}={path}" if name else str(path)])
        repo = work / "repository"
        build_repository(artifacts, repo, TritonRepoSettings(backend="python", **settings))
        return repo
    if any(path.glob("*/config.pbtxt")):
        from apt_deploy.serving.triton_validate import validate_repository

        if name:
            raise ConfigError(f"--name {name!r} with a model repository", "--name only with an artifact directory",
                              "drop --name (the repository's model names are used)")
        validate_repository(path)
        return path
    raise InputPathError(f"{str(path)!r} is neither an artifact (manifest.json) nor a model repository (*/config.pbtxt)",
                         "a directory written by apt-deploy export or apt-deploy triton-repo", "check the path")
