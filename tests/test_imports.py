"""What a mesh node loads: the node and the CLI move opaque bytes, so they must never pull in torch (seconds of
import time and a GiB of address space on a cache host) nor the tensor-tree codec, which only the provider and
`mesh get --describe` need. Checked in a clean interpreter, after a node has really started and served a value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A node on 127.0.0.1:0 stores and returns a value through a client, then stops; what was imported is printed.
NODE_RUN = """
import sys
import mesh.cli
from mesh.node import Node, NodeConfig
from mesh.transport.peer import PeerClient

node = Node(NodeConfig(listen="127.0.0.1:0", min_free_ram=0, secret=b"s")).start()
try:
    with PeerClient(node.address, b"s", timeout=30) as c:
        c.put("k", b"value")
        assert bytes(c.get("k").data) == b"value"
finally:
    node.stop(grace=0.5)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy") or m.startswith("mesh.codec")))
"""


def loaded_modules(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def test_a_running_node_and_the_cli_import_no_torch_and_no_codec() -> None:
    assert loaded_modules(NODE_RUN) == "[]"


def test_the_check_sees_torch_when_it_is_imported() -> None:
    """The check above is not vacuous: the same probe reports torch and the codec once something loads them."""
    loaded = loaded_modules("import torch\nfrom mesh import codec\n" + NODE_RUN)
    assert "'torch'" in loaded and "'mesh.codec'" in loaded
