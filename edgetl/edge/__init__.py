"""TensorFlow-free runtime side of edgetl: decode images, run .tflite/.onnx, measure latency.

Imports only the standard library, NumPy, Pillow and (lazily) one inference runtime, so it runs on
boards where TensorFlow is not installed.
"""
