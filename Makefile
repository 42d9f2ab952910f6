# The two commands of the README: `make demo` and `make test`. Both install first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# The CPU wheel of torch is pinned by constraints-cpu.txt; an unpinned torch would pull CUDA.
$(STAMP): pyproject.toml constraints-cpu.txt requirements-earth2studio.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt --no-deps \
		-r requirements-earth2studio.txt
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra

demo: install
	$(VENV)/bin/weathermodel demo

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
