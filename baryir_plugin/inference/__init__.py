"""Running trained networks on users' images: weights of any kind in, restored files out (``baryir infer``),
exact tiled execution for images of any size, and export (ONNX, safetensors)."""
