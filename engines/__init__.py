"""lcmrt.engines: engine builders (ONNX graph optimization, FP16, TensorRT). Imports the runtime, not torch."""
