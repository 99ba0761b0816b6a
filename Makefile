# Two commands do all the set-up on a fresh machine: `make pipeline` and `make test` each create
# the virtual environment and install the project into it when it is missing or out of date.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MIRROR ?= data/mirror
PORT   ?= 8765

.PHONY: install install-trt lock test test-fast lint typecheck docs pipeline params mirror offline ui clean-outputs

LOCK   := requirements.lock
UV_VERSION := $(shell sed -n 's/^uv==//p' $(LOCK))

# The exact versions the measured figures were taken with, transitive ones included: uv installs
# requirements.lock as it is (removing anything else from .venv), then the project without
# resolving again. The lock is for CPython 3.11 on Linux x86_64 (torch's CUDA build, which runs
# on the CPU too).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Re-resolve the lock after changing pyproject.toml's dependencies; versions already in the lock
# are kept where they still fit (`make lock UPGRADE=--upgrade` takes the newest allowed).
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev -o $(LOCK) --python-version 3.11.7 \
	    --python-platform x86_64-unknown-linux-gnu --quiet $(UPGRADE)

# Torch-TensorRT and NVML on a CUDA machine, on top of the lock (torch stays at its locked
# version). tensorrt's libraries build from NVIDIA's own index, which must be reachable.
install-trt: $(STAMP)
	$(BIN)/uv pip install --python $(BIN)/python -c $(LOCK) -e '.[trt]'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The types of the library, the stages and the tools ([tool.mypy] in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

# The full suite: what CI runs (.ci/run).
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest

# The edit loop: every module, none of the slow end-to-end runs (tests marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The docs site (mkdocs.yml, docs/) into site/; --strict turns every warning into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Runs the DVC pipeline; stages run with the virtual environment's python.
pipeline: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# Recompose params.yaml after editing conf/ (tests fail when the two drift).
params: $(STAMP)
	$(BIN)/python -m oitools.params

# A synthetic Open Images mirror in the real layout, for offline runs (oimirror/).
mirror: $(STAMP)
	test -f $(MIRROR)/manifest.json || $(BIN)/python -m oimirror generate $(MIRROR) \
	    --classes Zebra "Sea turtle" "Blue jay" --images-per-class 100

# The whole pipeline with no network: serve the mirror on 127.0.0.1 and run against it as a DVC
# experiment (data=mirror; conf/data/mirror.yaml holds its URLs).
offline: mirror
	$(BIN)/python -m oimirror serve $(MIRROR) --port $(PORT) & pid=$$!; \
	trap "kill $$pid" EXIT; sleep 1; \
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc exp run -S data=mirror

# The MLflow UI on the project's store, bound to this machine only (http://127.0.0.1:5000).
# MLflow 3.17 opens experiments in its GenAI view unless the address asks for the training one.
ui: $(STAMP)
	@id=$$($(BIN)/python -c "from mlflow import MlflowClient; \
	e = MlflowClient('sqlite:///$(abspath mlflow.db)').get_experiment_by_name('oi-pipeline'); \
	print(e.experiment_id if e else '')" 2>/dev/null); \
	echo "runs: http://127.0.0.1:5000/#/experiments/$${id:-<id>}?workflowType=machine_learning"
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath mlflow.db) \
	    --default-artifact-root $(abspath mlartifacts) --host 127.0.0.1 --port 5000
