# The two set-up commands of the README: `make demo` and `make test`.
# Both create and use the project's own virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := /usr/share/datasets/fashion-mnist
OUT    ?= runs/demo

.PHONY: venv demo test bench clean data

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package when we can install it; otherwise `ttt-pipe run`
# finds the data elsewhere or downloads it through torchvision.
data:
	@if [ ! -d $(DATA) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null \
		|| echo "note: could not install dataset-fashion-mnist; ttt-pipe will look elsewhere"; \
	fi

demo: venv data
	$(BIN)/ttt-pipe run --dataset fashion-mnist --out $(OUT)

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/engine_speed.py
	$(BIN)/python benchmarks/engine_accuracy.py

clean:
	rm -rf $(VENV) runs .pytest_cache
