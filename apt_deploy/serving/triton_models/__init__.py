"""Triton python-backend models, copied as ``<model>/1/model.py`` by apt-deploy triton-repo.

They run inside Triton's python stub (the bundled tritonserver here, NVIDIA's container in production)
and import only numpy, Pillow, tokenizers, onnxruntime and ``apt_preprocess`` (a verbatim copy of
apt_deploy/serving/preprocess.py placed beside them) -- never apt_deploy, torch or transformers.
"""
