"""Running `train.py` end to end in subprocesses, under any launcher, and reading what it wrote."""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import select
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from dpo import demo
from tests.conftest import ROOT
# ACCELERATE and TORCHRUN are the launchers the tests name, from here
from tests.launch import ACCELERATE, LAUNCH_VARIABLES, TORCHRUN, worker_processes

PYTHON = [sys.executable]


def demo_env(cache_dir: Path) -> dict:
    """The environment for a run: a private demo cache, one thread per process (2 cores)."""
    return {**os.environ, "DPO_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


@functools.cache
def shared_chat_model() -> Path:
    """The demo's chat model (`builtin:tiny-qwen3-chat`), built once per test session into a
    temporary directory (removed at exit): its supervised phase takes tens of seconds."""
    root = Path(tempfile.mkdtemp(prefix="dpo-demo-chat-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs have it (demo_env)
    try:
        return demo.build_demo_chat_model(root)
    finally:
        torch.set_num_threads(threads)


# Variables read when used, not when a library is imported: a run may differ from the zygote's
# environment in these and still be forked. PYTHONUNBUFFERED only changes when output is flushed;
# pytest sets PYTEST_CURRENT_TEST per test; launchers set theirs per process; the zygote applies a
# run's PYTHONPATH to the child's sys.path.
_READ_AT_RUN_TIME = ("DPO_", "PYTHONUNBUFFERED", "PYTEST_", "PYTHONPATH", *LAUNCH_VARIABLES)


_ZYGOTES: dict[frozenset, tuple[str, subprocess.Popen]] = {}  # newest last; at most 2 alive


def _import_env(env: dict) -> frozenset:
    """The part of an environment that libraries may read when imported."""
    return frozenset((k, v) for k, v in env.items() if not k.startswith(_READ_AT_RUN_TIME))


def _zygote(env: dict) -> str | None:
    """The socket of a zygote whose libraries were imported under `env` (OMP_NUM_THREADS, which
    OpenMP reads on load, included), started on first need: a test or a library that changes the
    session's environment gets a zygote of its own. None where none can start (then each run
    starts a fresh interpreter, only slower)."""
    if os.environ.get("DPO_TEST_FRESH_PROCESSES") == "1" or not hasattr(os, "fork"):
        return None
    key = _import_env(env)
    if key in _ZYGOTES:
        path, proc = _ZYGOTES[key]
        return path if proc.poll() is None else None
    while len(_ZYGOTES) >= 2:  # each holds its imported libraries in memory
        _ZYGOTES.pop(next(iter(_ZYGOTES)))[1].kill()
    root = Path(tempfile.mkdtemp(prefix="dpo-zygote-"))
    path = root / "socket"
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen([*PYTHON, "-m", "tests.zygote", str(path)], cwd=ROOT,
                                env={**env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    atexit.register(proc.kill)
    while proc.poll() is None and not path.exists():
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    _ZYGOTES[key] = str(path), proc
    if not path.exists():
        warnings.warn(f"the test zygote did not start ({(root / 'log').read_text()[-500:]}); "
                      "runs start fresh interpreters")
        return None
    return str(path)


def _forked(zygote: str, argv: list[str], envs: list[dict], timeout: int,
            ) -> subprocess.CompletedProcess:
    """`python <argv>` once per environment, all forked at once from `zygote`, as a launcher
    starts them; when one fails the others are stopped, as torchrun's agent does (SIGTERM, then
    SIGKILL). Streams are each process's in turn; the exit code is the process's own for one,
    else 1 if any failed (the launchers' exit code)."""
    with tempfile.TemporaryDirectory(prefix="dpo-run-") as tmp, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        streams = [(Path(tmp) / f"stdout{i}", Path(tmp) / f"stderr{i}") for i in range(len(envs))]
        conn.connect(zygote)
        stream = conn.makefile("rw")
        processes = [{"env": env, "stdout": str(out), "stderr": str(err)}
                     for env, (out, err) in zip(envs, streams)]
        stream.write(json.dumps({"argv": argv, "cwd": str(ROOT), "processes": processes}) + "\n")
        stream.flush()
        running = [int(pid) for pid in stream.readline().split()[1:]]
        codes, deadline, stopping = {}, time.monotonic() + timeout, False
        try:
            while len(codes) < len(running):
                conn.settimeout(max(deadline - time.monotonic(), 0.01))
                _, pid, code = stream.readline().split()
                codes[int(pid)] = int(code)
                if int(code) != 0 and not stopping:
                    stopping, deadline = True, min(deadline, time.monotonic() + 10)
                    for other in set(running) - codes.keys():
                        with contextlib.suppress(ProcessLookupError):  # ended, not yet reported
                            os.kill(other, signal.SIGTERM)
        except (TimeoutError, ValueError):  # past the deadline, or the zygote is gone
            for pid in set(running) - codes.keys():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not stopping:
                raise subprocess.TimeoutExpired([*PYTHON, *argv], timeout, *(
                    "".join(p.read_text() for p in ps) for ps in zip(*streams))) from None
        stdout, stderr = ("".join(p.read_text() for p in ps) for ps in zip(*streams))
        returncode = codes[running[0]] if len(running) == 1 else int(any(codes.values()))
        return subprocess.CompletedProcess([*PYTHON, *argv], returncode, stdout, stderr)


def run_python(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python <args>` (a script or `-m module`, then its flags) from the repo root, as
    `subprocess.run(..., capture_output=True, text=True)` reports it: in a child forked from the
    zygote started under the run's environment (see tests/zygote.py), else in a fresh
    interpreter."""
    zygote = _zygote(env)
    if zygote is None:
        return subprocess.run([*PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    return _forked(zygote, args, [env], timeout)


class Started:
    """`python <args>` started and left running, as `subprocess.Popen(..., stdout=PIPE,
    stderr=STDOUT)` gives it to a test that signals or kills it: `pid`, `poll()`, `wait()`,
    `send_signal()`, and `lines`, its output so far, line by line. Forked from the zygote where
    one runs (a forked child takes signals as a fresh interpreter does), else a fresh one."""

    def __init__(self, args: list[str], env: dict):
        self._tmp = tempfile.TemporaryDirectory(prefix="dpo-run-")
        self._output = Path(self._tmp.name) / "output"
        self._output.touch()
        self._proc = self._conn = None
        self._read, self._lines = 0, []
        zygote = _zygote(env)
        if zygote is None:
            with open(self._output, "wb") as output:
                self._proc = subprocess.Popen([*PYTHON, *args], cwd=ROOT, env=env,
                                              stdout=output, stderr=subprocess.STDOUT)
            self.pid = self._proc.pid
            return
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(zygote)
        self._stream = self._conn.makefile("rb", buffering=0)  # nothing read ahead of select
        process = {"env": env, "stdout": str(self._output), "stderr": str(self._output)}
        self._conn.sendall(json.dumps({"argv": args, "cwd": str(ROOT),
                                       "processes": [process]}).encode() + b"\n")
        self.pid = int(self._stream.readline().split()[1])
        self.returncode = None

    @property
    def lines(self) -> list[str]:
        """Complete lines so far (read from where the last call stopped: tests poll this)."""
        with open(self._output, "rb") as output:
            output.seek(self._read)
            new = output.read()
        end = new.rfind(b"\n") + 1
        self._read += end
        self._lines += new[:end].decode(errors="replace").splitlines(keepends=True)
        return self._lines

    def wait(self, timeout: float | None = None) -> int:
        if self._proc is not None:
            return self._proc.wait(timeout)
        if self.returncode is None:
            self._conn.settimeout(timeout)
            self.returncode = int(self._stream.readline().split()[2])
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        if self._proc is not None:
            return self._proc.poll()
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            return self.wait()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def run_launched(command: list[str], env: dict, timeout: int = 600, fork: bool = True,
                 ) -> subprocess.CompletedProcess:
    """`command` (a launcher, its flags, the script and its arguments) from the repo root: its
    processes forked from the zygote, each with the environment the launcher would give it
    (tests/launch.py), where that can be done and `fork` is on (off: the test's claim is the
    launcher); else the real launcher."""
    workers = worker_processes(command, env) if fork else None
    zygote = _zygote(env) if workers else None
    if zygote and all(_import_env(w) == _import_env(env) for w in workers[1]):
        return _forked(zygote, *workers, timeout)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(env: dict, *flags: str, launcher: list[str] = PYTHON, check: bool = True,
              timeout: int = 600, fork: bool = True) -> subprocess.CompletedProcess:
    """`<launcher> train.py <flags>` from the repo root; on failure show the end of stderr.
    Its processes are forked from the zygote where they can be (`fork=False`: the real
    launcher)."""
    if launcher == PYTHON:
        out = run_python(["train.py", *flags], env, timeout)
    else:
        out = run_launched([*launcher, "train.py", *flags], env, timeout, fork)
    if check and out.returncode != 0:
        raise AssertionError(f"train.py failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_logs(output_dir: Path) -> list[dict]:
    return [log for log in read_metrics(output_dir) if "loss" in log]


def eval_logs(output_dir: Path) -> list[dict]:
    return [log for log in read_metrics(output_dir) if "eval/loss" in log]


def assert_same_logs(logs: list[dict], expected: list[dict], rel: float,
                     skip: tuple[str, ...] = ("tokens_per_sec", "padding_fraction")) -> None:
    """Same steps, same keys, and every value within `rel` relative (|a−b| ≤ rel·max(|b|, 1))."""
    assert [log["step"] for log in logs] == [log["step"] for log in expected]
    for log, want in zip(logs, expected):
        assert log.keys() == want.keys()
        for key in want.keys() - set(skip):
            tol = rel * max(abs(want[key]), 1.0)
            assert abs(log[key] - want[key]) <= tol, (log["step"], key, log[key], want[key])


def assert_same_weights(output_dir: Path, expected_dir: Path, rel: float,
                        ignore: tuple[str, ...] = ()) -> None:
    """Every saved tensor within `rel` of the expected one: ‖a − b‖ / ‖b‖ ≤ rel.

    A tensor-level (Frobenius) relative error, not an entry-wise one: Adam divides each gradient
    entry by its own running RMS, so an entry whose gradient is ~0 (an LM-head row of a token that
    never occurs) turns float rounding noise into a step of up to ±lr. Such entries differ by
    ~1e-5 of the largest weight between two equally valid summation orders, while the tensor as
    a whole agrees to ~1e-7. `ignore`: names ending so, whose gradient is zero but for rounding
    (Adam then steps each entry by up to ±lr, whichever sign the noise has).
    """
    got, want = (load_file(d / "model.safetensors") for d in (output_dir, expected_dir))
    assert got.keys() == want.keys()
    for name, w in want.items():
        if name.endswith(ignore):
            continue
        assert got[name].shape == w.shape, name
        err = (got[name].float() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
        assert err <= rel, f"{name}: relative difference {err.item():.2e} > {rel}"


def weights_equal(output_dir: Path, expected_dir: Path) -> bool:
    got, want = (load_file(d / "model.safetensors") for d in (output_dir, expected_dir))
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def chat_model_cache(cache_dir: Path) -> Path:
    """`cache_dir`, a demo cache holding a copy of `shared_chat_model` (for `DPO_CACHE_DIR`)."""
    shutil.copytree(shared_chat_model(), cache_dir / f"demo-v{demo.DEMO_FORMAT_VERSION}"
                    / demo.CHAT_MODEL_DIR_NAME)
    return cache_dir


@functools.cache
def demo_run() -> tuple[Path, str]:
    """The offline demo as the README runs it (`configs/demo.yaml`), once per test session:
    `(output dir, stdout)`. Its chat model comes from `shared_chat_model`."""
    root = Path(tempfile.mkdtemp(prefix="dpo-demo-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out, env = root / "out", demo_env(chat_model_cache(root / "cache"))
    result = run_train(env, "--config", "configs/demo.yaml", "--output-dir", str(out))
    return out, result.stdout
