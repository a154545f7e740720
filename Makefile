# trackb — see README.md. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TRACKB := $(VENV)/bin/trackb
RUN_ID ?= demo
CONFIG ?= jobs/configs/demo.yaml
# Nothing may come from a model hub: the demo builds its own tiny model.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
CHECKOV_VERSION ?= 3.3.30
CHECKOV := .cache/checkov-venv/bin/checkov

.PHONY: install demo test test-fast lint bench clean help

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch for development and CI; the GPU images pin their own builds.
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed ## Create .venv with trackb and its pinned dependencies

demo: install ## Run the whole pipeline on CPU (verl corpus, reference teacher, tiny model)
	$(TRACKB) run-all --config $(CONFIG) --run-id $(RUN_ID)

test: install tools $(CHECKOV) ## Run the test suite (unit + integration; CPU only)
	$(PY) -m pytest --durations=15

test-fast: install ## Unit tests only (skips integration and slow)
	$(PY) -m pytest -m "not integration and not slow"

lint: install ## ruff over the code and tests
	$(VENV)/bin/ruff check trackb_core jobs tests benchmarks scripts

bench: install ## Benchmarks: print measured ratios against a baseline run in-process
	$(PY) -m benchmarks

# The GPU benchmark runs on the machine's own CUDA python (GPU images pin their own
# torch; .venv holds a CPU build), so it installs nothing. See BENCHMARKS.md.
GPU_PYTHON ?= python3
GPU_BENCH_ARGS ?= --shape qwen2.5-coder-1.5b --budget-seconds 480
.PHONY: bench-gpu
bench-gpu: ## GPU benchmark (LoRA train + eval generation at Qwen2.5-Coder-1.5B shape, <= 8 min)
	$(GPU_PYTHON) -m benchmarks.gpu_bench $(GPU_BENCH_ARGS)

clean: ## Remove the venv and local runs
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# ---- container images (images/*/Dockerfile; see images/README.md) ----------------------
REGISTRY ?= ghcr.io/trackb
IMAGES := cpu trainer vllm
# One version everywhere: trackb_core.__version__ is pyproject's version, the chart's
# appVersion and the images' default tag (kubernetes.images.tag), and CI pushes release
# tag v<version> as <version> (tests/images/test_image_tags.py keeps them equal). Set
# IMAGE_TAG (and kubernetes.images.tag) for any other build.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' trackb_core/__init__.py)
IMAGE_TAG ?= $(VERSION)
IMAGE_REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE_SOURCE ?= $(shell git config --get remote.origin.url)
PLATFORM ?= linux/amd64
# One buildx call per image; the registry cache (<image>:buildcache) is read by both
# targets and written by `push` (an unpushed local build cannot write a registry cache).
BUILDX = docker buildx build --platform $(PLATFORM) \
	-f images/$(1)/Dockerfile \
	--build-arg VERSION=$(IMAGE_TAG) --build-arg REVISION=$(IMAGE_REVISION) \
	--build-arg SOURCE=$(IMAGE_SOURCE) \
	--cache-from type=registry,ref=$(REGISTRY)/trackb-$(1):buildcache \
	-t $(REGISTRY)/trackb-$(1):$(IMAGE_TAG)

.PHONY: images push images-lint image-tag

image-tag: ## Print the tag `make images` and `make push` give (default: trackb's version)
	@echo $(IMAGE_TAG)

images: ## Build the cpu, trainer and vllm images into the local docker (tag: trackb's version)
	$(foreach img,$(IMAGES),$(call BUILDX,$(img)) --load . &&) true

push: ## Build and push the three images to $(REGISTRY), with a registry build cache
	@# The version's tag is what the chart runs by default: only its release commit may
	@# push it (CI does, from tag v$(VERSION)); other builds name their own IMAGE_TAG.
	@if [ "$(IMAGE_TAG)" = "$(VERSION)" ] && [ "$$(git describe --tags --exact-match --dirty 2>/dev/null)" != "v$(VERSION)" ]; then \
		echo "push: this tree is not the clean release commit v$(VERSION): set IMAGE_TAG (and kubernetes.images.tag) for this build" >&2; exit 2; fi
	$(foreach img,$(IMAGES),$(call BUILDX,$(img)) \
		--cache-to type=registry,ref=$(REGISTRY)/trackb-$(img):buildcache,mode=max \
		--push . &&) true

images-lint: install ## hadolint and shellcheck over images/ (as the tests and CI do)
	$(VENV)/bin/hadolint --config images/.hadolint.yaml images/*/Dockerfile
	$(VENV)/bin/shellcheck images/*/*.sh

.PHONY: tools values-schema

tools: install ## Fetch the real helm v4 and kubectl v1.35 into .cache/tools/bin (idempotent)
	$(PY) scripts/fetch_helm.py

values-schema: install ## Regenerate helm/trackb/values.schema.json and values.yaml's generated blocks
	$(PY) scripts/gen_values_schema.py

.PHONY: presets
presets: install ## Write the platform presets (helm/trackb/ci/*-values.yaml, jobs/configs/cluster-*.yaml) from trackb_core/k8s/presets.py
	$(PY) scripts/gen_presets.py

.PHONY: render checkov

render: install ## Write k8s/rendered/ from the one Job-spec builder (demo + cluster-gpu configs)
	$(TRACKB) render --config jobs/configs/demo.yaml --run-id demo --out k8s/rendered/demo
	$(TRACKB) render --config jobs/configs/cluster-gpu.yaml --run-id cluster-gpu --out k8s/rendered/cluster-gpu

checkov: $(CHECKOV) ## Policy scan of k8s/ (checkov in its own venv under .cache/checkov-venv)
	k8s/checkov.sh

# checkov's pins clash with trackb's, so it gets a venv of its own (the tests use it).
$(CHECKOV):
	$(PYTHON) -m venv .cache/checkov-venv
	.cache/checkov-venv/bin/pip install --quiet checkov==$(CHECKOV_VERSION)

# ---- Kubernetes -----------------------------------------------------------------------
CLUSTER_CONFIG ?= jobs/configs/cluster-gpu.yaml
.PHONY: launch-all e2e

launch-all: install ## Run the pipeline as Kubernetes Jobs on the kubeconfig's cluster (resumable by RUN_ID)
	$(TRACKB) run-all --config $(CLUSTER_CONFIG) --backend k8s --run-id $(RUN_ID)

e2e: install ## CPU profile (cpu image, tiny model, reference teacher) on a real cluster if KUBECONFIG is set
	@if [ -z "$$KUBECONFIG" ]; then \
		echo "e2e: skipped: KUBECONFIG is not set (e.g. kind create cluster --config k8s/kind-config.yaml)"; \
	else \
		$(TRACKB) run-all --config jobs/configs/demo.yaml --backend k8s --run-id e2e; \
	fi
