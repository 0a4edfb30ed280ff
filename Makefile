# edgetl developer entry points. `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgetl-installed
SHARED ?= ../shared
KERAS_MODELS ?= $(HOME)/.keras/models
# mediapipe (used only by the tests, to prove TFLite metadata works in MediaPipe's ImageClassifier)
# pins absl-py~=2.3, which conflicts with tensorflow-model-optimization's absl-py~=1.2 pin; it runs
# fine with absl-py 1.4, so it is installed without its dependency resolution.
MEDIAPIPE := mediapipe==1.2.2 opencv-contrib-python-headless==5.0.0.93

.PHONY: install demo test bench weights clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(MEDIAPIPE)
	touch $(STAMP)

install: $(STAMP)

# Offline ImageNet weights: seed the Keras cache from ../shared/weights when it is there (Keras looks
# in ~/.keras/models before downloading). Without it, Keras' normal download path is used.
weights:
	@if [ -f $(SHARED)/weights/mobilenet_v2_1.0_224_imagenet_notop_bncal.h5 ]; then \
	  mkdir -p $(KERAS_MODELS); \
	  for S in 96 128 160 192 224; do \
	    f=$(KERAS_MODELS)/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_$${S}_no_top.h5; \
	    [ -f $$f ] || cp $(SHARED)/weights/mobilenet_v2_1.0_224_imagenet_notop_bncal.h5 $$f; \
	  done; \
	  echo "ImageNet MobileNetV2 weights available offline in $(KERAS_MODELS)"; \
	fi

demo: install weights
	$(BIN)/edgetl run recipes/demo.yaml

test: install
	$(BIN)/python -m pytest -q --durations=10

bench: install weights
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
