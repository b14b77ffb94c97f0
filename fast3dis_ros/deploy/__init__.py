"""Deployment beyond PyTorch: ONNX export, onnxruntime and TensorRT engines (no ROS here)."""
