# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean dcmtk soak browser

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned (==2.13.0) in pyproject.toml: the CPU wheel; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	# Embedded defaults: REST 127.0.0.1:8080, DICOM 127.0.0.1:11112 (AE LVPARCHIVE), SQLite,
	# filesystem store and staging under ./var/, background worker.  ARCHIVE_* overrides.
	$(VENV)/bin/lvpnet-archive migrate
	TCP_NODELAY=1 $(VENV)/bin/lvpnet-archive serve

# The archive's end-to-end tests drive dcmtk's storescu; CI machines start without it.
dcmtk:
	@command -v storescu >/dev/null || { apt-get update -qq && apt-get install -y -qq dcmtk; }

# The dashboard test drives a real headless Chromium
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

lint: install
	$(PY) -m ruff check .

test: install lint dcmtk browser
	$(PY) -m pytest -q -n 2 -p no:cacheprovider --durations=25

# Long versions of the reliability tests: 1,000 damaged codec streams, 1,000 damaged archive
# records, 1,000 damaged records served through WADO-RS, 5,000 mutated DICOM files through each of
# C-STORE and STOW-RS (the short runs in `test` use a few hundred); summaries land in var/soak/.
soak: install
	FUZZ_INPUTS=1000 RECORD_FUZZ_INPUTS=1000 RETRIEVAL_FUZZ_INPUTS=1000 DICOM_FUZZ_INPUTS=5000 \
		FUZZ_REPORT_DIR=var/soak DICOM_FUZZ_REPORT_DIR=var/soak \
		$(PY) -m pytest -q -p no:cacheprovider tests/reliability

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
