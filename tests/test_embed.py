"""C header for TensorFlow Lite Micro: compiled with gcc/g++, its bytes and labels must equal the model's."""
import shutil
import subprocess

import numpy as np
import pytest
import tf_keras as keras
from click.testing import CliRunner
from export_support import tflite_bytes

from edgetl.cli import cli
from edgetl.export.embed import write_c_header
from edgetl.export.metadata import MetadataError, add_metadata, read_metadata

CLASSES = ["cat", "dog", "bird"]
TRICKY = ['say "hi"', "back\\slash", "what??!", "café ü", "tab\there"]

PROGRAM = r"""
#include <stdint.h>
#include <stdio.h>
#include "model.h"

int main(int argc, char** argv) {
  (void)argc;
  /* The address check alone passes by luck: x86-64 gcc aligns big arrays anyway. __alignof__ (gcc/clang)
     reports the declared alignment, which TFLM needs on every target. */
  if (((uintptr_t)NAME % 16) != 0 || __alignof__(NAME) < 16) return 3;
  FILE* f = fopen(argv[1], "wb");
  if (!f || fwrite(NAME, 1, NAME_len, f) != NAME_len) return 4;
  fclose(f);
  for (unsigned int i = 0; i < NAME_num_labels; ++i) printf("%s\n", NAME_labels[i]);
  return 0;
}
"""


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    """A tiny float model (raw pixels -> 3 classes) without and with metadata, in two folders."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    plain = tflite_bytes(keras.Model(inputs, keras.layers.Dense(3, "softmax")(x)))
    root = tmp_path_factory.mktemp("embed")
    (root / "plain").mkdir()
    (root / "plain" / "1st-model.tflite").write_bytes(plain)
    (root / "tagged").mkdir()
    tagged = add_metadata(plain, labels=CLASSES, name="tiny", description="test", version="1")
    (root / "tagged" / "model.tflite").write_bytes(tagged)
    return root


COMPILERS = [("gcc", "c99", "c"), ("gcc", "c11", "c"), ("g++", "c++11", "cpp")]


@pytest.mark.parametrize("compiler,std,ext", COMPILERS, ids=[std for _, std, _ in COMPILERS])
def test_header_compiles_to_the_exact_model_bytes_and_labels(tiny_tflite, tmp_path, compiler, std, ext):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    model = tiny_tflite / "tagged" / "model.tflite"
    header = write_c_header(model, tmp_path / "model.h", var_name="NAME", labels=TRICKY)
    assert [p.name for p in tmp_path.iterdir()] == ["model.h"]  # written atomically, no temp left behind
    (tmp_path / f"main.{ext}").write_text(PROGRAM)
    subprocess.run([compiler, f"-std={std}", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o", tmp_path / "main",
                    tmp_path / f"main.{ext}"], check=True, cwd=header.parent, capture_output=True)
    run = subprocess.run([tmp_path / "main", tmp_path / "out.bin"], capture_output=True)
    assert run.returncode == 0, f"exit {run.returncode} (3: model array not 16-byte aligned)"
    assert (tmp_path / "out.bin").read_bytes() == model.read_bytes()
    assert run.stdout.decode("utf-8").split("\n")[:-1] == TRICKY


def test_labels_default_to_metadata_then_labels_txt(tiny_tflite, tmp_path):
    text = write_c_header(tiny_tflite / "tagged" / "model.tflite", tmp_path / "a.h").read_text()
    assert "const char* const model_labels[] = {\n  \"cat\",\n  \"dog\",\n  \"bird\",\n};" in text
    assert "const unsigned int model_num_labels = 3;" in text

    plain = tiny_tflite / "plain" / "1st-model.tflite"
    text = write_c_header(plain, tmp_path / "b.h").read_text()
    assert "model_1st_model[] = {" in text and "_labels" not in text  # no metadata, no labels.txt: no label arrays
    assert f"const unsigned int model_1st_model_len = {plain.stat().st_size};" in text
    (plain.parent / "labels.txt").write_text("x\ny\nz\n")
    text = write_c_header(plain, tmp_path / "c.h").read_text()
    assert "const unsigned int model_1st_model_num_labels = 3;" in text and '  "y",\n' in text


def test_refuses_bad_names_and_non_models(tiny_tflite, tmp_path):
    with pytest.raises(ValueError, match="not a C identifier"):
        write_c_header(tiny_tflite / "tagged" / "model.tflite", tmp_path / "m.h", var_name="2fast")
    (tmp_path / "notes.tflite").write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    with pytest.raises(MetadataError, match="notes.tflite is damaged or not a TFLite model: .* 'TFL3' is missing"):
        write_c_header(tmp_path / "notes.tflite", tmp_path / "m.h")
    assert not (tmp_path / "m.h").exists()


def damaged_copies(model: bytes) -> dict[str, bytes]:
    """An interrupted copy (half the file) and a garbled one (bytes overwritten after the TFL3 identifier)."""
    garbled = bytearray(model)
    garbled[12:64] = bytes(range(52))
    return {"truncated": model[: len(model) // 2], "garbled": bytes(garbled)}


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
@pytest.mark.parametrize("tagged", [False, True], ids=["plain", "with_metadata"])
def test_a_damaged_model_is_named_not_a_traceback(tiny_tflite, tmp_path, damage, tagged):
    source = tiny_tflite / ("tagged/model.tflite" if tagged else "plain/1st-model.tflite")
    model = tmp_path / f"{damage}.tflite"
    model.write_bytes(damaged_copies(source.read_bytes())[damage])
    message = f"{model} is damaged or not a TFLite model"
    with pytest.raises(MetadataError, match=message):
        read_metadata(model)
    with pytest.raises(MetadataError, match=message):
        write_c_header(model, tmp_path / "m.h")
    assert not (tmp_path / "m.h").exists()
    done = CliRunner().invoke(cli, ["embed", str(model), "--c-header", str(tmp_path / "m.h")])
    assert done.exit_code == 1 and f"Error: {message}" in done.output and "Traceback" not in done.output
