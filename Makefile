# Two commands on a fresh machine: `make demo` (the key-value arithmetic composition on CPU)
# and `make test`. Each creates .venv from the pinned requirements if missing and builds the
# C++ extension (and CUDA, when nvcc is found) first.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test build venv clean

venv: .venv/.installed
.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

build: venv
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: build
	.venv/bin/calm-fast demo

test: build
	$(PY) -m pytest -q tests

clean:
	rm -rf build .venv *.egg-info calm_fast/_C*.so
