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
