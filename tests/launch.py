"""What `accelerate launch` and `torchrun` hand each process they start, computed without starting
them, so that a test's N processes can be forked from the zygote (tests/zygote.py) instead.

A launcher's processes differ from `python <script>` only in environment variables: accelerate
turns its flags and config file into `ACCELERATE_*` variables (its own `prepare_*_env`
functions do it here, on the same parsed arguments as `accelerate launch`), and torchrun's agent
adds each worker's rank, world size and rendezvous address. One difference is on purpose: with no
agent to host the rendezvous store, rank 0 hosts it (`TORCHELASTIC_USE_AGENT_STORE=False`), as a
process started by hand does. `tests/test_zygote.py` holds these environments equal to what the
real launchers give, key by key.

Launches this cannot fork (several machines, an MPI or TPU launcher, a port accelerate finds
busy) get `None`: the caller starts the real launcher.
"""
from __future__ import annotations

import contextlib
import os
import sys

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Set per process by the launcher, read when a run starts, never when a library is imported
# (torch reads PYTORCH_NVML_BASED_CUDA_CHECK when asked whether CUDA is available).
LAUNCH_VARIABLES = ("ACCELERATE_", "FSDP_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                    "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_", "MASTER_ADDR",
                    "MASTER_PORT", "TORCHELASTIC_", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                    "PYTORCH_NVML_BASED_CUDA_CHECK")


@contextlib.contextmanager
def _environ(env: dict):
    """os.environ is `env` inside: the launchers' functions copy and read it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _torchrun_workers(args, env: dict) -> list[dict] | None:
    """The workers' environments of torchrun's parsed `args` on one machine."""
    if str(args.nnodes) not in ("1", "1:1") or args.rdzv_endpoint or args.standalone:
        return None
    if not str(args.nproc_per_node).isdigit():  # "auto", "gpu": counted by torchrun itself
        return None
    n = int(args.nproc_per_node)
    shared = {"GROUP_RANK": "0", "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(n),
              "WORLD_SIZE": str(n), "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(n),
              "MASTER_ADDR": args.master_addr, "MASTER_PORT": str(args.master_port),
              "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
              "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "False",
              "TORCHELASTIC_SIGNALS_TO_HANDLE": args.signals_to_handle,
              "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")}
    return [{**env, **shared, "RANK": str(r), "ROLE_RANK": str(r), "LOCAL_RANK": str(r)}
            for r in range(n)]


def _script_argv(args) -> list[str]:
    script = [args.training_script, *args.training_script_args]
    return ["-m", *script] if getattr(args, "module", False) else script


def _accelerate(flags: list[str], env: dict) -> tuple[list[str], list[dict]] | None:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                         prepare_simple_launcher_cmd_env)
    from torch.distributed.run import get_args_parser

    with _environ(env):
        args, defaults, mp_from_config_flag = _validate_launch_command(
            launch_command_parser().parse_args(flags))
        if args.num_machines > 1 or args.tpu or args.use_megatron_lm:
            return None
        argv = _script_argv(args)
        if args.use_deepspeed and not args.cpu:  # as accelerate's launch_command dispatches
            fields = list(defaults.deepspeed_config.keys()) if defaults else []
            fields += ["mixed_precision"] if mp_from_config_flag else []
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            _, launch_env = prepare_deepspeed_cmd_env(args)
            # accelerate's DeepSpeed launcher imports deepspeed, which sets this in its environ
            launch_env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        elif (args.use_fsdp or args.multi_gpu) and not args.cpu:
            launch_env = prepare_multi_gpu_env(args)
        else:
            cmd, launch_env = prepare_simple_launcher_cmd_env(args)
            return (argv, [launch_env]) if cmd[0] == sys.executable else None
    torchrun = get_args_parser().parse_args(
        ["--nproc_per_node", str(args.nproc_per_node), "--master_port", str(args.master_port),
         *(["--standalone"] if getattr(args, "standalone", False) else []), *argv])
    workers = _torchrun_workers(torchrun, launch_env)
    return None if workers is None else (argv, workers)


def worker_processes(command: list[str], env: dict) -> tuple[list[str], list[dict]] | None:
    """`(argv after python, one environment per process)` of `command` (a launcher, its flags,
    then the script and its arguments) started under `env`, or None where it cannot be forked."""
    if command[:len(ACCELERATE)] == ACCELERATE:
        return _accelerate(command[len(ACCELERATE):], env)
    if command[:len(TORCHRUN)] == TORCHRUN:
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(command[len(TORCHRUN):])
        if args.module or args.no_python:
            return None
        workers = _torchrun_workers(args, env)
        return None if workers is None else ([args.training_script,
                                              *args.training_script_args], workers)
    return None
