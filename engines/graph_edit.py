"""ONNX graph edits on exported artifacts (no torch): the APT-bypassed baseline of a model.

``bypass_fused_nodes`` rewires every consumer of a fused ``apt::ApproxPromptDiffusion`` node's output to
the node's ``o`` input and drops the node and its now-unused constants: the same graph without APT's
extra work (e^s stays folded into the output projection, so it equals the base model only where s = 0,
and costs exactly what the base model costs), for base-vs-APT timing without a second export (Stable Diffusion's UNet, where exporting twice costs
minutes at full scale). External data stays where it is: the edited model is written beside the source
and keeps referring to the same ``.data`` file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx

from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as OP


def bypass_fused_nodes(src: str | Path, dst: str | Path, keep: Callable[[onnx.NodeProto], bool] | None = None) -> int:
    """Write ``dst`` = ``src`` with every fused node for which ``keep(node)`` is false bypassed; returns
    how many were bypassed. ``dst`` must be in ``src``'s directory (external data paths are relative)."""
    src, dst = Path(src), Path(dst)
    if src.resolve().parent != dst.resolve().parent:
        raise ValueError(f"{dst} must be written beside {src} (external data is referenced relative to it)")
    model = onnx.load(str(src), load_external_data=False)
    fused = [n for n in model.graph.node if n.domain == OP.domain and n.op_type == OP.onnx_name]
    drop = [n for n in fused if keep is None or not keep(n)]
    rename = {n.output[0]: n.input[1] for n in drop}  # y -> o
    for node in model.graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    for output in model.graph.output:
        if output.name in rename:
            raise ValueError(f"fused node output {output.name!r} is a graph output; cannot bypass it")
    for node in drop:
        model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    onnx.save(model, str(dst))
    return len(drop)
