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

# The demo extracts grid and region features with random CNN weights. The published
# detector settings (600-pixel input, 300 proposals, 100 regions) take about 14 s per
# image on 2 CPU cores, so the demo detector sees 200-pixel images and keeps 10 of 10
# proposals: about 0.5 s per image (benchmarks/README.md).
DEMO_REGIONS := --region-min-size 200 --region-max-size 333 --region-proposals 10 \
	--min-boxes 10 --max-boxes 10

demo: $(STAMP)
	$(BIN)/dsran extract --images data/coco-mini/images --out demo/feats.zarr \
		--captions data/coco-mini/annotations/captions_train2017.json \
		--captions data/coco-mini/annotations/captions_val2017.json \
		--random-weights $(DEMO_REGIONS)
	$(BIN)/dsran info demo/feats.zarr
	$(BIN)/dsran show demo/feats.zarr val2017/000000000139.jpg --images data/coco-mini/images \
		--out demo/regions_000000000139.png

clean-demo:
	rm -rf demo
