"""Shared fixtures: real Orthanc stacks per session (per xdist worker), wiped per test.

There is deliberately no skip when Orthanc is missing: the fixtures fail with
`StackError` and the install hint, so a CI without Orthanc cannot pass by skipping.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the package need not be pip-installed to be tested
    sys.path.insert(0, str(REPO_ROOT))

from dicom_transfer.stack import Stack, start_stack  # noqa: E402


def run_cli(
    *args: str | os.PathLike[str],
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python main.py ARGS...` (the repo's main.py, from `cwd` or the repo root)."""
    full_env = {**os.environ, "TCP_NODELAY": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "main.py"), *map(str, args)],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_cli(*args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    """`python main.py ARGS...` in the background (for kill and signal tests), output piped."""
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "main.py"), *map(str, args)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_complete(journal: Path, n: int, timeout: float = 60) -> int:
    """Wait until a running batch's journal shows `n` complete series; returns the count seen."""
    deadline, done = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and done < n:
        time.sleep(0.02)
        if not journal.exists():
            continue
        try:  # read-only: never create the journal before the run does
            with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
                done = db.execute("SELECT COUNT(*) FROM series WHERE state='complete'").fetchone()[0]
        except sqlite3.OperationalError:
            continue
    return done


@pytest.fixture(scope="session")
def cli():
    """`run_cli` as a fixture, for tests that prefer not to import from conftest."""
    return run_cli


@pytest.fixture(scope="session")
def stack_same(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PACS (HOSPITAL) and local Orthanc (CENTRE), which is also the destination."""
    stack = start_stack(tmp_path_factory.mktemp("stack-same"), "same")
    try:
        yield stack
    finally:
        stack.stop(kill=True)  # nothing to keep: SIGKILL saves ~3 s of orderly shutdown


@pytest.fixture(scope="session")
def stack_separate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PACS (HOSPITAL), local Orthanc (CENTRE, SCU only) and destination (DEST)."""
    stack = start_stack(tmp_path_factory.mktemp("stack-separate"), "separate")
    try:
        yield stack
    finally:
        stack.stop(kill=True)


@pytest.fixture
def same(stack_same: Stack) -> Stack:
    """The "same" stack, empty: dead Orthancs restarted, modalities restored, data wiped."""
    stack_same.reset()
    return stack_same


@pytest.fixture
def separate(stack_separate: Stack) -> Stack:
    """The "separate" stack, empty: dead Orthancs restarted, modalities restored, data wiped."""
    stack_separate.reset()
    return stack_separate


def _new_orthanc_command() -> list[str]:
    """The wrapper that runs a real Orthanc ≥ 1.12 from a Debian 13 tree (.ci/orthanc-new)."""
    build = subprocess.run(
        ["bash", str(REPO_ROOT / ".ci" / "orthanc-new"), "build"], capture_output=True, text=True, check=False
    )
    if build.returncode != 0:
        reason = (build.stderr.strip().splitlines() or ["unknown"])[-1]
        if os.environ.get("CI"):
            pytest.fail(f"newer Orthanc could not be built in CI: {reason}")
        pytest.skip(f"newer Orthanc unavailable here: {reason}")
    return ["bash", str(REPO_ROOT / ".ci" / "orthanc-new"), "exec", "/usr/sbin/Orthanc"]


@pytest.fixture(scope="session")
def stack_new(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PACS and local Orthanc both Orthanc ≥ 1.12 (asynchronous move jobs)."""
    command = _new_orthanc_command()
    stack = start_stack(
        tmp_path_factory.mktemp("stack-new"), "same", pacs_command=command, centre_command=command
    )
    try:
        yield stack
    finally:
        stack.stop(kill=True)


@pytest.fixture
def new(stack_new: Stack) -> Stack:
    """The newer-Orthanc stack, empty."""
    stack_new.reset()
    return stack_new
