# Two commands do all set-up: `make demo` and `make test`. See README.md.
SHELL := /bin/bash
VENV ?= .venv
MODERN_VENV ?= .venv-modern
PEERS_VENV ?= .venv-peers
PYTEST_ARGS ?=
# make test's worker processes (pytest-xdist); each takes whole test files, so a module's fixture is
# built once. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
# Tests that need no Detectron2, by folder (tests/ mirrors the package); the modern environment runs
# exactly these. The folders tests/d2/ and tests/tools/ need Detectron2 (marker `detectron2`, set by
# tests/conftest.py; `-m "not detectron2"` leaves them out).
CORE_TESTS := tests/layers tests/modeling tests/pretraining tests/export

.PHONY: env env-modern env-peers demo lint test test-modern ci benchmark benchmark-peers clean

env:
	@VENV=$(VENV) tools/setup_env.sh reference

env-modern:
	@MODERN_VENV=$(MODERN_VENV) tools/setup_env.sh modern

# The peer benchmark's environment: the modern stack + rfdetr (never needed by the tests); it uses
# the modern environment's build of the compiled op. Then: make benchmark-peers (docs/speed.md)
env-peers: env-modern
	@PEERS_VENV=$(PEERS_VENV) tools/setup_env.sh peers

benchmark-peers: env-peers
	OMP_WAIT_POLICY=PASSIVE $(PEERS_VENV)/bin/python tools/benchmark.py --section peers

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning (a shared CPU runs faster)
# Afterwards MODEL_CARD.md's snippet runs verbatim, on the demo's trained weights vs DefaultPredictor
# --overwrite: output/shapes is the demo's own folder, so `make demo` retrains into it from the start
# (removing the earlier demo's checkpoints, metrics, events and evaluation; train_net refuses a used
# folder without it)
demo: env
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/python tools/train_net.py --config-file configs/shapes.py --overwrite
	DINOV2OD_MODEL_CARD_CHECKPOINT=output/shapes/model_final_ema.pth \
	  $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/d2/test_model_card.py

# Syntax errors, undefined names, unused imports and variables, redefinitions, mutable defaults
# (ruff.toml); takes about a second.
lint: env
	$(VENV)/bin/ruff check .

# DINOV2OD_EXPECT_DETECTRON2=1: a Detectron2 that fails to import fails the suite (tests/conftest.py)
test: env
	DINOV2OD_EXPECT_DETECTRON2=1 $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

test-modern: env-modern
	DINOV2OD_EXPECT_DETECTRON2=0 $(MODERN_VENV)/bin/python -m pytest -q $(PYTEST_ARGS) $(CORE_TESTS)

ci: lint test test-modern

benchmark: env
	$(VENV)/bin/python tools/benchmark.py

clean:
	rm -rf build dinov2od/*.so *.egg-info
