"""torch -> ONNX: export per backbone spec, the fused op's ONNX form, validation."""
