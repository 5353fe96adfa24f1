"""Triton python model: encoded image bytes (+ question) -> the artifact's input tensors.

A bad request (undecodable / empty / oversized image, empty question) gets an INVALID_ARG error that
names what was wrong (HTTP 400); the other requests of the same batch are still answered.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from apt_preprocess import Preprocessor, RequestError  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))
        self.pre = Preprocessor(os.path.join(here, "assets"), max_image_bytes=int(params["max_image_bytes"]))
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            images = [_bytes(v) for v in pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)]
            questions = None
            if self.pre.needs_question:
                tensor = pb_utils.get_input_tensor_by_name(request, "question")
                questions = [_text(v) for v in tensor.as_numpy().reshape(-1)] if tensor is not None else None
            feed = self.pre(images, questions)
        except RequestError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(feed[n].astype(dt)))
                                           for n, dt in self.outputs])


def _bytes(value):
    return bytes(value) if isinstance(value, (bytes, bytearray, np.bytes_)) else value


def _text(value):
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"question is not UTF-8 ({e})", "UTF-8 text", "encode the question as UTF-8") from e
    return str(value)
