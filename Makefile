# Two entry points from a fresh clone: `make demo` and `make test` (see README.md).
# GPU users override the torch pin, e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO := demo

.PHONY: install demo test clean

install: $(VENV)/.installed

# torch goes in first and pinned: an unpinned torch pulled in by diffusers would be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[build,test]"
	touch $@

demo: install
	$(BIN)/lcmrt random-model $(DEMO)/tiny --arch sd15 --size tiny --seed 0 --overwrite
	$(BIN)/lcmrt build $(DEMO)/tiny/model --lcm-lora $(DEMO)/tiny/lcm-lora.safetensors \
		--lora $(DEMO)/tiny/style-lora.safetensors:0.8 --height 128 --width 128 \
		--guidance-mode cfg --out $(DEMO)/engine --overwrite
	$(BIN)/lcmrt generate $(DEMO)/engine "a watercolor fox in the snow" --steps 4 --seed 0 -o $(DEMO)/fox.png

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO)
