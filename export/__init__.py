"""The export stage of legion_rt (PyTorch): LEGION modules, safe checkpoint loading, the reference pipeline,
ONNX export and make-tiny. Importable as top-level `export` from a checkout and as `legion_rt.export` from a
wheel; the runtime never imports it."""
