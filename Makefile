# edgetl developer entry points. `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgetl-installed
SHARED ?= ../shared
KERAS_MODELS ?= $(HOME)/.keras/models
# mediapipe (used only by a test, to prove TFLite metadata works in MediaPipe's ImageClassifier) pins
# absl-py~=2.3, which conflicts with tensorflow-model-optimization's absl-py~=1.2: it gets a venv of its own
# inside .venv, so the main environment stays consistent (`pip check`).
MEDIAPIPE_VENV := $(VENV)/mediapipe
MEDIAPIPE_STAMP := $(MEDIAPIPE_VENV)/.installed
ARGS ?=

.PHONY: install demo test lint bench weights clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

$(MEDIAPIPE_STAMP): | $(BIN)/python
	$(BIN)/python -m venv $(MEDIAPIPE_VENV)
	$(MEDIAPIPE_VENV)/bin/python -m pip install --quiet mediapipe==1.2.2
	touch $(MEDIAPIPE_STAMP)

install: $(STAMP) $(MEDIAPIPE_STAMP)

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

# Two pytest workers, one per core (pytest-xdist): most of a test's time is single-threaded Python (building and
# converting tiny models); on the 2-core CI machine 2 min 02 s against 3 min 03 s in one process. A test file stays
# on one worker, so its module fixtures are built once. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 $(ARGS)

lint: install
	$(BIN)/ruff check edgetl tests benchmarks recipes

bench: install weights
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
