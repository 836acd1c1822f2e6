# One-command set-up: `make demo` and `make test` each create the virtual env, install
# the CPU torch wheel when no NVIDIA GPU is present, build longctx (incl. the C++
# extension) in editable mode, and then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_CPU_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.longctx-installed

.PHONY: setup demo test test-fast test-oldest bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch wheel"; \
		$(PIP) install -q "torch>=2.5,<2.16"; \
	else \
		echo "No GPU: installing the CPU torch wheel ($(TORCH_CPU_SPEC))"; \
		$(PIP) install -q "$(TORCH_CPU_SPEC)"; \
	fi
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/longctx demo

test: $(STAMP)
	$(PY) -m pytest tests -x -q -m "not slow"

test-fast: $(STAMP)
	$(PY) -m pytest tests -x -q -m "not slow" --ignore=tests/notebooks

# Runs the patching tests against the oldest supported transformers in a separate env.
test-oldest: $(STAMP)
	test -x .venv-oldest/bin/python || $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/pip install -q "$(TORCH_CPU_SPEC)"
	.venv-oldest/bin/pip install -q -e ".[test]" "transformers==5.17.*"
	.venv-oldest/bin/python -m pytest tests/test_patch.py tests/test_models.py -x -q

bench: $(STAMP)
	$(VENV)/bin/longctx bench --shape llama-3.1-8b --context 8192,32768 --backend dense

clean:
	rm -rf build *.egg-info longctx/_C*.so $(VENV) .venv-oldest
