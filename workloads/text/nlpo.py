"""NLPO's action mask (Ramamurthy et al. 2023; RL4LMs as apple/ml-rlgrad vendors it):

    allowed(s) = the smallest set of tokens whose probability under the mask policy
                 π_mask(·|s) reaches top_mask (at least min_tokens_to_keep of them),
                 plus every special token               (logits_processor.py, learned_top_p)
    π_θ^mask(a|s) = softmax(logits_θ(s) / T) restricted to allowed(s), renormalised
                 (MaskableCategoricalDistribution.apply_masking)

Rollouts sample from π_θ^mask (a logits processor sets the logits outside the
mask to -inf); the PPO ratio, entropy and value targets use π_θ^mask with the
masks of the rollout, while the KL penalty compares the UNMASKED π_θ at T with
π_ref (alg_wrappers.py: raw_log_probs - ref_log_probs). π_mask is a frozen copy
of the policy, refreshed every target_update_iterations rollouts, after the
rollout and before the update (nlpo.py learn; the update uses the rollout's masks).

One deliberate difference: the masks of a rollout are recomputed for the
update from the same mask policy (instead of stored per token), and the token
actually sampled is always allowed there, so a borderline top-p token that
padding moves by a rounding error cannot give a ratio of 0/0.
"""

from __future__ import annotations

import copy

import torch
from transformers import LogitsProcessor

from .models import output_logits


def top_p_allowed(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int) -> torch.Tensor:
    """Bool [..., V]: the tokens inside the top-p mass of softmax(logits), keeping at least
    min_tokens_to_keep (the nucleus rule of transformers' TopPLogitsWarper, as RL4LMs applies it)."""
    sorted_logits, sorted_indices = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > top_p
    if min_tokens_to_keep > 1:
        remove[..., : min_tokens_to_keep - 1] = False
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses the threshold
    remove[..., 0] = False
    return ~remove.scatter(-1, sorted_indices, remove)


class ActionMasker:
    """The mask policy: which tokens the policy may emit at each state."""

    def __init__(self, policy_lm, top_mask: float, min_tokens_to_keep: int, special_ids: list[int],
                 update_every: int):
        self.model = copy.deepcopy(policy_lm).eval().requires_grad_(False)
        self.top_mask, self.min_tokens_to_keep, self.update_every = top_mask, min_tokens_to_keep, update_every
        self.special_ids = sorted(set(special_ids))

    def refresh(self, policy_lm) -> None:
        """π_mask <- π_θ (RL4LMs update_mask_model)."""
        self.model.load_state_dict(policy_lm.state_dict())

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = top_p_allowed(logits.float(), self.top_mask, self.min_tokens_to_keep)
        allowed[..., self.special_ids] = True
        return allowed

    @torch.no_grad()
    def rollout_masks(self, prompt_ids: list[list[int]], output_ids: list[list[int]]) -> torch.Tensor:
        """Bool [B, T, V]: the allowed tokens at every output position of a rollout; the sampled token is
        always among them (see the module docstring)."""
        logits, outputs, _, _ = output_logits(self.model, prompt_ids, output_ids)
        allowed = self.allowed(logits)
        return allowed.scatter_(-1, outputs.unsqueeze(-1), True)

    def logits_processor(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LogitsProcessor:
        """For generate(): masks the scores of each step with the mask policy's allowed set."""
        return _MaskLogits(self, input_ids, attention_mask)


class _MaskLogits(LogitsProcessor):
    def __init__(self, masker: ActionMasker, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.masker, self.prompt_ids, self.prompt_mask = masker, prompt_ids, prompt_mask

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        model = self.masker.model
        copies = input_ids.shape[0] // self.prompt_ids.shape[0]  # num_return_sequences
        prompt_mask = self.prompt_mask.repeat_interleave(copies, dim=0)
        if model.config.is_encoder_decoder:  # input_ids: the decoder's, start token first
            logits = model(input_ids=self.prompt_ids.repeat_interleave(copies, dim=0), attention_mask=prompt_mask,
                           decoder_input_ids=input_ids).logits[:, -1]
        else:  # input_ids: the left-padded prompt, then the tokens generated so far
            generated = input_ids.shape[1] - prompt_mask.shape[1]
            attention = torch.cat([prompt_mask, prompt_mask.new_ones(len(input_ids), generated)], dim=1)
            logits = model(input_ids=input_ids, attention_mask=attention,
                           position_ids=(attention.cumsum(dim=1) - 1).clamp(min=0)).logits[:, -1]
        return scores.masked_fill(~self.masker.allowed(logits), -float("inf"))
