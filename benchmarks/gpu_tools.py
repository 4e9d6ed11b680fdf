"""Helpers of ``benchmarks/gpu_prebuild.sh`` and ``benchmarks/gpu_check.sh``.

A lent GPU machine gives one command of a few minutes, too short to compile the CUDA kernels and
run the checks too. So ``fastxmc/_C.so`` is built ahead on a CPU machine against the torch the GPU
machine runs, and recorded beside a JSON file of what it was built against. On the GPU machine the
library is used only when that record matches the running interpreter, torch and source tree.

    python -m benchmarks.gpu_tools record LIB --archs 9.0 --out META   # after building LIB
    python -m benchmarks.gpu_tools match META [--arch 9.0]   # exit 0: META suits this process,
                                                             # 1: it does not, 3: no torch here
    python -m benchmarks.gpu_tools verify LIB [--cuda] [--archs 9.0]   # exit 1 unless every op
                                                                       # of csrc/ is registered
    python -m benchmarks.gpu_tools junit XML [--log LOG]      # counts and failures of a test run
    python -m benchmarks.gpu_tools table CSV --cols a,b,...   # the last run's rows of a results CSV

Only ``record`` and ``verify`` import torch (and load LIB into it); the rest is standard library,
so the checks run in any Python.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
# What the binary is compiled from: a change to any of these makes a prebuilt library stale.
SOURCE_PATHS = ("csrc", "CMakeLists.txt")
# The record's keys that must equal the running process's for the prebuilt library to be used.
MATCH_KEYS = ("torch", "torch_cuda", "python_abi", "source_digest")


# ---------------------------------------------------------------- what a library was built from
def source_digest(root: Path = ROOT) -> str:
    """sha256 over the relative paths and contents of every file the library is compiled from."""
    h = hashlib.sha256()
    files = []
    for rel in SOURCE_PATHS:
        path = root / rel
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def python_abi() -> str:
    """This interpreter's extension ABI tag, e.g. ``cpython-312-x86_64-linux-gnu``."""
    return sysconfig.get_config_var("SOABI") or f"{sys.implementation.cache_tag}-{platform.machine()}"


def current_environment(root: Path = ROOT) -> dict:
    """The values of :data:`MATCH_KEYS` for this process (imports torch)."""
    import torch

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python_abi": python_abi(), "source_digest": source_digest(root)}


def mismatches(recorded: dict, current: dict, arch: Optional[str] = None) -> list:
    """Why a library recorded as ``recorded`` must not be used in ``current`` (empty: it may).

    ``arch``, when given, is the GPU's compute capability ("9.0"): it must be one of the recorded
    archs (a "+PTX" suffix counts as that arch)."""
    why = []
    for key in MATCH_KEYS:
        if recorded.get(key) != current.get(key):
            why.append(f"{key}: prebuilt for {recorded.get(key)!r}, running {current.get(key)!r}")
    if arch is not None:
        archs = [a.replace("+PTX", "") for a in re.split(r"[;, ]+", recorded.get("cuda_archs") or "")
                 if a]
        if arch not in archs:
            why.append(f"cuda_archs: prebuilt for {recorded.get('cuda_archs')!r}, this GPU is {arch}")
    return why


# ---------------------------------------------------------------- the ops csrc/ registers
_IMPL_BLOCK = re.compile(r"TORCH_LIBRARY_IMPL\(\s*fastxmc\s*,\s*(\w+)\s*,\s*\w+\s*\)\s*\{(.*?)\n\}",
                         re.S)
_DEF_BLOCK = re.compile(r"TORCH_LIBRARY(?:_FRAGMENT)?\(\s*fastxmc\s*,\s*\w+\s*\)\s*\{(.*?)\n\}", re.S)
_IMPL = re.compile(r"\bm\.impl\(\s*\"(\w+)\"")
_DEF = re.compile(r"\bm\.def\(\s*\"(\w+)")
_COMMENT = re.compile(r"//[^\n]*")


def registered_ops(root: Path = ROOT) -> dict:
    """``{"defined": [...], "<dispatch key>": [...]}``: the ops that ``csrc/`` defines and those it
    gives a kernel per dispatch key (read from the TORCH_LIBRARY* blocks of the sources)."""
    out: dict = {"defined": []}
    for path in sorted((root / "csrc").rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".cc", ".h") or not path.is_file():
            continue
        text = _COMMENT.sub("", path.read_text())
        for body in _DEF_BLOCK.findall(text):
            out["defined"] += _DEF.findall(body)
        for key, body in _IMPL_BLOCK.findall(text):
            out.setdefault(key, []).extend(_IMPL.findall(body))
    return {k: sorted(set(v)) for k, v in out.items()}


# ---------------------------------------------------------------- the machine code in a library
def _tool(name: str) -> Optional[str]:
    """A CUDA binary tool: the toolkit's, else the one on PATH, else the copy Triton ships."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    if shutil.which(name):
        return shutil.which(name)
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    return None


def cubins(lib: Path) -> Optional[list]:
    """The embedded machine code of ``lib`` as ``"<source stem>.sm_XX"`` names (None: no
    cuobjdump here)."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return None
    out = subprocess.run([cuobjdump, "--list-elf", str(lib)], capture_output=True, text=True)
    return sorted(set(re.findall(r"(\w+\.sm_\d+a?)\.cubin", out.stdout)))


def needed_libraries(lib: Path) -> Optional[list]:
    """The DT_NEEDED entries of ``lib`` (None: no readelf here)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)


def glibc_required(lib: Path) -> Optional[str]:
    """The newest GLIBC symbol version ``lib`` needs, e.g. "2.32" (None: no readelf here)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-V", str(lib)], capture_output=True, text=True)
    versions = set(re.findall(r"\bGLIBC_(\d+\.\d+)\b", out.stdout))
    return max(versions, key=_version_key) if versions else None


def _version_key(version: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def glibc_problem(recorded: dict) -> Optional[str]:
    """Why this machine's C library is too old for a library recorded as ``recorded``, or None."""
    needed = recorded.get("glibc_required")
    name, have = platform.libc_ver()
    if not needed or name != "glibc" or not have:
        return None
    if _version_key(have) < _version_key(needed):
        return f"glibc: the library needs {needed}, this machine has {have}"
    return None


def sm_name(arch: str) -> str:
    """"9.0" / "9.0+PTX" -> "sm_90"."""
    major, minor = arch.replace("+PTX", "").split(".")
    return f"sm_{major}{minor}"


# ---------------------------------------------------------------- verify
def verify(lib: Path, need_cuda: bool, archs: Optional[str], root: Path = ROOT) -> list:
    """Loads ``lib`` into this process's torch and checks it; prints what it found and returns
    the problems (empty: every check passed)."""
    import torch

    problems = []
    print(f"library {lib} ({lib.stat().st_size / 2**20:.1f} MiB) into torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}), python {platform.python_version()} ({python_abi()})")
    needed = needed_libraries(lib)
    if needed is not None:
        print(f"  needs: {', '.join(needed)}")
        if any(n.startswith("libpython") for n in needed):
            problems.append("the library links libpython: it would be tied to one interpreter")
    try:
        torch.ops.load_library(str(lib))
    except OSError as err:
        return problems + [f"load_library failed: {err}"]
    info = json.loads(torch.ops.fastxmc.build_info())
    print(f"  build_info: {json.dumps(info)}")
    if info.get("torch_version") != torch.__version__.split("+")[0]:
        problems.append(f"built against torch {info.get('torch_version')}, loaded into "
                        f"{torch.__version__}")
    if need_cuda and not info.get("cuda"):
        problems.append("built without the CUDA kernels (build_info cuda = false)")
    if archs is not None and info.get("cuda") and info.get("cuda_archs") != archs:
        problems.append(f"built for archs {info.get('cuda_archs')!r}, expected {archs!r}")

    ops = registered_ops(root)
    keys = ["CPU"] + (["CUDA"] if need_cuda or info.get("cuda") else [])
    print(f"  {'op':<34} " + " ".join(f"{k:<5}" for k in keys))
    for op in sorted(set(ops["defined"]) | {o for k in keys for o in ops.get(k, [])}):
        cells = []
        for key in keys:
            try:
                has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastxmc::{op}", key)
            except RuntimeError:  # the op is not defined at all
                has = False
            expected = op in ops.get(key, [])
            cells.append(("yes" if has else "no") + ("" if has == expected or not expected else "!"))
            if expected and not has:
                problems.append(f"fastxmc::{op} has no {key} kernel, though csrc/ registers one")
        print(f"  {op:<34} " + " ".join(f"{c:<5}" for c in cells))
    if need_cuda:
        print(f"  CUDA kernels expected from csrc/: {len(ops.get('CUDA', []))}")
        if not ops.get("CUDA"):
            problems.append("no TORCH_LIBRARY_IMPL(fastxmc, CUDA, ...) block found in csrc/")
        found = cubins(lib)
        if found is None:
            print("  machine code: not checked (no cuobjdump)")
        else:
            print(f"  machine code: {', '.join(found) or 'none'}")
            sources = sorted(p.stem for p in (root / "csrc").rglob("*.cu"))
            for arch in filter(None, re.split(r"[;, ]+", archs or info.get("cuda_archs") or "")):
                for stem in sources:
                    if f"{stem}.{sm_name(arch)}" not in found:
                        problems.append(f"no {sm_name(arch)} machine code of {stem}.cu in the library")
    return problems


# ---------------------------------------------------------------- JUnit XML and -v logs
_LOG_XDIST = re.compile(r"\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+)")
_LOG_PLAIN = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def junit_counts(path: Path) -> dict:
    """``{"tests", "passed", "failed", "error", "skipped", "problems": [(id, outcome, message)]}``
    of a pytest JUnit XML file. A test reported twice (a failed call and an erroring teardown)
    counts once, by its worst outcome; nameless entries (an interrupted run writes one) are
    left out."""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    outcome: dict = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name"):
            continue
        name = f"{case.get('classname', '')}::{case.get('name')}"
        result, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                result = {"failure": "failed"}.get(child.tag, child.tag)
                lines = (child.get("message") or (child.text or "")).strip().splitlines()
                message = lines[0][:160] if lines else ""
                break
        if name not in outcome or rank[result] > rank[outcome[name][0]]:
            outcome[name] = (result, message)
    counts = {"tests": len(outcome), "passed": 0, "failed": 0, "error": 0, "skipped": 0,
              "problems": []}
    for name, (result, message) in outcome.items():
        counts[result] += 1
        if result in ("failed", "error"):
            counts["problems"].append((name, result, message))
    return counts


def log_counts(text: str) -> dict:
    """The same counts from a pytest ``-v`` log (xdist's or plain), for a run whose XML was never
    written (killed); each test's last reported outcome counts."""
    outcome = {}
    for word, test in _LOG_XDIST.findall(text):
        outcome[test] = word
    for test, word in _LOG_PLAIN.findall(text):
        outcome[test] = word
    counts = {"tests": len(outcome), "passed": 0, "failed": 0, "error": 0, "skipped": 0,
              "problems": []}
    for test, word in outcome.items():
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error"}.get(
            word, "skipped")
        counts[key] += 1
        if key in ("failed", "error"):
            counts["problems"].append((test, key, ""))
    return counts


def collected_count(text: str) -> Optional[int]:
    """How many tests a pytest run collected, from its log ("8 workers [106 items]" under xdist,
    "collected 106 items / 974 deselected" without), or None."""
    found = re.findall(r"workers \[(\d+) items?\]", text) or re.findall(
        r"collected (\d+) items?(?: / (\d+) deselected)?", text)
    if not found:
        return None
    last = found[-1]
    if isinstance(last, tuple):  # collected N / K deselected: N - K ran
        return int(last[0]) - int(last[1] or 0)
    return int(last)


def format_counts(counts: dict, source: str, collected: Optional[int] = None) -> str:
    head = (f"{counts['tests']} tests: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['error']} errors, {counts['skipped']} skipped (from {source})")
    if collected is not None and collected > counts["tests"]:
        head += f"; {collected} collected, {collected - counts['tests']} without a result"
    return "\n".join([head] + [f"  {o.upper()} {t}  {m}".rstrip() for t, o, m in counts["problems"]])


# ---------------------------------------------------------------- results CSVs
def last_run_rows(path: Path) -> list:
    """The rows of the last ``run_id`` in a results CSV (the benchmarks append every run)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "run_id" not in rows[0]:
        return rows
    last = rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == last]


def bound_percent(op: str, row: dict) -> str:
    """The share of the paper bound (benchmarks/roofline.py) that a measured results row reaches,
    as text ("" where the row has no time or its shape is not modelled)."""
    from benchmarks import roofline

    try:
        seconds = float(row["median_ms"]) / 1e3
        shape = {k: int(row[k]) for k in ("n", "m", "d")} if op == "infonce" else None
        if shape is None:
            return ""
        kernel = f"{op}_{row['mode']}"
        return f"{roofline.percent_of_bound(kernel, shape, row['dtype'], seconds):.1f}"
    except (KeyError, ValueError, TypeError):
        return ""


def format_table(rows: list, cols: list) -> str:
    if not rows:
        return "(no rows)"
    cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return (value or "")[:60]
    if number.is_integer() and abs(number) < 1e12 and "." not in value:
        return value
    return f"{number:.4g}"


# ---------------------------------------------------------------- command line
def _cmd_record(args) -> int:
    import torch

    lib = Path(args.lib)
    info = {**current_environment(), "python": platform.python_version(),
            "cuda_archs": args.archs, "nvcc": args.nvcc, "library": lib.name,
            "size_bytes": lib.stat().st_size,
            "sha256": hashlib.sha256(lib.read_bytes()).hexdigest(),
            "glibc_required": glibc_required(lib),
            "git_commit": _git_commit(), "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime()),
            "torch_file": str(Path(torch.__file__).parent)}
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


def _git_commit() -> Optional[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *SOURCE_PATHS],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _cmd_match(args) -> int:
    meta = Path(args.meta)
    if not meta.is_file():
        print(f"no prebuilt record {meta}")
        return 1
    recorded = json.loads(meta.read_text())
    lib = meta.parent / recorded.get("library", "_C.so")
    if not lib.is_file():
        print(f"prebuilt record {meta} names {lib}, which is missing")
        return 1
    if hashlib.sha256(lib.read_bytes()).hexdigest() != recorded.get("sha256"):
        print(f"{lib} is not the library {meta} recorded (sha256 differs)")
        return 1
    try:
        current = current_environment()
    except ImportError as err:
        print(f"not checked: this Python has no torch ({err})")
        return 3
    why = mismatches(recorded, current, args.arch)
    if glibc_problem(recorded):
        why.append(glibc_problem(recorded))
    if why:
        print("prebuilt library does not match this machine:\n  " + "\n  ".join(why))
        return 1
    print(f"prebuilt library matches: torch {recorded['torch']}, {recorded['python_abi']}, "
          f"archs {recorded.get('cuda_archs')}, sources {recorded['source_digest'][:12]} "
          f"(built {recorded.get('built_utc')} at {recorded.get('git_commit')})")
    return 0


def _cmd_verify(args) -> int:
    problems = verify(Path(args.lib), args.cuda, args.archs)
    if problems:
        print("VERIFY FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("verify: every op that csrc/ registers has its kernel in this library")
    return 0


def _cmd_junit(args) -> int:
    xml, log = Path(args.xml), Path(args.log) if args.log else None
    text = log.read_text(errors="replace") if log is not None and log.is_file() else None
    collected = collected_count(text) if text is not None else None
    from_xml = None
    if xml.is_file() and xml.stat().st_size:
        try:
            from_xml = junit_counts(xml)
        except ET.ParseError as err:
            print(f"{xml.name} unreadable ({err})")
    from_log = log_counts(text) if text is not None else None
    # A run stopped while its workers still reported can leave fewer results in the XML than
    # in the log: the fuller of the two counts.
    if from_xml is not None and (from_log is None or from_xml["tests"] >= from_log["tests"]):
        print(format_counts(from_xml, xml.name, collected))
        return 0
    if from_log is not None:
        print(format_counts(from_log, f"{log.name}" + ("" if from_xml else ", no XML"), collected))
        return 0
    print(f"no test results ({xml.name} missing)")
    return 1


def _cmd_table(args) -> int:
    path = Path(args.csv)
    if not path.is_file():
        print(f"(no {path.name})")
        return 1
    rows = last_run_rows(path)
    for where in args.where or []:
        key, _, value = where.partition("=")
        rows = [r for r in rows if r.get(key) == value]
    cols = list(args.cols)
    if args.bound:
        rows = [{**r, "pct_of_bound": bound_percent(args.bound, r)} for r in rows]
        cols.insert(cols.index("median_ms") + 1 if "median_ms" in cols else len(cols),
                    "pct_of_bound")
    print(format_table(rows, cols))
    return 0


def parse_args(argv: Optional[Iterable[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="write the JSON record of a freshly built library")
    r.add_argument("lib")
    r.add_argument("--out", required=True)
    r.add_argument("--archs", required=True, help="the FASTXMC_CUDA_ARCH_LIST it was built for")
    r.add_argument("--nvcc", default=None, help="the nvcc release it was built with")
    m = sub.add_parser("match", help="exit 0 when a prebuilt record suits this process")
    m.add_argument("meta")
    m.add_argument("--arch", default=None, help="this GPU's compute capability, e.g. 9.0")
    v = sub.add_parser("verify", help="load a library and check every op of csrc/ is registered")
    v.add_argument("lib")
    v.add_argument("--cuda", action="store_true", help="require the CUDA kernels")
    v.add_argument("--archs", default=None, help="the arch list it must have been built for")
    j = sub.add_parser("junit", help="counts and failures of a pytest JUnit XML (or -v log)")
    j.add_argument("xml")
    j.add_argument("--log", default=None, help="the -v log, read when the XML is missing")
    t = sub.add_parser("table", help="the last run's rows of a results CSV")
    t.add_argument("csv")
    t.add_argument("--cols", type=lambda s: [c for c in s.split(",") if c], required=True)
    t.add_argument("--where", action="append", help="COLUMN=VALUE filter (repeatable)")
    t.add_argument("--bound", choices=["infonce"], default=None,
                   help="add pct_of_bound: the measured time against benchmarks/roofline.py")
    return p.parse_args(argv)


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = parse_args(argv)
    return {"record": _cmd_record, "match": _cmd_match, "verify": _cmd_verify,
            "junit": _cmd_junit, "table": _cmd_table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
