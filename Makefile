# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) the virtual environment .venv and installs vsa_nd into it in place.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On a machine with an NVIDIA GPU, CuPy comes too, so the demo runs the CUDA backend.
# JAX (CPU) comes for the adapter tests.
EXTRAS := test,jax$(shell nvidia-smi -L >/dev/null 2>&1 && echo ,cuda13)
# The adapter tests pin torch exactly: this machine's pip finds the local CPU wheel for this
# version, where a loose requirement could pull a multi-GB CUDA build (the `torch` extra
# stays loose, torch>=2.3, for users).
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test compile-check clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]' '$(TORCH_PIN)'
	touch $@

demo: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m vsa_nd demo

compile-check: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m vsa_nd.compile_check

test: compile-check
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
