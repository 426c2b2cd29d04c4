"""The config of NLPO (workloads/text/nlpo.py, run by the PPO loop of workloads/text/ppo.py). Torch-free."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .ppo_config import PPOConfig


class NLPOConfig(PPOConfig):
    """NLPO: PPO within the top-p action mask of a periodically refreshed policy copy.

    Natural Language Policy Optimization (Ramamurthy et al. 2023, RL4LMs;
    rl4lms/algorithms/nlpo/nlpo.py and MaskedCausalLMActorCriticPolicy in
    policy/causal_policy.py as apple/ml-rlgrad vendors them): at every state the
    policy may only emit the tokens inside the top-p mass of the mask policy
    (plus the tokens the tokenizer calls special); the mask policy is a frozen
    copy of the policy, refreshed every `target_update_iterations` rollouts.
    Every PPO field keeps its PPO meaning."""

    mask_type: Literal["learned_top_p"] = Field("learned_top_p", description=(
        "how the mask is chosen: the top-p set of the learned mask policy (the only type the 14 reference "
        "NLPO configs use)"))
    top_mask: float = Field(0.9, gt=0, le=1, description="top-p mass of the mask policy's distribution that stays allowed (reference: 0.9; IWSLT 0.5)")
    min_tokens_to_keep: int = Field(100, ge=1, description="the mask never keeps fewer tokens (reference default: 100)")
    target_update_iterations: int = Field(20, ge=1, description=(
        "rollouts between copies of the policy into the mask policy (reference: 20; IMDB 5)"))
