"""The config of sample extraction (workloads/text/extract.py). Torch-free."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..core.config import REWARD_STD_THRESHOLDS, Thresholds
from .config import GRAD_NORM_OF, MODEL_DTYPE, GenerationConfig, GradNormOf, ModelDType, SampledTaskConfig


class ExtractConfig(SampledTaskConfig):
    """Sample extraction: K samples per input, rewards, reward std and gradient norms.

    Paper section 4: K samples per input, their rewards, per-input reward
    mean/std and the per-input policy-gradient norm (apple/ml-rlgrad
    rl4lms_extract_samples_from_model_runner.py)."""

    produces_checkpoint: ClassVar[bool] = False

    split: Literal["train", "validation", "test"] = Field("train", description="split the inputs are drawn from (paper: train)")
    num_inputs: int = Field(5000, ge=1, description="inputs drawn at random (paper: 5,000; datapool.num_train_samples)")
    num_samples_per_input: int = Field(10, ge=2, description="K samples per input (paper: 10; evaluation.num_samples_per_input)")
    seed: int = Field(7, description="seed of the random choice of inputs (paper: 7)")
    generation: GenerationConfig = Field(GenerationConfig(), description="sampling settings")
    batch_size: int = Field(16, ge=1, description="prompts per generate() call, each with K sequences")
    compute_grad_norm: bool = Field(True, description="measure each input's leave-one-out policy-gradient norm")
    dtype: ModelDType = Field("auto", description=MODEL_DTYPE)
    grad_norm_of: GradNormOf = Field("sampling_policy", description=GRAD_NORM_OF)
    grad_norm_dtype: Literal["float32", "float64"] = Field("float32", description="precision of the gradient-norm pass and of the stored log-probs")
    shard_size: int = Field(256, ge=1, description="inputs per Parquet shard: the unit of resumption")
    reward_std_thresholds: Thresholds = Field(list(REWARD_STD_THRESHOLDS), description="report the share of inputs whose reward std is under each")
