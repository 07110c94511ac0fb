# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/demo
RUNS := runs/demo
DEMO := --config configs/demo/base.yaml

.PHONY: demo test install data lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstalls when the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## data: the synthetic scenes as WebDataset shards, and the caption vocabulary for the decoder
data: install
	$(BIN)/python tools/make_shards.py synthetic --out $(DATA) --overwrite
	$(BIN)/python tools/decoder_vocab.py $(DATA)/train $(DATA)/val $(DATA)/test --out $(DATA)/decoder_vocab.json

## demo: stage 1, stage 2 (initialised from stage 1), test, metrics beside chance
demo: data
	rm -rf $(RUNS)
	$(BIN)/lightning fit $(DEMO) --config configs/demo/stage1.yaml
	$(BIN)/lightning fit $(DEMO) --config configs/demo/stage2.yaml
	$(BIN)/lightning test $(DEMO) --config configs/demo/stage2.yaml --ckpt_path $(RUNS)/stage2/checkpoints/last.ckpt
	$(BIN)/python tools/show_metrics.py $(RUNS)/test_metrics.json --expected configs/demo/expected_metrics.json

## test: the CPU test suite (slow tests: `make test PYTEST_ARGS="-m slow"`)
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## ablation: the encode modes trained with one budget on the compositional synthetic set; the
## table lands in runs/ablation/results.md (options: make ablation ABLATION_ARGS="--steps 600")
.PHONY: ablation
ablation: install
	$(BIN)/python tools/ablate_modes.py $(ABLATION_ARGS)

## compare: the CLIP anchor (open_clip, configs/demo/clip.yaml) trained on the demo shards for the
## LaME demo's step count (100 + 600), tested, and printed beside the LaME demo's test metrics
## (run `make demo` first for those)
CLIP_RUNS := runs/clip
.PHONY: compare
compare: data
	rm -rf $(CLIP_RUNS)
	$(BIN)/lightning fit --config configs/demo/clip.yaml
	$(BIN)/lightning test --config configs/demo/clip.yaml --ckpt_path $(CLIP_RUNS)/demo/checkpoints/last.ckpt
	$(BIN)/python tools/show_metrics.py $(RUNS)/test_metrics.json $(CLIP_RUNS)/test_metrics.json --names LaME CLIP

## lint: ruff's checks and its formatter (CI runs this before the tests)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(RUNS) $(DATA)
