"""The forked runs of tests/zygote.py behave as `python <script>` does: argv, environment, working
directory, both streams and the exit code, and libraries imported under the run's environment."""
import os

import pytest

from tests import e2e
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # the test harness itself: each case starts zygotes

SCRIPT = """
import os, sys
print("argv", sys.argv[1:], "cwd", os.getcwd(), "var", os.environ.get("DPO_PROBE"))
print("preloaded", "torch" in sys.modules, "path0", sys.path[0])
print("to stderr", file=sys.stderr)
{ending}
"""


@pytest.fixture
def script(tmp_path):
    def write(ending):
        path = tmp_path / "probe.py"
        path.write_text(SCRIPT.format(ending=ending))
        return str(path)
    return write


def run(args, **env):
    return e2e.run_python(args, {**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=60)


def test_a_forked_run_is_the_script_with_its_own_argv_env_cwd_streams_and_code(script):
    """Also, as the last test module of the suite: runs late in the session still fork, whatever
    earlier tests and libraries did to the process environment."""
    if e2e._zygote({**os.environ, "OMP_NUM_THREADS": "1"}) is None:
        pytest.skip("no zygote here (DPO_TEST_FRESH_PROCESSES=1)")
    path = script("sys.exit(3)")
    out = run([path, "a", "--b"], DPO_PROBE="x")
    assert out.returncode == 3
    assert out.stdout.splitlines() == [f"argv ['a', '--b'] cwd {ROOT} var x",
                                       f"preloaded True path0 {os.path.dirname(path)}"]
    assert out.stderr == "to stderr\n"
    assert run([path], DPO_PROBE="y").stdout.startswith("argv [] cwd")  # nothing carried over


@pytest.mark.parametrize("ending, code, tail", [
    ("raise ValueError('boom')", 1, "ValueError: boom\n"),
    ("sys.exit('a message')", 1, "a message\n"),
    ("pass", 0, "to stderr\n"),
])
def test_endings_give_the_interpreters_exit_code_and_stderr(script, ending, code, tail):
    out = run([script(ending)])
    assert out.returncode == code and out.stderr.endswith(tail), out.stderr


def test_a_run_gets_the_libraries_imported_under_its_own_environment(tmp_path):
    """HF_HOME is read when huggingface_hub is imported: a run that changes it is forked from a
    zygote started under it, never from one that imported the library under another value."""
    probe = tmp_path / "hf_home.py"
    probe.write_text("import sys, huggingface_hub.constants as c\n"
                     "print('torch' in sys.modules, c.HF_HOME)\n")
    forked = str(os.environ.get("DPO_TEST_FRESH_PROCESSES") != "1")
    for home in ("one", "two", "one"):
        out = run([str(probe)], HF_HOME=str(tmp_path / home))
        assert out.stdout.split() == [forked, str(tmp_path / home)], out.stderr


def test_a_module_runs_as_main():
    out = run(["-m", "dpo.evaluate"])
    assert out.returncode == 1 and out.stderr.startswith("error: model: give --model"), out.stderr


DUMP_ENV = """
import json, os, sys
preloaded = "torch" in sys.modules
with open(os.path.join(sys.argv[1], os.environ.get("RANK", "0") + ".json"), "w") as f:
    json.dump({**os.environ, "preloaded": str(preloaded), "sys.path": sys.path}, f)
"""
# Differ between any two launches, or on purpose (tests/launch.py): the agent's run id and error
# file, and who hosts the rendezvous store; whether torch was imported before the script.
UNIQUE = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE",
          "preloaded")


@pytest.mark.parallel
@pytest.mark.parametrize("launcher", [
    [*e2e.ACCELERATE, "--multi_gpu", "--num_processes", "2"],
    [*e2e.ACCELERATE, "--config_file", "configs/accelerate/zero3.yaml", "--num_processes", "2"],
    [*e2e.ACCELERATE, "--num_processes", "1", "--mixed_precision", "bf16"],
    [*e2e.TORCHRUN, "--nproc_per_node", "2"],
], ids=["ddp", "zero3_config", "simple_bf16", "torchrun"])
def test_forked_processes_get_the_environment_the_launcher_gives(tmp_path, launcher):
    """Each process of a forked launch (tests/launch.py) gets, key by key, the environment and
    the sys.path the real launcher gives the process of the same rank, less what differs between
    any two launches."""
    from tests.launch import worker_processes

    script = tmp_path / "dump_env.py"
    script.write_text(DUMP_ENV)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = ["--main_process_port" if launcher[2].startswith("accelerate") else "--master_port",
            str(e2e.free_port())]
    command = [*launcher, *port, str(script), str(tmp_path)]

    def dumped():
        envs = [e2e.json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
        for p in tmp_path.glob("*.json"):
            p.unlink()
        return envs

    def common(envs):
        return [{k: v for k, v in e.items() if k not in UNIQUE} for e in envs]

    real = e2e.subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    assert real.returncode == 0, real.stderr[-2000:]
    launched = dumped()
    assert [e["preloaded"] for e in launched] == ["False"] * len(launched)
    argv, envs = worker_processes(command, env)
    assert argv == [str(script), str(tmp_path)]
    assert common(envs) == [{k: v for k, v in e.items() if k != "sys.path"}
                            for e in common(launched)]
    forked = e2e.run_launched(command, env)
    assert forked.returncode == 0, forked.stderr[-2000:]
    forked = dumped()
    assert common(forked) == common(launched)
    fresh = os.environ.get("DPO_TEST_FRESH_PROCESSES") == "1"
    assert [e["preloaded"] for e in forked] == [str(not fresh)] * len(launched)
