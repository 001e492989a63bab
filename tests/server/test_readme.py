"""The README's Python examples (the embedpool client, the OpenAI SDK) run as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from embedpool.server.app import Running

README = Path(__file__).resolve().parents[2] / "README.md"


def _run(block: str, server: Running) -> dict[str, Any]:
    code = (
        block.replace("127.0.0.1:50051", f"127.0.0.1:{server.port}")
        .replace("127.0.0.1:8080", f"127.0.0.1:{server.http_port}")
        .replace("print(", "(")
    )
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_python_examples_run(server: Running) -> None:
    client_block, openai_block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:2]
    namespace = _run(client_block, server)
    vectors = namespace["vectors"]
    hits = namespace["hits"]
    assert getattr(vectors, "shape", None) == (2, 384)
    assert hits[0].id == "a" and 0.3 < hits[0].score < 1.0
    reply = _run(openai_block, server)["reply"]
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 384
