"""The README's Python client example runs as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

from embedpool.server.app import Running

README = Path(__file__).resolve().parents[2] / "README.md"


def test_python_client_example_runs(server: Running) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    code = block.group(1).replace("127.0.0.1:50051", f"127.0.0.1:{server.port}").replace("print(", "(")
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    vectors = namespace["vectors"]
    hits = namespace["hits"]
    assert getattr(vectors, "shape", None) == (2, 384)
    assert hits[0].id == "a" and 0.3 < hits[0].score < 1.0  # type: ignore[index]
