# Two entry points from a fresh clone: `make demo` and `make test` (see README.md).
# Everything installs at the versions pinned in constraints.txt; `make lock` refreshes them.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK := constraints.txt
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --constraint $(LOCK)
DEMO := demo

NATIVE := build/native
NATIVE_SANITIZED := build/native-sanitized
JOBS := $(shell nproc)
CMAKE_OPTIONS := -DLCMRT_PYTHON=$(abspath $(BIN)/python) -DLCMRT_WERROR=ON

.PHONY: install demo test native native-test lock clean

install: $(VENV)/.installed

# torch goes in first: an unpinned torch pulled in by diffusers would be a multi-GB CUDA build. lcmrt itself
# is built with the pinned setuptools in the venv (no isolated build environment taking the newest one).
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools
	$(PIP) "$(TORCH)"
	$(PIP) --no-build-isolation -e ".[build,test,openvino,serve]"
	touch $@

demo: install
	$(BIN)/lcmrt random-model $(DEMO)/tiny --arch sd15 --size tiny --seed 0 --overwrite
	$(BIN)/lcmrt build $(DEMO)/tiny/model --lcm-lora $(DEMO)/tiny/lcm-lora.safetensors \
		--lora $(DEMO)/tiny/style-lora.safetensors:0.8 --height 128 --width 128 \
		--guidance-mode cfg --out $(DEMO)/engine --overwrite
	$(BIN)/lcmrt generate $(DEMO)/engine "a watercolor fox in the snow" --steps 4 --seed 0 -o $(DEMO)/fox.png

# pytest (the Python runtime, and the native one against it), then ctest on the native runtime, then ctest again
# on a build with AddressSanitizer and UndefinedBehaviorSanitizer
test: install native
	$(BIN)/python -m pytest
	$(MAKE) native-test

# The native runtime (lcmrt/csrc, see README "C++"): needs cmake, g++ and Debian's nlohmann-json3-dev, libicu-dev,
# libssl-dev and zlib1g-dev; ONNX Runtime's headers come from Debian 13's package, its library from the venv's wheel.
native: install
	lcmrt/csrc/fetch-onnxruntime.sh build/onnxruntime $(BIN)/python
	cmake -S . -B $(NATIVE) $(CMAKE_OPTIONS)
	cmake --build $(NATIVE) -j $(JOBS)

native-test: native
	ctest --test-dir $(NATIVE) --output-on-failure
	cmake -S . -B $(NATIVE_SANITIZED) $(CMAKE_OPTIONS) -DLCMRT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(NATIVE_SANITIZED) -j $(JOBS)
	ctest --test-dir $(NATIVE_SANITIZED) --output-on-failure

# The newest versions pyproject.toml allows, resolved in a throwaway venv and written to constraints.txt.
# Then run `make test`: the suite decides whether the new set lands.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip setuptools
	.venv-lock/bin/pip install --quiet "$(TORCH)"
	.venv-lock/bin/pip install --quiet -e ".[build,test,openvino,serve]"
	{ sed -n '/^#/p' $(LOCK); .venv-lock/bin/pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(DEMO) build
