# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: demo test lint clean asan

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard kernels/*.cc kernels/*.h)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ternvlm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q; code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; \
	if [ $$code -ne 0 ]; then exit $$code; fi
	$(MAKE) --no-print-directory asan

# The kernel tests once more against an AddressSanitizer + UBSan build of kernels/*.cc.
ASAN_LIB := build/asan/libternvlm_kernels_asan.so
$(ASAN_LIB): $(wildcard kernels/*.cc kernels/*.h)
	mkdir -p $(dir $@)
	$(CXX) -std=c++17 -O1 -g -ffp-contract=off -fno-omit-frame-pointer -fsanitize=address,undefined \
	  -fno-sanitize-recover=undefined -shared -fPIC -pthread -Ikernels \
	  $(filter-out kernels/module.cc,$(wildcard kernels/*.cc)) -ldl -o $@

asan: $(STAMP) $(ASAN_LIB)
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 TERNVLM_KERNELS_LIB=$(abspath $(ASAN_LIB)) \
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_lut.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
