"""Triton python model: logits -> the top-k ``labels`` (BYTES) and ``scores`` (FP32) per row."""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from apt_preprocess import Postprocessor  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.top_k = int(config["parameters"]["top_k"]["string_value"])
        self.post = Postprocessor(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets"))

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy()
            labels, scores = self.post(logits.astype(np.float32), self.top_k)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("labels", np.array([[s.encode("utf-8") for s in row] for row in labels], dtype=np.object_)),
                pb_utils.Tensor("scores", scores.astype(np.float32))]))
        return responses
