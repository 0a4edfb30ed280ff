"""The command line's own behaviour: TensorFlow's native log lines hidden by default, shown with --verbose."""
import subprocess
import sys

from edgetl.console import drop_noise

SCRIPT = ("import sys; from edgetl.console import filter_native_stderr; filter_native_stderr(); "
          "import tensorflow as tf; tf.constant(1.0) + 1; sys.stderr.write('edgetl: a real message\\n')")


def test_drop_noise_keeps_everything_but_absl_and_tensorflow_log_lines():
    noisy = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             b"I0000 00:00:1796171363.700793    5149 port.cc:153] oneDNN custom operations are on.\n"
             b"E0000 00:00:1796171366.303843    5149 cuda_platform.cc:52] failed call to cuInit\n"
             b"WARNING:tensorflow:Compiled the loaded model, but the compiled metrics have yet to be built.\n"
             b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: UINT8\n"
             b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
             b"Error: data.batch_size = -3 is out of range\n"
             b"Traceback (most recent call last):\n")
    assert drop_noise(noisy) == b"Error: data.batch_size = -3 is out of range\nTraceback (most recent call last):\n"


def test_native_tensorflow_lines_are_filtered_and_real_output_kept():
    quiet = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert "edgetl: a real message" in quiet.stderr
    assert "port.cc" not in quiet.stderr and "absl::InitializeLog" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", SCRIPT.replace("filter_native_stderr(); ", "")],
                          capture_output=True, text=True, timeout=120)
    assert "absl::InitializeLog" in loud.stderr  # the filter is what hides them (so this test can fail)
