# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is pinned here (a CPU wheel); pyproject.toml holds a range that admits it.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-full test test-slow test-all test-browser browser install bench bench-gpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mixmodal.demo --config configs/demo.yaml --out demo_out

# both recipes (docs/recipes.md): 48 px tokenizers, token and latent models, evals, curves; hours, resumable
demo-full: $(STAMP)
	$(BIN)/python -m mixmodal.demo_full --out demo_full

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the serve page in headless Chromium: Debian's chromium + chromium-driver (no browser download at run time)
browser:
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

test-browser: $(STAMP) browser
	$(BIN)/python -m pytest -q tests/test_serve.py -k chromium

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/generate.py

# one CUDA GPU, < 10 minutes: tests -m gpu + train/decode benchmarks (MFU) -> benchmarks/results/gpu.json; one line without a GPU
bench-gpu: $(STAMP)
	@$(BIN)/python benchmarks/gpu.py --check
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf demo_out .pytest_cache
