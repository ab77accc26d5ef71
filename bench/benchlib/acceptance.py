"""The in-process parts of `bench/gpu_acceptance.py`: bf16, fp16, layouts, lora and 4bit, each on
the demo's tiny Qwen3 shape (random, seeded weights) and synthetic pairs, through the project's
own step (`dpo.train.step.dpo_step`). Each part returns one row: {"part", "status", "detail",
...its numbers}; a part that cannot run here raises `Skip` with the reason.

Every comparison is of the same weights and the same batch: only the precision or the layout
differs. The reference has weights of its own (another seed), so that the loss is not ln 2 and
its gradient is not that of the policy's log-probs alone.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import tempfile

import torch

VOCAB = 256  # small: bf16 and fp16 matmuls on CPU are slow, and the head is most of a tiny model
PAIRS, LENGTH = 4, 64  # pairs per batch, the longest sequence
# Tolerances; the script's docstring gives each with what it measured on CPU.
BF16 = {"logps_rel": 1e-3, "loss_rel": 5e-3, "grad_rel_norm": 3e-2, "grad_min_cos": 0.99}
FP16 = {"logps_rel": 5e-4, "loss_rel": 1e-3, "grad_rel_norm": 1e-2, "grad_min_cos": 0.995}
LAYOUT_FP32 = 1e-5  # log-probs and every gradient (max |Δ| over the parameter's max |g|)
FOUR_BIT_LOGPS = 5e-2
LAYOUTS = {"padded": {}, "packed": {"padding_free": True}, "shared": {"share_prompt": True},
           "shared-packed": {"share_prompt": True, "padding_free": True}}


class Skip(Exception):
    """The part cannot run here; the message says why."""


class Autocast:
    """What `dpo_step` reads off its Accelerator: the autocast context. An Accelerator fixes one
    precision per process; this stand-in lets one process compare several."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def train_config(**overrides):
    from dpo.config import TrainConfig

    return TrainConfig(**{"model": "random:tiny", "max_length": LENGTH, "batch_size": PAIRS,
                          "gradient_accumulation_steps": 1, "padding_free": False,
                          "share_prompt": False, "output_dir": tempfile.gettempdir(),
                          **overrides})


def tiny_model(seed: int, device="cpu"):
    from transformers import AutoModelForCausalLM

    from benchlib.common import model_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config("tiny", VOCAB),
                                             attn_implementation="sdpa")
    return model.to(device)


def models(device):
    """(policy, reference): the reference frozen, with other weights."""
    return tiny_model(0, device), tiny_model(1, device).eval().requires_grad_(False)


def pair_rows(seed: int = 0) -> list[dict]:
    from benchlib.common import synthetic_pairs

    return list(synthetic_pairs(PAIRS, VOCAB, LENGTH, seed))


def collate(rows, device, **layout) -> dict:
    from dpo.data import PreferenceCollator

    return {k: v.to(device) for k, v in PreferenceCollator(0, **layout)(rows).items()}


def forward(policy, reference, batch, device, dtype, cfg=None):
    """(mean loss, the policy's summed log-probs `[chosen; rejected]`) of `dpo_step`."""
    from dpo.train.step import dpo_step

    out = dpo_step(Autocast(device, dtype), cfg or train_config(), policy, reference, batch)
    return out.losses.mean(), torch.cat([out.policy.chosen_logps, out.policy.rejected_logps])


def gradients(model) -> dict:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def step(policy, reference, batch, device, dtype) -> tuple[float, torch.Tensor, dict]:
    """(loss, log-probs, every parameter's gradient) of one forward and backward."""
    policy.zero_grad(set_to_none=True)
    loss, logps = forward(policy, reference, batch, device, dtype)
    loss.backward()
    return loss.item(), logps.detach().double(), gradients(policy)


def rel(got, want) -> float:
    """Largest |got − want| / |want| over the elements."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return float(((got - want).abs() / want.abs().clamp(min=1e-30)).max())


def grad_diff(got: dict, want: dict) -> dict:
    """The global relative norm of the difference, the smallest cosine of a parameter's two
    gradients, and the largest max |Δ| / max |g| of a parameter (the tests' measure)."""
    if got.keys() != want.keys():
        raise AssertionError(f"gradients of different parameters: {sorted(got.keys() ^ want)}")
    cosines, scaled = [], []
    for name, g in want.items():
        d, norms = got[name] - g, g.norm() * got[name].norm()
        if norms > 0:  # a parameter with no gradient either way has nothing to compare
            cosines.append(float((got[name] * g).sum() / norms))
        scaled.append(float(d.abs().max() / g.abs().max().clamp(min=1e-30)))
    num = sum(float((got[n] - g).square().sum()) for n, g in want.items())
    den = sum(float(g.square().sum()) for g in want.values())
    return {"grad_rel_norm": math.sqrt(num / den), "grad_min_cos": min(cosines),
            "grad_max_rel": max(scaled)}


def verdict(part: str, numbers: dict, tolerance: dict) -> dict:
    """The row: ok if every number is within its tolerance (a cosine at least, others at most)."""
    fails = [k for k, t in tolerance.items()
             if not (numbers[k] >= t if k.endswith("cos") else numbers[k] <= t)]
    detail = ", ".join(f"{k} {numbers[k]:{'.5f' if k.endswith('cos') else '.2e'}} "
                       f"({'>=' if k.endswith('cos') else '<='} {t:g})"
                       for k, t in tolerance.items())
    return {"part": part, "status": "FAIL" if fails else "ok", "detail": detail,
            **{k: float(f"{v:.4g}") for k, v in numbers.items()}, "tolerance": tolerance}


def against_fp32(got, want) -> dict:
    (loss, logps, grads), (loss32, logps32, grads32) = got, want
    return {"logps_rel": rel(logps, logps32), "loss_rel": rel(loss, loss32),
            **grad_diff(grads, grads32)}


def part_bf16(args, device) -> dict:
    policy, reference = models(device)
    batch = collate(pair_rows(), device)
    want = step(policy, reference, batch, device, None)
    got = step(policy, reference, batch, device, torch.bfloat16)
    return verdict("bf16", against_fp32(got, want), BF16)


def part_fp16(args, device) -> dict:
    """A few AdamW steps under fp16 autocast with a GradScaler; the first step with finite
    gradients is still at the initial weights (a skipped step changes nothing): its unscaled
    gradients against fp32's."""
    policy, reference = models(device)
    batch = collate(pair_rows(), device)
    want = step(policy, reference, batch, device, None)
    if device.type != "cuda":
        try:  # fp16 autocast on CPU needs a recent torch (and is slow where the CPU lacks fp16)
            forward(policy, reference, batch, device, torch.float16)
        except RuntimeError as e:
            raise Skip(f"needs CUDA (fp16 autocast on this CPU: {e})") from None
    scaler = torch.amp.GradScaler(device.type)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    scales, skipped, got = [], [], None
    for _ in range(4):
        policy.zero_grad(set_to_none=True)
        loss, logps = forward(policy, reference, batch, device, torch.float16)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = gradients(policy)
        if got is None and all(bool(torch.isfinite(g).all()) for g in grads.values()):
            got = float(loss.detach()), logps.detach().double(), grads
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped.append(scaler.get_scale() < before)  # the scaler backs off on inf/NaN only
        scales.append(scaler.get_scale())
    if got is None:
        return {"part": "fp16", "status": "FAIL", "detail": f"every step overflowed ({scales})"}
    row = verdict("fp16", against_fp32(got, want), FP16)
    row.update(scales=scales, skipped=skipped)
    if any(skipped[1:]):
        row["status"] = "FAIL"
    row["detail"] += f"; scale {scales[-1]:g}, steps skipped {sum(skipped)} (first only: ok)"
    return row


def part_layouts(args, device) -> dict:
    """Each layout against padded, in fp32 and under bf16 (against bf16 padded)."""
    policy, reference = models(device)
    rows = pair_rows()
    batches = {name: collate(rows, device, **layout) for name, layout in LAYOUTS.items()}
    numbers, fp32, bf16 = {}, [], []
    for dtype in (None, torch.bfloat16):
        runs = {name: step(policy, reference, b, device, dtype) for name, b in batches.items()}
        for name, (_, logps, grads) in list(runs.items())[1:]:
            diff = {"logps_rel": rel(logps, runs["padded"][1]),
                    **grad_diff(grads, runs["padded"][2])}
            if dtype is None:
                numbers[name] = max(diff["logps_rel"], diff["grad_max_rel"])
                fp32.append(f"{name} {numbers[name]:.1e}")
            else:
                numbers[f"{name}_bf16_logps"] = diff["logps_rel"]
                numbers[f"{name}_bf16_grad_rel_norm"] = diff["grad_rel_norm"]
                bf16.append(f"{name} {diff['logps_rel']:.1e}/{diff['grad_rel_norm']:.1e}")
    ok = all(v <= (LAYOUT_FP32 if "_bf16_" not in k else BF16["logps_rel"] if "logps" in k
                   else BF16["grad_rel_norm"]) for k, v in numbers.items())
    tokens = {name: int(b["attention_mask"].sum()) for name, b in batches.items()}
    return {"part": "layouts", "status": "ok" if ok else "FAIL",
            "detail": f"vs padded, fp32 max rel {', '.join(fp32)} (<= {LAYOUT_FP32:g}); bf16 "
                      f"logps/grad norm {', '.join(bf16)} (<= {BF16['logps_rel']:g}/"
                      f"{BF16['grad_rel_norm']:g}); tokens {tokens}",
            "max_rel": {k: float(f"{v:.4g}") for k, v in numbers.items()}, "tokens": tokens}


def adapter_step(policy, reference, batch, device, dtype, cfg) -> dict:
    """One optimizer step of the LoRA policy: loss before and after, and what changed."""
    from dpo.train.runtime import make_optimizer

    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = make_optimizer(cfg, policy)
    loss, logps = forward(policy, reference, batch, device, dtype, cfg)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    optimizer.step()
    with torch.no_grad():
        after, _ = forward(policy, reference, batch, device, dtype, cfg)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    adapter = {n for n in before if "lora_" in n}
    return {"loss": float(loss), "loss_after": float(after), "logps": logps.detach().double(),
            "adapter_changed": len(changed & adapter), "adapter_tensors": len(adapter),
            "base_changed": sorted(changed - adapter)}


def lora_verdict(part: str, out: dict, extra_ok: bool = True, extra: str = "") -> dict:
    ok = (math.isfinite(out["loss"]) and math.isfinite(out["loss_after"])
          and abs(out["loss"] - math.log(2)) <= 1e-3 and out["loss_after"] < out["loss"]
          and out["adapter_changed"] > 0 and not out["base_changed"] and extra_ok)
    detail = (f"loss {out['loss']:.6f} (ln 2 at B = 0) -> {out['loss_after']:.6f}, "
              f"{out['adapter_changed']}/{out['adapter_tensors']} adapter tensors changed "
              f"(lora_A has no gradient while B = 0), base changed: "
              f"{out['base_changed'][:3] or 'none'}{extra}")
    return {"part": part, "status": "ok" if ok else "FAIL", "detail": detail,
            **{k: v for k, v in out.items() if k != "logps"}}


def part_lora(args, device) -> dict:
    if importlib.util.find_spec("peft") is None:
        raise Skip("peft not installed")
    from peft import get_peft_model

    from dpo.model.lora import AdapterOffReference, lora_config

    cfg = train_config(lora_r=8, learning_rate=1e-3)
    peft_model = get_peft_model(tiny_model(0, device), lora_config(cfg))
    policy, reference = peft_model.get_base_model(), AdapterOffReference(peft_model)
    return lora_verdict("lora", adapter_step(policy, reference, collate(pair_rows(), device),
                                             device, None, cfg))


def part_4bit(args, device) -> dict:
    """The tiny model saved and loaded 4-bit by the project's loader (QLoRA: nf4, bf16 compute),
    a LoRA step under bf16 autocast; its log-probs (B = 0: the base's) against the bf16 model's."""
    if device.type != "cuda":
        raise Skip("needs CUDA")
    for package in ("bitsandbytes", "peft"):
        if importlib.util.find_spec(package) is None:
            raise Skip(f"{package} not installed")
    from dpo.model.loading import load_causal_lm
    from dpo.model.lora import load_peft_policy

    batch = collate(pair_rows(), device)
    with tempfile.TemporaryDirectory() as path:
        tiny_model(0).save_pretrained(path)
        cfg = train_config(model=path, lora_r=8, learning_rate=1e-3, load_in_4bit=True,
                           output_dir=path)
        policy, reference = load_peft_policy(cfg, path, load_causal_lm)
        full = load_causal_lm(train_config(model=path), path).to(device).requires_grad_(False)
    with torch.no_grad():
        _, want = forward(full, full, batch, device, torch.bfloat16)
    out = adapter_step(policy, reference, batch, device, torch.bfloat16, cfg)
    diff = rel(out["logps"], want)
    return {**lora_verdict("4bit", out, diff <= FOUR_BIT_LOGPS,
                           f"; logps rel vs bf16 {diff:.2e} (<= {FOUR_BIT_LOGPS:g})"),
            "logps_rel": diff}
