"""onnxgrad: train ONNX models with backpropagation."""
