"""ONNX -> running artifact: runners (ONNX Runtime, TensorRT, torch), comparison, benchmarks.

No module here imports torch at module level; torch-backed runners import it lazily.
"""
