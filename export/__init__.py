"""lcmrt.export: the build stage (torch, diffusers, peft, onnx). The runtime never imports it."""
