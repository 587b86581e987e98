# ztun: every target first installs what is missing on a fresh Debian machine
# (system packages, a .venv with the Python dependencies, the C/Cython build), then runs.
# Idempotent and quick when everything is already in place.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# System packages: toolchain, OpenSSL, nghttp2, libbpf + clang/bpftool for eBPF, iproute2 for
# namespaced test nodes, and the peers/baselines that tests and benchmarks run beside ztun.
APT_PACKAGES := build-essential cmake ninja-build pkg-config \
	libssl-dev libnghttp2-dev libbpf-dev libelf-dev zlib1g-dev linux-libc-dev \
	clang llvm bpftool iproute2 openssl \
	stunnel4 nghttp2-proxy tcpdump curl nodejs

BUILD_DEPS := 'scikit-build-core>=0.10' 'cython>=3.0' 'cython-cmake>=0.2' 'cffi>=1.17'
EXTRAS := test,bench,demo,dev,spire
SOURCES := $(shell find src ebpf ztun cmake -type f \( -name '*.c' -o -name '*.h' -o -name '*.pyx' \
	-o -name '*.pxd' -o -name 'CMakeLists.txt' -o -name '*.cmake' -o -name '_*_build.py' \) 2>/dev/null) \
	CMakeLists.txt pyproject.toml

.PHONY: all setup system venv build demo test test-fast bench lint clean distclean

all: build

system:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "== installing system packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.deps: pyproject.toml | system
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -e '.[$(EXTRAS)]'
	@touch $(VENV)/.built $@

venv: $(VENV)/.deps

# Rebuild the C core and the extensions when a C, Cython or build file changed.
$(VENV)/.built: $(SOURCES) | $(VENV)/.deps
	flock build.lock $(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

build: system $(VENV)/.built

setup: build

demo: build
	$(SUDO) $(PY) -m ztun.demo

test: build
	$(PY) -m pytest tests

test-fast: build
	$(PY) -m pytest tests/unit -q

bench: build
	@mkdir -p bench/results
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/latest.json -p no:randomly
	$(PY) bench/report.py bench/results/latest.json

lint: build
	$(VENV)/bin/ruff check ztun tests bench
	$(VENV)/bin/ruff format --check ztun tests bench
	$(VENV)/bin/mypy ztun

clean:
	rm -rf build build.lock $(VENV)/.built

distclean: clean
	rm -rf $(VENV)
