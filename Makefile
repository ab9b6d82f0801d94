# Plain targets for a fresh machine or a user's GPU box.
# torch is installed first, pinned, only if it is missing: an unpinned `torch` would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.geotoken-installed

.PHONY: install test test-fast lint demo bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	# geoclip ships 100K real MP16 coordinates and the GPS-encoder weights; its own deps (torchvision) are not wanted.
	$(PY) -m pip install --no-deps "geoclip>=1.3"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# every test (what CI runs), then the 15 slowest; exit status 5 (nothing collected) is a failure too
test: lint
	$(PY) -m pytest --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# the quick lane while working: the tests not marked slow (the demo, the browser, several processes, > ~5 s),
# in two processes (pytest-xdist, in the test extra)
test-fast: lint
	$(PY) -m pytest -m "not slow" -n 2 --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

demo: install
	$(VENV)/bin/geotoken demo

# Speed benchmarks, each printing our figure beside its reference measured in the same run (see BENCHMARKS.md).
bench: install
	$(VENV)/bin/geotoken bench tokens --json
	$(PY) benchmarks/bench_train.py --runs small:32,paper:16 --threads 2
	$(PY) benchmarks/bench_train.py --runs small:32,paper:16 --threads 2 --dtype bf16
	$(VENV)/bin/geotoken bench decode --preset small --batch-size 16 --threads 2 --json
	$(VENV)/bin/geotoken bench decode --preset paper --batch-size 8 --threads 2 --json
	$(VENV)/bin/geotoken bench decode --preset small --batch-size 16 --threads 2 --dtype bf16 --json
	$(VENV)/bin/geotoken bench decode --preset paper --batch-size 8 --threads 2 --dtype bf16 --json
	$(VENV)/bin/geotoken bench index --rows 100000 --kinds flat ivfpq hnsw --data clustered --threads 2 --json
	$(VENV)/bin/geotoken bench extract --sizes 64 224 --threads 2 --json
	$(VENV)/bin/geotoken bench predict --model geoclip --batch-sizes 1 16 --images 16 --reference-images 2 --threads 2 --json

clean:
	rm -rf $(VENV) runs build dist
