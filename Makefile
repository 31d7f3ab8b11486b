# Quick start: `make demo`, `make test`. Override the interpreter with `make PYTHON=/path/to/python3.x`.
#
# The default interpreter is Python 3.11: there `pip install torch==2.13.0` (the parity-test oracle) is a
# local CPU wheel, and jax resolves to 0.10.2. On 3.12+ the same pin pulls the multi-GB CUDA build, so the
# 3.12 + newest-jax check (`make test-latest`) runs the torch-free tests only.
PYTHON ?= $(shell for p in python3.11 python3 python; do \
	  $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; \
	done)
ifeq ($(PYTHON),)
PYTHON := python3
endif
VENV ?= .venv
PY := $(VENV)/bin/python
# two workers: XLA:CPU compiles one program at a time per process, most test time is compilation. loadgroup:
# tests that share an expensive module fixture (xdist_group marks) run on one worker, so it is built once
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: venv test demo bench world-assets test-latest check-install clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/persguard demo

# Re-make the committed synthetic-world models (persguard_jax/assets/README.md): about 37 minutes on 2 CPU cores.
ASSETS := persguard_jax/assets
world-assets: venv
	$(VENV)/bin/persguard pretrain --out runs/world_tiny --overwrite
	$(VENV)/bin/persguard train-clip --out runs/world_clip --overwrite
	rm -rf $(ASSETS)/world_tiny $(ASSETS)/world_clip
	cp -r runs/world_tiny/model $(ASSETS)/world_tiny
	cp -r runs/world_clip/model $(ASSETS)/world_clip
	cp runs/world_tiny/results.json $(ASSETS)/world_tiny_results.json
	cp runs/world_clip/results.json $(ASSETS)/world_clip_results.json
	cp runs/world_tiny/samples.png $(ASSETS)/world_tiny_samples.png
	cp runs/world_tiny/shape_samples.png $(ASSETS)/world_tiny_shape_samples.png
	cp runs/world_tiny/texture_samples.png $(ASSETS)/world_tiny_texture_samples.png

# The package as a user gets it: a fresh venv, `pip install .` (not editable; dependencies from the package index),
# then `persguard demo` from an empty temporary folder, so only what the package ships can be used (and the world
# models must be the shipped ones: none may be trained into the cache). Built from a copy of the tracked and new
# files: an in-tree build would leave build/, whose stale files a later build would ship. Everything, the cache
# included, lives in one temporary folder removed at the end. Demo overrides: CHECK_INSTALL_ARGS='dreambooth.steps=2'.
CHECK_INSTALL_ARGS ?=
check-install:
	@set -e; unset PYTHONPATH; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; export PERSGUARD_CACHE="$$tmp/cache"; \
	mkdir "$$tmp/src" "$$tmp/elsewhere"; \
	git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -C "$$tmp/src" -xf -; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q "$$tmp/src"; \
	rm -rf "$$tmp/src"; \
	cd "$$tmp/elsewhere" && "$$tmp/venv/bin/persguard" demo --out demo $(CHECK_INSTALL_ARGS); \
	test -f demo/results.json && test -f demo/report.png && test ! -e "$$PERSGUARD_CACHE/world_tiny"; \
	echo "check-install: the installed package ran the demo from $$tmp/elsewhere"

bench: venv
	$(PY) benchmarks/unet_step.py --json

# Python 3.12 + the newest jax/flax, tests that need no PyTorch oracle (those skip themselves).
PYTHON312 ?= python3.12
test-latest:
	$(PYTHON312) -m venv .venv312
	.venv312/bin/python -m pip install -q --upgrade pip "setuptools>=77"
	.venv312/bin/python -m pip install -q -e . "pytest<9.2" pytest-xdist
	.venv312/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv312 *.egg-info .pytest_cache
