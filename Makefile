# Two entry points from a fresh clone: `make demo` and `make test` (see README.md).
# Everything installs at the versions pinned in constraints.txt; `make lock` refreshes them.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK := constraints.txt
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --constraint $(LOCK)
DEMO := demo

.PHONY: install demo test lock clean

install: $(VENV)/.installed

# torch goes in first: an unpinned torch pulled in by diffusers would be a multi-GB CUDA build. lcmrt itself
# is built with the pinned setuptools in the venv (no isolated build environment taking the newest one).
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools
	$(PIP) "$(TORCH)"
	$(PIP) --no-build-isolation -e ".[build,test,openvino]"
	touch $@

demo: install
	$(BIN)/lcmrt random-model $(DEMO)/tiny --arch sd15 --size tiny --seed 0 --overwrite
	$(BIN)/lcmrt build $(DEMO)/tiny/model --lcm-lora $(DEMO)/tiny/lcm-lora.safetensors \
		--lora $(DEMO)/tiny/style-lora.safetensors:0.8 --height 128 --width 128 \
		--guidance-mode cfg --out $(DEMO)/engine --overwrite
	$(BIN)/lcmrt generate $(DEMO)/engine "a watercolor fox in the snow" --steps 4 --seed 0 -o $(DEMO)/fox.png

test: install
	$(BIN)/python -m pytest

# The newest versions pyproject.toml allows, resolved in a throwaway venv and written to constraints.txt.
# Then run `make test`: the suite decides whether the new set lands.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip setuptools
	.venv-lock/bin/pip install --quiet "$(TORCH)"
	.venv-lock/bin/pip install --quiet -e ".[build,test,openvino]"
	{ sed -n '/^#/p' $(LOCK); .venv-lock/bin/pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(DEMO)
