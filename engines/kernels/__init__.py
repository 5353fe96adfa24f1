"""GPU kernels for the fused APT op. ``triton_apd`` is the single source of the GPU math: the torch CUDA
kernel (:mod:`.torch_cuda`) and the TensorRT plugin (:mod:`engines.plugins.apt_plugin`) both launch it.

Nothing here imports torch or triton at module level.
"""
