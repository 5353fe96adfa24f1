"""Triton python model: the artifact's ONNX model on ONNX Runtime (for tritonservers without the
onnxruntime backend, e.g. the one bundled in nvidia-pytriton). Requests of a dynamic batch are
concatenated into one run and split back.

A multi-task artifact: each row's ``task`` arrives as the task's name; it is mapped to its prompt-bank row
(the manifest copy lists the names) and the bank, loaded once and checked against its sha256, is fed with
every run. A request naming an unknown task gets an INVALID_ARG error (HTTP 400) that lists the known ones;
the other requests of the batch are still answered."""

import hashlib
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

MANIFEST_COPY = "apt_deploy_manifest.json"
TASK_INPUT = "task"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        here = os.path.dirname(os.path.abspath(__file__))
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        with open(os.path.join(here, MANIFEST_COPY), encoding="utf-8") as f:
            tasks = json.load(f).get("tasks")
        self.task_names = list(tasks["names"]) if tasks else []
        self.banks = _load_bank(os.path.join(here, tasks["bank_file"]), tasks["bank_sha256"]) if tasks else {}

    def execute(self, requests):
        arrays, errors = [], []
        for r in requests:
            try:
                arrays.append(self._arrays(r))
                errors.append(None)
            except ValueError as e:
                arrays.append(None)
                errors.append(pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        good = [a for a in arrays if a is not None]
        per_request = iter(self._run(good) if good else [])
        return [pb_utils.InferenceResponse(error=err) if err is not None else
                pb_utils.InferenceResponse([pb_utils.Tensor(n, t) for n, t in next(per_request)])
                for err in errors]

    def _arrays(self, request):
        out = {}
        for name, dtype in self.inputs:
            value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            out[name] = self._task_ids(value) if name == TASK_INPUT and self.task_names else value.astype(dtype)
        return out

    def _task_ids(self, names):
        ids = []
        for value in names.reshape(-1):
            name = bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, np.bytes_)) else str(value)
            if name not in self.task_names:
                raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(self.task_names)}; "
                                 "fix: send one of those names as \"task\"")
            ids.append(self.task_names.index(name))
        return np.asarray(ids, dtype=np.int64)

    def _run(self, arrays):
        sizes = [a[self.inputs[0][0]].shape[0] for a in arrays]
        feed = {n: np.concatenate([a[n] for a in arrays]) for n, _ in self.inputs}
        results = self.session.run(self.outputs, {**feed, **self.banks})
        splits = np.cumsum(sizes)[:-1]
        per_output = [np.split(r, splits) for r in results]
        return [[(n, np.ascontiguousarray(per_output[j][i])) for j, n in enumerate(self.outputs)]
                for i in range(len(arrays))]


def _load_bank(path, sha256):
    from safetensors.numpy import load_file

    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"prompt bank {path} does not match the sha256 in the manifest copy; rebuild the repository")
    return load_file(path)
