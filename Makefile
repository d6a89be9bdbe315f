# cnnlab: `make demo` and `make test` work on a fresh machine (Python ≥ 3.10 + pip).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch>=2.6" "torchvision>=0.21"
	$(BIN)/pip install --quiet -e ".[dev]"
	# animal-mnist declares TensorFlow, which it does not need: install its data alone
	$(BIN)/pip install --quiet --no-deps animal-mnist
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cnnlab train recipes/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
