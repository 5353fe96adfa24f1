"""Triton python model: the artifact's ONNX model on ONNX Runtime (for tritonservers without the
onnxruntime backend, e.g. the one bundled in nvidia-pytriton). Requests of a dynamic batch are
concatenated into one run and split back."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


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

    def execute(self, requests):
        arrays = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy().astype(dt) for n, dt in self.inputs}
                  for r in requests]
        sizes = [a[self.inputs[0][0]].shape[0] for a in arrays]
        feed = {n: np.concatenate([a[n] for a in arrays]) for n, _ in self.inputs}
        results = self.session.run(self.outputs, feed)
        splits = np.cumsum(sizes)[:-1]
        per_output = [np.split(r, splits) for r in results]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(per_output[j][i]))
                                            for j, n in enumerate(self.outputs)]) for i in range(len(requests))]
