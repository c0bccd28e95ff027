# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
# Versions are pinned here (the pyproject declares ranges) so that pip reuses the local torch wheels.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PINS := torch==2.14.1 torchvision==0.29.1
# the linter too: a newer ruff may add findings, and CI must not fail on code nobody changed
RUFF := ruff==0.17.6
LINTED := core bench methods datasets models tests mmbalance
STAMP := $(VENV)/.installed

.PHONY: venv quickstart test test-quickstart test-slow test-slurm lint clean

# torchaudio 2.11 beside torch 2.14 on purpose: its wheel declares no torch requirement and its
# extensions are built on torch's stable ABI (abi3), so it imports and runs against 2.14
# (MelSpectrogram, kaldi fbank, resample: all the suite uses). --no-deps keeps pip from
# fetching another torch for it. Audio files are read with soundfile, not torchaudio.load
# (which needs TorchCodec). Another torch: pick the torchaudio of the same release line.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q --no-deps torchaudio==2.11.0
	$(PY) -m pip install -q -e '.[test,reference,text]' $(PINS) $(RUFF)
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/mmbalance quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-quickstart: $(STAMP)
	$(PY) -m pytest -q -m quickstart

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# needs a running SLURM and SLURM_CONF: `eval "$$(bash scripts/slurm-local.sh start)"` (see .ci/run)
test-slurm: $(STAMP)
	$(PY) -m pytest -q -m slurm

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)

clean:
	rm -rf $(VENV) results/*/ reports/*/
