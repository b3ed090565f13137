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

demo: $(STAMP)
	$(BIN)/dsran extract --images data/coco-mini/images --out demo/feats.zarr \
		--captions data/coco-mini/annotations/captions_train2017.json \
		--captions data/coco-mini/annotations/captions_val2017.json \
		--random-weights --no-regions
	$(BIN)/dsran info demo/feats.zarr

clean-demo:
	rm -rf demo
