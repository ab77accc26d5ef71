"""The Accelerator for a run: which `--dtype` / mixed-precision combinations train, warn or stop."""
import pytest
from accelerate.utils import DistributedType

from dpo.config import ConfigError, load_config
from dpo.train.runtime import check_precision, make_accelerator

NO, MULTI_GPU, DEEPSPEED = DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.DEEPSPEED


@pytest.mark.parametrize("dtype, mixed_precision, distributed", [
    ("float32", "no", NO), ("float32", "bf16", MULTI_GPU), ("float32", "fp16", MULTI_GPU),
    ("float32", "no", DEEPSPEED), ("float32", "bf16", DEEPSPEED), ("float32", "fp16", DEEPSPEED),
    # DeepSpeed casts the parameters to its mode anyway and keeps fp32 master weights.
    ("bfloat16", "bf16", DEEPSPEED), ("float16", "fp16", DEEPSPEED),
])
def test_fp32_weights_or_deepspeeds_own_dtype_train_silently(dtype, mixed_precision,
                                                             distributed):
    assert check_precision(dtype, mixed_precision, distributed) is None


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("distributed", [NO, MULTI_GPU])
def test_bf16_weights_outside_deepspeed_warn_in_one_line(mixed_precision, distributed):
    """Pure bf16 weights: AdamW's small updates round away; the line says where the fp32 master
    copy comes from instead."""
    warning = check_precision("bfloat16", mixed_precision, distributed)
    assert "pure bf16 weights with no fp32 master copy" in warning
    assert "--mixed_precision bf16" in warning and "\n" not in warning


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fp16_weights_without_a_loss_scaler_warn(mixed_precision):
    warning = check_precision("float16", mixed_precision, MULTI_GPU)
    assert "pure fp16 weights with no fp32 master copy and no loss scaling" in warning
    assert "--mixed_precision fp16" in warning and "\n" not in warning


@pytest.mark.parametrize("distributed", [NO, MULTI_GPU])
def test_fp16_weights_under_fp16_mixed_precision_are_refused(distributed):
    """On a GPU, GradScaler would stop the first step with "Attempting to unscale FP16
    gradients" deep in a traceback: one line instead, before anything loads."""
    with pytest.raises(ConfigError, match=r"^--dtype float16 cannot train under "
                                          r"--mixed_precision fp16: its loss scaler needs fp32"):
        check_precision("float16", "fp16", distributed)


@pytest.mark.parametrize("dtype, mixed_precision, mode", [
    ("bfloat16", "no", "bf16"), ("bfloat16", "fp16", "bf16"),
    ("float16", "no", "fp16"), ("float16", "bf16", "fp16"),
])
def test_deepspeed_refuses_a_dtype_against_its_mode(dtype, mixed_precision, mode):
    with pytest.raises(ConfigError, match=rf"^--dtype {dtype} under DeepSpeed needs its {mode} "
                                          rf"mode \(--mixed_precision {mode}\)"):
        check_precision(dtype, mixed_precision, DEEPSPEED)


def test_make_accelerator_prints_the_warning(tmp_path, capsys):
    """The warning reaches the run's output: `python train.py --dtype bfloat16` on CPU."""
    cfg = load_config(["--dtype", "bfloat16", "--output-dir", str(tmp_path / "out"),
                       "--report-to", "none"])
    make_accelerator(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("warning: --dtype bfloat16 trains pure "
                                                      "bf16 weights")]
