"""Placing the frozen reference: FSDP2 sharding in two real processes over gloo on CPU."""
import gc
import os
import weakref

import pytest
import torch
import torch.multiprocessing as mp

from tests.e2e import free_port

pytestmark = pytest.mark.parallel

VOCAB = 64


def _fsdp_worker(rank: int, port: int, results: dict) -> None:
    """One of two processes: accelerate's state as it is set up for FSDP2 on GPUs (accelerate
    1.15 sets FSDP up on accelerators only, torch's `fully_shard` also runs on CPU), then the
    run's `prepare_reference`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.tensor import DTensor, Shard

    from dpo.config import ConfigError
    from dpo.model.forward import concatenated_forward
    from dpo.model.loading import prepare_reference
    from dpo.demo.tiny import tiny_qwen3

    accelerator = Accelerator(cpu=True)
    # configs/accelerate/fsdp.yaml's settings: one unit per decoder layer, rank 0 loads the
    # weights and broadcasts them (cpu_ram_efficient_loading).
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen3DecoderLayer"], reshard_after_forward=True,
        cpu_ram_efficient_loading=True, state_dict_type="SHARDED_STATE_DICT")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP

    unsharded = tiny_qwen3(VOCAB, seed=0).eval().requires_grad_(False)
    # Under cpu_ram_efficient_loading only rank 0 loads real weights: rank 1's are arbitrary.
    reference = tiny_qwen3(VOCAB, seed=rank).eval().requires_grad_(False)
    printed = []
    accelerator.print = lambda *args: printed.append(" ".join(map(str, args)))
    reference = prepare_reference(accelerator, reference)

    params = dict(reference.named_parameters())
    assert params.keys() == dict(unsharded.named_parameters()).keys()
    for name, p in params.items():
        assert isinstance(p, DTensor), name
        assert p.placements == (Shard(0),) and p.device_mesh.size() == 2, name
        assert p.to_local().shape[0] == p.shape[0] // 2, name  # half of every tensor here
        assert p.to_local().device.type == accelerator.device.type, name
        assert not p.requires_grad, name
    assert not reference.training
    assert not any(m is reference for m in accelerator._models)  # save_state would save it
    assert printed == ["reference: sharded by FSDP2 across 2 processes on cpu; frozen, "
                       "not checkpointed"], printed

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 12), generator=generator)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        want = concatenated_forward(unsharded, batch, chunked=False)
        for chunked in (False, True):  # chunked: the LM head is called outside the root forward
            got = concatenated_forward(reference, batch, chunked=chunked, chunk_size=8)
            for field in ("chosen_logps", "rejected_logps", "chosen_logits_mean",
                          "rejected_logits_mean"):
                torch.testing.assert_close(getattr(got, field), getattr(want, field),
                                           rtol=1e-6, atol=1e-6, msg=f"{field} {chunked}")

    # Dropping the caller's name frees it (train.py with --precompute-ref-logps): nothing else
    # (accelerate's model list, FSDP's state) holds on to it.
    alive = weakref.ref(reference)
    reference = None
    gc.collect()
    assert alive() is None

    plugin.fsdp_version = 1
    with pytest.raises(ConfigError, match="FSDP version 1 cannot shard the reference"):
        prepare_reference(accelerator, tiny_qwen3(VOCAB))
    results[rank] = "ok"


def test_fsdp2_shards_the_reference_frozen_and_unsaved():
    """Each parameter is a DTensor of which each of the 2 processes holds half, on its device;
    log-probs (full and chunked head) equal the unsharded model's to 1e-6 although rank 1 began
    with other weights; the reference is not among the models `save_state` checkpoints, and it
    is freed when the caller drops it. FSDP version 1 is refused with one line."""
    results = mp.Manager().dict()
    mp.spawn(_fsdp_worker, args=(free_port(), results), nprocs=2)
    assert dict(results) == {0: "ok", 1: "ok"}
