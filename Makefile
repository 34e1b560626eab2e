# Two commands a newcomer needs (see README.md):
#   make demo    set up .venv on a fresh machine and run the tiny CPU pretraining demo
#   make test    set up .venv on a fresh machine, lint, and run the CPU test suite
#   make lint    ruff's checks (pyproject.toml [tool.ruff]): seconds
#   make test-fast  the in-process tests only (no trainer subprocesses, no torchrun): 1-2 min
#   make test-gpu the CUDA tests (on a machine with a GPU)
#   make gpu-check  the prepared GPU check: CUDA tests + bf16 layer/step benchmarks, < 8 min,
#                 writes docs/RESULTS_gpu_<device>.md (run it first when a GPU is lent)
#   make gpu-bundle the wheels an offline GPU node with its own Python 3.12 and torch lacks, into
#                 .gpu-bundle/; there: bash benchmarks/gpu_run.sh (installs them, runs gpu-check)
#   make bench   run the layer benchmark
#   make hf-compat  check that HF exports load and agree under transformers 4.57.1 and the pin
# Variables: PYTEST_ARGS (extra pytest arguments, e.g. -m "not multiprocess"),
# REQUIRE_TESTS=1 (CI: a selection that collects no test fails instead of passing loudly).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)

.PHONY: setup demo lint test test-fast test-gpu gpu-check gpu-bundle bench hf-compat clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, on its own: on CPU machines a local CPU wheel satisfies the pin.
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -r requirements.txt
	# The package itself, editable: importable from tools/, benchmarks/ and tests without path
	# shims. Its dependencies are the pins just installed; its build backend is the pinned one.
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	bash examples/pretrain_tiny_cpu.sh

# The CPU suite hides any GPU, so it tests the same code paths on every machine.
# TEST_WORKERS pytest-xdist workers (tests/conftest.py lets one multi-process test run at a time
# and one-process tests two at a time); TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
CPU_PYTEST = CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(TEST_WORKERS)
lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	@$(CPU_PYTEST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  echo "NOTE: pytest collected no tests for PYTEST_ARGS='$(PYTEST_ARGS)' (exit 5): nothing was tested."; \
	  if [ "$(REQUIRE_TESTS)" = "1" ]; then exit 1; else exit 0; fi; \
	fi; exit $$rc

test-fast: setup
	$(CPU_PYTEST) -m "not slow and not multiprocess" $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -m gpu tests/test_gpu.py

gpu-check: setup
	$(PY) benchmarks/gpu_check.py

# The offline GPU node's bundle: every wheel a CPython 3.12 manylinux x86_64 node with its own
# torch lacks, pinned by hash in benchmarks/gpu-bundle.txt, into .gpu-bundle/ (under 64 MiB);
# benchmarks/gpu_run.sh installs it there without network. Needs the registry, no GPU, no torch.
# DeepSpeed is built here from its sdist (DS_BUILD_OPS=0, isolated build on the pinned setuptools).
GPU_BUNDLE := .gpu-bundle
GPU_BUNDLE_SRC := .cache/gpu-bundle
GPU_BUNDLE_TAGS := --python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
gpu-bundle:
	rm -rf $(GPU_BUNDLE).tmp $(GPU_BUNDLE_SRC)
	mkdir -p $(GPU_BUNDLE).tmp $(GPU_BUNDLE_SRC)
	$(PYTHON) -m pip download --quiet --no-deps --require-hashes $(GPU_BUNDLE_TAGS) \
		--only-binary=:all: --no-binary=deepspeed -d $(GPU_BUNDLE_SRC) -r benchmarks/gpu-bundle.txt
	grep -E '^setuptools==' requirements.txt > $(GPU_BUNDLE_SRC)/build-constraints.txt
	DS_BUILD_OPS=0 PIP_CONSTRAINT=$(CURDIR)/$(GPU_BUNDLE_SRC)/build-constraints.txt \
		$(PYTHON) -m pip wheel --quiet --no-cache-dir --no-deps -w $(GPU_BUNDLE).tmp \
		$(GPU_BUNDLE_SRC)/deepspeed-*.tar.gz
	@ls $(GPU_BUNDLE).tmp/deepspeed-*-py3-none-any.whl >/dev/null 2>&1 || \
		{ echo "error: the DeepSpeed build gave no py3-none-any wheel:" $$(ls $(GPU_BUNDLE).tmp); exit 1; }
	mv $(GPU_BUNDLE_SRC)/*.whl $(GPU_BUNDLE).tmp/
	cd $(GPU_BUNDLE).tmp && sha256sum *.whl > SHA256SUMS
	@size=$$(du -sb $(GPU_BUNDLE).tmp | cut -f1); \
	if [ $$size -ge 67108864 ]; then echo "error: $(GPU_BUNDLE) is $$size bytes (limit 64 MiB)"; exit 1; fi
	rm -rf $(GPU_BUNDLE) && mv $(GPU_BUNDLE).tmp $(GPU_BUNDLE)
	@ls -l $(GPU_BUNDLE) && echo "$(GPU_BUNDLE): $$(du -sb $(GPU_BUNDLE) | cut -f1) bytes;" \
		"on the GPU node: bash benchmarks/gpu_run.sh"

bench: setup
	$(PY) benchmarks/bench_layer.py

HF_COMPAT := .cache/hf_compat
hf-compat: setup
	$(PY) -m pip install -q --target .cache/transformers4 transformers==4.57.1
	$(PY) -m tests.hf_compat_check --make-exports $(HF_COMPAT)
	$(PY) -m tests.hf_compat_check $(HF_COMPAT)/v5.pt $(HF_COMPAT)/dense $(HF_COMPAT)/moe \
		$(HF_COMPAT)/hypermoe $(HF_COMPAT)/qwen2_moe $(HF_COMPAT)/qwen3_moe \
		$(HF_COMPAT)/hypermoe_options
	PYTHONPATH=.cache/transformers4 $(PY) -m tests.hf_compat_check $(HF_COMPAT)/v4.pt \
		$(HF_COMPAT)/dense $(HF_COMPAT)/moe $(HF_COMPAT)/hypermoe $(HF_COMPAT)/qwen2_moe \
		$(HF_COMPAT)/qwen3_moe $(HF_COMPAT)/hypermoe_options
	$(PY) -m tests.hf_compat_check --compare $(HF_COMPAT)/v5.pt $(HF_COMPAT)/v4.pt

clean:
	rm -rf $(VENV) .pytest_cache
