"""Load test of the demo-shaped artifact served by the bundled tritonserver (README / docs/serving.md figures).

The artifact has the demo's architecture (``tiny.demo_vilt_config``: hidden 128, 4 layers, 64 px, 16 text
tokens) and the demo's APT size (p = 50, r = 4); its weights are seeded random, not trained, because serving
latency does not depend on the values (``--artifact`` serves a trained one, e.g. ``apt-deploy-demo/artifact``).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any


def demo_shaped_artifact(work: Path, seed: int = 0) -> Path:
    import apt_deploy as ad
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import DemoSettings, ExportSettings
    from apt_deploy.tiny import demo_vilt_config, save_tiny_vilt
    from exporters.onnx_export import export_artifact

    demo = DemoSettings()
    base = save_tiny_vilt(work / "base_model", seed=seed, overwrite=True, **demo_vilt_config())
    model = ad.get_backbone("vilt").load(str(base))
    ad.apply_apt(model, ad.APTConfig(prompt_len=demo.prompt_len, rank=demo.rank))
    prompts = ad.save_prompts(model, work / "prompts", overwrite=True)
    source = {"model_dir": str(base.resolve()), "prompts_dir": str(Path(prompts).resolve())}
    return export_artifact(load_trained(base, prompts), work / "artifact", ExportSettings(batch_max=8, overwrite=True),
                           source=source)


def run(work: Path, artifact: Path | None, concurrency: int, requests: int) -> dict[str, Any]:
    """Serve the artifact on free loopback ports; a sequential run, then the concurrent one."""
    import tempfile

    from apt_deploy.serving.loadtest import LoadSettings, default_image, run_loadtest
    from apt_deploy.serving.server import Endpoints, TritonServer, repository_for

    artifact = artifact or demo_shaped_artifact(work)
    ports = free_ports(3)
    endpoints = Endpoints("127.0.0.1", *ports)
    with tempfile.TemporaryDirectory() as tmp, \
            TritonServer(repository_for(artifact, "vqa", Path(tmp)), endpoints, log_file=work / "triton.log") as server:
        ready = server.ready_seconds
        image = default_image()
        sequential = run_loadtest(endpoints.http_url, "vqa", image, None, LoadSettings(concurrency=1, requests=100))
        concurrent = run_loadtest(endpoints.http_url, "vqa", image, None,
                                  LoadSettings(concurrency=concurrency, requests=requests))
    return {"artifact": str(artifact), "server": "tritonserver bundled in nvidia-pytriton, python backend (ORT) + ensemble",
            "ready_seconds": round(ready, 2), "sequential": sequential, "concurrent": concurrent}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released for the server to take)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
