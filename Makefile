# comfy-mesh: `make demo` runs a local demo mesh, `make test` installs everything and runs the tests.
# Everything lives in .venv/ at the repository root; nothing is installed system-wide.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Exactly this torch. Where it comes from decides CPU or CUDA: PyPI's torch for Linux is a multi-GB CUDA build,
# pytorch.org's CPU index has the small CPU build (what the tests need). TORCH_INDEX picks the index, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu     (CPU only)
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu128   (CUDA 12.8)
# Empty (the default) leaves it to pip's own configuration: this machine and CI carry the CPU wheel locally.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed
PB     := mesh/pb/mesh_pb2.py mesh/pb/mesh_pb2_grpc.py mesh/pb/mesh_pb2.pyi
# The generator is pinned, in a venv of its own: the code it writes runs on protobuf >= 5.27.2 and grpcio >= 1.66.2
# (what ComfyUI environments carry), whatever newer versions the test venv holds.
GRPC_TOOLS ?= grpcio-tools==1.66.2
PROTO_VENV := .venv-proto
PYTEST_ARGS ?=

.PHONY: install proto test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)" --extra-index-url https://pypi.org/simple) "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# The gRPC code is generated from proto/ and committed, so a plain clone imports (ComfyUI-Manager, `pip install -e .`).
# Never edit it: change proto/mesh.proto and run `make proto`; tests/test_proto_fresh.py fails when they disagree.
proto:
	test -x $(PROTO_VENV)/bin/python || $(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install -q "$(GRPC_TOOLS)"
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -Imesh/pb=proto --python_out=. --grpc_python_out=. --pyi_out=. proto/mesh.proto

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) scripts/bench_node.py --json bench-results/node.json

clean:
	rm -rf $(VENV) $(PROTO_VENV) .pytest_cache .hypothesis build *.egg-info
