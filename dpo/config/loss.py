"""The loss section: the preference loss (or mixture of losses) and its options, and the
reference it measures against: precomputed once, or moved towards the policy (TR-DPO). The
losses check their own options (`dpo.loss.check_loss_options`); this runs that check before
anything loads and adds the ones about which options go with which loss."""
from __future__ import annotations

from dataclasses import dataclass

from dpo.config.fields import ConfigError, _opt, check_at_least, declared_default
from dpo.loss import LOSS_TYPES, check_loss_options, is_unpaired, needs_reference
from dpo.loss.ranked import RANKING_LOSSES


@dataclass
class LossSection:
    """loss: the preference loss (see dpo/loss and docs/dpo.md), its options, and the
    reference"""

    beta: float = _opt(0.1, "β: strength of the implicit KL penalty to the reference; for orpo, "
                       "λ, the weight of the odds-ratio term (TRL's ORPOConfig.beta)")
    loss_type: list[str] = _opt(["sigmoid"], "preference loss (see dpo/loss and docs/dpo.md); "
                                "several make a mixture (MPO), summed with loss_weights",
                                choices=LOSS_TYPES)
    loss_weights: list[float] | None = _opt(None, "weight of each loss_type (default 1 each)")
    label_smoothing: float | None = _opt(None, "ε of the losses that take it: sigmoid (cDPO), "
                                         "robust, exo_pair, aot, aot_unpaired (default 0; "
                                         "exo_pair 1e-3)")
    simpo_gamma: float = _opt(0.0, "γ, the target margin of SimPO")
    discopop_tau: float = _opt(0.05, "τ, the temperature of DiscoPOP's modulation")
    f_divergence_type: str = _opt("reverse_kl", "divergence from the reference whose score "
                                  "difference sigmoid, robust, exo_pair, discopop and hinge push "
                                  "(f-DPO; an sft term may stand beside them); reverse_kl is "
                                  "DPO's",
                                  choices=("reverse_kl", "forward_kl", "js_divergence",
                                           "alpha_divergence"))
    f_alpha_divergence_coef: float = _opt(0.5, "α of alpha_divergence, in the f-DPO paper's "
                                          "form f'(u) = (1 - u^(-α))/α (1 = forward_kl); TRL "
                                          "1.16's f_alpha_divergence_coef is 1 - α")
    bco_baseline: str = _opt("running_mean", "δ of bco_pair: the running mean of the rewards, or "
                             "none (δ = 0)", choices=("running_mean", "none"))
    desirable_weight: float = _opt(1.0, "KTO's λ_D: weight of the desirable completions' losses")
    undesirable_weight: float = _opt(1.0, "KTO's λ_U: weight of the undesirable completions' "
                                     "losses (the paper: λ_D·n_D / (λ_U·n_U) in [1, 4/3])")
    ranking_loss: str = _opt("plackett_luce", "the loss of ranked rows (N responses): the "
                             "Plackett–Luce likelihood of the ranking, or the mean DPO loss over "
                             "its ordered pairs; N = 2 is DPO either way",
                             choices=RANKING_LOSSES)
    use_weighting: bool = _opt(False, "WPO: weight each pair's loss by how likely the policy "
                               "finds its two responses (detached, clamped at 1 as in the WPO "
                               "authors' code; TRL 1.16 does not clamp)")
    ld_alpha: float | None = _opt(None, "LD-DPO's α in [0, 1]: the longer response's tokens past "
                                  "the shorter one's length count α times in its log-prob, "
                                  "for policy and reference (1 = DPO); none = off")
    rpo_alpha: float = _opt(0.0, "RPO: adds sft to loss_type with this weight (an alias of "
                            "--loss-type ... sft --loss-weights ... α); 0 = off")
    sync_ref_model: bool = _opt(False, "TR-DPO: move the reference towards the policy every "
                                "ref_model_sync_steps optimizer steps")
    ref_model_mixup_alpha: float = _opt(0.6, "TR-DPO's α: θ_ref ← α·θ + (1 − α)·θ_ref (1 = a "
                                        "hard copy)")
    ref_model_sync_steps: int = _opt(512, "TR-DPO: optimizer steps between reference updates")
    precompute_ref_logps: bool = _opt(False, "compute the reference's log-probs in one pass "
                                      "before training (cached on disk), then free the reference")

    def _validate_loss(self) -> None:
        check_at_least(self, 0, "rpo_alpha")
        types = ", ".join(self.loss_type)
        if self.precompute_ref_logps and not needs_reference(self.loss_type):
            raise ConfigError(f"precompute_ref_logps: loss_type {types} is reference-free, there "
                              "is nothing to precompute; drop the flag")
        if self.bco_baseline != "running_mean" and "bco_pair" not in self.loss_type:
            raise ConfigError(f"bco_baseline is the baseline of loss_type bco_pair, not of "
                              f"{types}; drop it")
        try:
            check_loss_options(beta=self.beta, loss_type=self.loss_type,
                               loss_weights=self.loss_weights,
                               label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
                               discopop_tau=self.discopop_tau,
                               f_divergence_type=self.f_divergence_type,
                               f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                               use_weighting=self.use_weighting, ld_alpha=self.ld_alpha,
                               desirable_weight=self.desirable_weight,
                               undesirable_weight=self.undesirable_weight)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._validate_unpaired(types)
        if (self.ranking_loss != declared_default(self, "ranking_loss")
                and list(self.loss_type) != ["sigmoid"]):
            raise ConfigError(f"ranking_loss {self.ranking_loss}: rankings train with loss_type "
                              f"sigmoid alone, not {types}")
        if (self.discopop_tau != declared_default(self, "discopop_tau")
                and "discopop" not in self.loss_type):
            raise ConfigError(f"discopop_tau is the temperature of loss_type discopop, not of "
                              f"{types}; drop it")
        self._validate_reference_sync(types)
        if (self.f_alpha_divergence_coef != declared_default(self, "f_alpha_divergence_coef")
                and self.f_divergence_type != "alpha_divergence"):
            raise ConfigError("f_alpha_divergence_coef is the α of f_divergence_type "
                              f"alpha_divergence, not of {self.f_divergence_type}; drop it")

    def _validate_unpaired(self, types: str) -> None:
        """KTO's settings; its batch size is checked across sections."""
        if not is_unpaired(self.loss_type):
            for name in ("desirable_weight", "undesirable_weight"):
                if getattr(self, name) != declared_default(self, name):
                    raise ConfigError(f"{name} weighs KTO's classes, not loss_type {types}; "
                                      "drop it")
        elif self.precompute_ref_logps:
            raise ConfigError("precompute_ref_logps: KTO's KL estimate reads completions paired "
                              "with other rows' prompts, which change with every batch; drop "
                              "the flag")

    def _validate_reference_sync(self, types: str) -> None:
        """TR-DPO's settings; that LoRA has no reference model to update is checked across
        sections (`TrainConfig._validate_across`)."""
        if not self.sync_ref_model:
            for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
                if getattr(self, name) != declared_default(self, name):
                    raise ConfigError(f"{name} sets TR-DPO's reference updates: add "
                                      "--sync-ref-model, or drop it")
            return
        if not needs_reference(self.loss_type):
            raise ConfigError(f"sync_ref_model: loss_type {types} uses no reference to update")
        if self.precompute_ref_logps:
            raise ConfigError("sync_ref_model: precomputed reference log-probs would go stale "
                              "at the first update; drop --precompute-ref-logps")
        if not 0 < self.ref_model_mixup_alpha <= 1:
            raise ConfigError("ref_model_mixup_alpha must lie in (0, 1], got "
                              f"{self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")


def fold_rpo(loss_type: list[str], loss_weights: list[float] | None, rpo_alpha: float
             ) -> tuple[list[str], list[float] | None, float]:
    """`rpo_alpha` α as what it means: RPO is the mixture of the loss types with `sft` at weight
    α. Returns the mixture's types and weights, and the alias spent (0)."""
    if "sft" in loss_type:
        raise ConfigError("rpo_alpha adds sft to loss_type, which has it already; give its "
                          "weight in loss_weights instead")
    weights = loss_weights if loss_weights is not None else [1.0] * len(loss_type)
    return [*loss_type, "sft"], [*weights, float(rpo_alpha)], 0.0
