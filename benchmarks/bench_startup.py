"""Interpreter start-up with the autoload hook: `python -c pass` with and without optimum_permllm-autoload.pth.

Builds two virtual environments of this Python, without pip and without the system's site-packages (so that
nothing else is processed at start): one bare, one holding `optimum_permllm-autoload.pth` and
`_optimum_permllm_autoload.py` where a wheel install puts them (site-packages). Runs `python -c pass` in each,
alternating, and reports per environment the median wall time and the median CPU time (user + sys of the
child, less sensitive than wall time to the load of a shared machine), the paired difference, the modules the
hook leaves imported and its finders on `sys.meta_path` after start.

    python benchmarks/bench_startup.py --runs 300
    python benchmarks/bench_startup.py --runs 300 --rev main   # the hook as a git revision has it
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK_FILES = ("optimum_permllm-autoload.pth", "_optimum_permllm_autoload.py")
PROBE = ("print(json.dumps([sorted(set(sys.modules) - before),"
         " [getattr(f, '__name__', type(f).__name__) for f in sys.meta_path]]))")


def make_env(folder: Path, files: dict[str, str]) -> Path:
    """A venv at `folder` with `files` (name -> text) in its site-packages; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    for name, text in files.items():
        Path(site, name).write_text(text)
    subprocess.run([str(python), "-c", "pass"], check=True)  # writes the hook's .pyc, as an install would
    return python


def hook_files(rev: str | None) -> dict[str, str]:
    """The hook's two files from the working tree, or from git revision `rev`."""
    if rev is None:
        return {name: (ROOT / name).read_text() for name in HOOK_FILES}
    return {name: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True, capture_output=True,
                                 text=True).stdout for name in HOOK_FILES}


def timed_start(python: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys) of one `python -c pass`, run in the environment's folder."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], check=True, cwd=python.parents[1])
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def what_start_leaves(python: Path) -> list:
    """[modules imported by site-packages' start-up files, names of the sys.meta_path finders] in `python`.

    Run in the environment's folder: the current folder comes first on sys.path when site runs from `-c`, and
    a checkout's own hook module would shadow the one under test."""
    script = ("import sys, json; before = set(sys.modules); import site; site.main(); " + PROBE)
    out = subprocess.run([str(python), "-S", "-c", script], check=True, capture_output=True, text=True,
                         cwd=python.parents[1]).stdout
    return json.loads(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="starts per environment")
    parser.add_argument("--rev", default=None, help="take the hook's files from this git revision (default: the tree)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pythons = {"bare": make_env(Path(tmp, "bare"), {}), "hook": make_env(Path(tmp, "hook"), hook_files(args.rev))}
        load_before = os.getloadavg()
        times = {name: [] for name in pythons}
        for run in range(args.runs):
            for name in (("bare", "hook") if run % 2 == 0 else ("hook", "bare")):
                times[name].append(timed_start(pythons[name]))
        load_after = os.getloadavg()
        left = {name: what_start_leaves(python) for name, python in pythons.items()}
    ms = lambda seconds: round(1000 * seconds, 3)  # noqa: E731
    result = {"python": sys.version.split()[0], "runs": args.runs, "hook": args.rev or "working tree",
              "cpus": os.cpu_count(), "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)]}
    for kind, index in (("wall", 0), ("cpu", 1)):
        for name in pythons:
            result[f"{name}_{kind}_median_ms"] = ms(statistics.median(t[index] for t in times[name]))
        paired = [h[index] - b[index] for h, b in zip(times["hook"], times["bare"])]
        quartiles = statistics.quantiles(paired, n=4)
        result[f"hook_minus_bare_{kind}_ms"] = {"median": ms(statistics.median(paired)),
                                                "interquartile": [ms(quartiles[0]), ms(quartiles[2])]}
    result["imported_at_start_by_the_hook"] = sorted(set(left["hook"][0]) - set(left["bare"][0]))
    result["meta_path_after_start"] = left["hook"][1]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
