# The two entry points of the README: `make demo` and `make test`. Both create the
# virtual environment in .venv when it is missing and install dsran into it with the
# exact versions of constraints.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m ruff check .

format: $(STAMP)
	$(BIN)/python -m ruff format .
	$(BIN)/python -m ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

# The demo is the DVC pipeline (dvc.yaml) with the sample's parameters (params.yaml):
# extract grid and region features of the 159 sample images, train on the 80 train2017
# images, evaluate on the 79 val2017 images, print the report and draw one image's boxes.
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m dvc repro
	$(BIN)/dsran info pipeline/feats.zarr
	$(BIN)/dsran show pipeline/feats.zarr val2017/000000000139.jpg --images data/coco-mini/images \
		--out pipeline/regions_000000000139.png
	cat pipeline/eval/results.md

clean-demo:
	rm -rf pipeline dvc.lock
