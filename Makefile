# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) the virtual environment .venv and installs vsa_nd into it in place.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On a machine with an NVIDIA GPU, CuPy comes too, so the demo runs the CUDA backend.
EXTRAS := test$(shell nvidia-smi -L >/dev/null 2>&1 && echo ,cuda13)

.PHONY: demo test compile-check clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m vsa_nd demo

compile-check: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m vsa_nd.compile_check

test: compile-check
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
