# The two commands a fresh machine needs: `make reproduce` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: reproduce test unit nbval smoke bench lint data clean-cache

# torch is installed first and pinned, so pip takes the CPU wheel instead of a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

reproduce: $(STAMP)  ## execute every notebook in place at the default profile
	$(PY) -m influence.lab.runner --profile default --jobs $(JOBS)

test: unit nbval  ## unit tests, then nbval re-executing every committed notebook

unit: $(STAMP)
	$(PY) -m pytest tests -q -n $(JOBS)

# Notebooks executed at once: each computes on one thread (influence.lab.notebook.setup).
JOBS ?= 2

# The re-executed notebooks write their figures and results.json (new timings) into a temporary
# folder, not into figures/: a test run leaves a clean clone clean.
nbval: $(STAMP)  ## re-execute every notebook, JOBS at a time, and check the marked cells
	INFLUENCE_FIGURES=$$(mktemp -d)/figures \
		$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-cell-timeout=3000 \
		--no-loadscope-reorder \
		-n $(JOBS) --dist loadfile notebooks

smoke: $(STAMP)  ## every notebook at the smoke profile, into a temporary folder
	$(PY) -m influence.lab.runner --profile smoke --jobs $(JOBS) --out $$(mktemp -d)

# kronfluence only for this comparison, pinned and without its declared dependencies: it
# requires torchvision (never imported), whose wheel breaks transformers on the CPU torch.
bench: $(STAMP)  ## our EK-FAC against kronfluence's -> benchmarks/results/kronfluence.json
	$(PY) -m pip install --quiet 'accelerate>=0.31' 'einops>=0.8' 'opt_einsum>=3.3'
	$(PY) -m pip install --quiet --no-deps kronfluence==1.0.1 einconv==0.1.0
	$(PY) -m benchmarks.kronfluence_bench

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

data: $(STAMP)  ## regenerate data/ (a test checks it is byte-identical to what is committed)
	$(PY) -m influence.lab.tasks

clean-cache:  ## forget trained models and fitted factors
	rm -rf .cache
