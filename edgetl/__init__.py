"""edgetl: from an image-classification dataset to a validated edge model.

This is the one place that configures TensorFlow's environment. It must run before TensorFlow is
imported anywhere, and every edgetl module is imported through this package, so it always does:
tensorflow-model-optimization and tf2onnx need Keras 2 (`tf_keras`), not Keras 3.
"""
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
