"""A parent process that has imported torch, transformers, accelerate and datasets once, and forks a
child per process of an end-to-end run: the child runs `train.py` (or `-m dpo.evaluate`) as
`__main__` with the run's own argv, environment, working directory, stdout, stderr and exit code.

Why: on the 2-core CI machine a fresh interpreter spends ~6 s importing those libraries before
`train.py` reads its first flag, and the suite starts well over a hundred single-process runs.
A forked child starts in a fraction of a second and imports `dpo` itself, fresh.

What a child shares with its parent, and so with other runs: the libraries' import-time state
(the environment variables they read on import: `tests/e2e.py` forks a run only from a zygote
started under the same environment, less variables read at run time) and Python's hash seed.
Nothing else: memory is copied on fork, so no run sees another's state. A launch of N processes
(`accelerate launch`, `torchrun`) forks N children, each with the environment the launcher would
give it (tests/launch.py). Runs that a test signals or kills, and tests whose claim is the
launcher itself, start fresh interpreters; `DPO_TEST_FRESH_PROCESSES=1` makes every run do so.

Protocol, one connection per launch over a Unix socket: the client sends one JSON line
`{"argv", "cwd", "processes": [{"env", "stdout", "stderr"}, ...]}` (argv as after `python`: a
script path or `-m` module, then its arguments; stdout/stderr are file paths; one entry per
process, each forked at once, as a launcher starts them), and reads back `pids N...` and, as
each child ends, `rc PID N` (N negative: killed by that signal, as `subprocess` reports it).
"""
from __future__ import annotations

import json
import os
import socket
import sys

# What `train.py` and `dpo.evaluate` import before they parse a flag, less `dpo` itself.
PRELOAD = ("torch", "transformers", "transformers.optimization", "accelerate", "accelerate.utils",
           "accelerate.utils.memory", "datasets", "safetensors.torch", "yaml", "tqdm")


def _child(argv: list[str], cwd: str, process: dict) -> None:
    """Become the run: never returns."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        for fd, path in ((1, process["stdout"]), (2, process["stderr"])):
            if fd == 2 and path == process["stdout"]:  # both streams in one file, as 2>&1
                os.dup2(1, 2)
                continue
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(process["env"])
        # PYTHONPATH is read at start-up: entries a run adds (accelerate's DeepSpeed launcher
        # adds the working directory) go after the script's folder, as the interpreter puts them.
        added = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p and p not in sys.path[1:]]
        sys.path[1:1] = added
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("message") prints the message and exits 1, as the interpreter does
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # an uncaught exception: the traceback and exit 1, as the interpreter
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the client waits for this name: the parent is ready
    server.listen()
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rw") as stream:
            line = stream.readline()
            if not line:
                continue
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pids = []
            for process in request["processes"]:
                pid = os.fork()
                if pid == 0:
                    server.close()
                    conn.close()
                    _child(request["argv"], request["cwd"], process)
                pids.append(pid)
            try:
                stream.write(f"pids {' '.join(map(str, pids))}\n")
                stream.flush()
            except OSError:
                pass
            for _ in pids:  # the zygote has no other children: each launch's are all reaped
                pid, status = os.wait()
                try:
                    stream.write(f"rc {pid} {os.waitstatus_to_exitcode(status)}\n")
                    stream.flush()
                except OSError:  # the client gave up (a timeout): reaped all the same
                    pass


if __name__ == "__main__":
    serve(sys.argv[1])
