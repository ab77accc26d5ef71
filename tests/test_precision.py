"""Mixed precision end to end: under DeepSpeed bf16 the reference computes like the policy."""
import math

import pytest

from tests.e2e import ACCELERATE, demo_env, eval_logs, free_port, run_train, train_logs

pytestmark = [pytest.mark.slow, pytest.mark.parallel]

RUN = ["--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
       "--num-samples", "16", "--eval-samples", "8", "--max-length", "64", "--max-steps", "1",
       "--logging-steps", "1", "--eval-on-start", "--num-sample-generations", "1",
       "--max-new-tokens", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.mark.parametrize("zero, processes", [
    (["--zero_stage", "2"], "2"),
    (["--zero_stage", "3", "--zero3_init_flag", "true"], "1"),
])
def test_deepspeed_bf16_reference_starts_equal_to_the_policy(env, tmp_path, zero, processes):
    """DeepSpeed casts the policy's weights to bf16 and runs no autocast. A reference in the same
    dtype computes the same log-probs, so before any update Δ = 0 exactly: the loss is ln 2 and
    every reward and margin 0, at the step-0 eval and in step 1's forward. (A reference left in
    fp32 gave an eval loss of 0.6933 and margins of ~1e-4 under ZeRO-2.)"""
    out = tmp_path / "out"
    launcher = [*ACCELERATE, "--use_deepspeed", *zero, "--mixed_precision", "bf16",
                "--num_processes", processes, "--main_process_port", str(free_port())]
    run_train(env, *RUN, "--output-dir", str(out), launcher=launcher)
    first_eval, first_step = eval_logs(out)[0], train_logs(out)[0]
    assert first_eval["step"] == 0 and first_step["step"] == 1
    for log, prefix in ((first_eval, "eval/"), (first_step, "")):
        assert log[f"{prefix}loss"] == pytest.approx(math.log(2), abs=1e-6)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert log[f"{prefix}{key}"] == 0.0, (prefix, key)
