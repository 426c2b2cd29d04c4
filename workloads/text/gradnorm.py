"""Per-input reward statistics and policy-gradient norms (paper section 4).

For an input x with K samples y_1..y_K and rewards r_1..r_K:

    reward mean     r̄ = (1/K) Σ_k r_k
    reward std        = sqrt((1/K) Σ_k (r_k - r̄)^2)          (population, 1/K)
    unbiased std      = sqrt((1/(K-1)) Σ_k (r_k - r̄)^2)
    gradient        ĝ(x) = (1/K) Σ_k (r_k - b_k) ∇_θ log π_θ(y_k|x)
                    b_k  = (1/(K-1)) Σ_{j≠k} r_j              (leave-one-out baseline:
                           independent of y_k, so ĝ is unbiased for ∇_θ V(x; θ))
    gradient norm     = ||ĝ(x)||_2 over ALL trainable parameters

Theorem 1 of the paper bounds ||∇_θ V(x; θ)|| by a constant times STD(x; θ)^(2/3):
these two columns are what the report plots against each other.

Two ways to compute the gradient norms, with the same arguments and result:
  per_input_grad_norms_loop  one backward per input (the reference);
  per_input_grad_norms       the production path: ONE forward and ONE backward
                             for many inputs, per-input norms from per-layer
                             activations and output gradients (see there).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .models import causal_inputs, pad_rows, sequence_log_probs


def reward_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std with 1/K, std with 1/(K-1)) over the last dimension (the K samples). K equal
    rewards have std exactly 0: floating-point summation leaves ~1e-17 for rewards such as
    8 x 0.1 (a weighted sum of reward functions), which would read as a non-zero std."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    mean = rewards.mean(dim=-1)
    equal = rewards.amax(dim=-1) == rewards.amin(dim=-1)
    zero = torch.zeros_like(mean)
    return (mean, torch.where(equal, zero, rewards.std(dim=-1, correction=0)),
            torch.where(equal, zero, rewards.std(dim=-1, correction=1)))


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """r_k - b_k with b_k the mean of the other K-1 rewards (= K/(K-1) * (r_k - r̄))."""
    num_samples = rewards.shape[-1]
    baseline = (rewards.sum(dim=-1, keepdim=True) - rewards) / (num_samples - 1)
    # K equal rewards: every advantage is exactly 0 (the sums above leave ~1e-17 for 4 x 0.1)
    equal = rewards.amax(dim=-1, keepdim=True) == rewards.amin(dim=-1, keepdim=True)
    return torch.where(equal, torch.zeros_like(rewards), rewards - baseline)


def per_input_grad_norms_loop(model, prompt_ids: list[list[int]], output_ids: list[list[list[int]]],
                              rewards: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """||ĝ(x)|| for each input, one backward per input: the slow, obviously-correct
    reference of `per_input_grad_norms` (same arguments, same result), and its
    path for models the batched path does not cover (seq2seq, see there).

    prompt_ids[i]     token ids of input i's prompt (unpadded)
    output_ids[i][k]  token ids of its k-th sample, EOS included
    rewards[i, k]     that sample's reward

    One backward per input, its K samples batched in one forward: the gradient
    of the surrogate (1/K) Σ_k A_k log π(y_k|x) with the advantages A_k held
    constant is exactly ĝ(x). The policy is softmax(logits / temperature): 1 is the
    model itself, the sampling temperature the distribution RL4LMs trains (see
    `grad_norm_of` in the workload configs). The caller puts the model in eval mode
    (no dropout).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    advantages = leave_one_out_advantages(torch.as_tensor(rewards, dtype=torch.float64))
    grad_norms = torch.zeros(len(prompt_ids), dtype=torch.float64)
    for i, (prompt, outputs) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        if not advantages[i].any():  # all K rewards equal: ĝ(x) = 0 exactly, skip the backward
            continue
        log_probs = sequence_log_probs(model, [prompt] * len(outputs), outputs, temperature)
        surrogate = (advantages[i].to(device=log_probs.device, dtype=log_probs.dtype) * log_probs).mean()
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        squared = sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads if g is not None)
        grad_norms[i] = squared.sqrt().item()
    return grad_norms


# --------------------------------------------------------------------------
# The batched path: one forward and one backward for many inputs
# --------------------------------------------------------------------------
#
# All N = G*K sequences of a chunk of G inputs go through the model's body in
# one padded batch, and ONE backward of the summed surrogate
# Σ_i (1/K) Σ_k A_ik log π(y_ik|x_i) runs through it. The sequences of a batch
# never interact (eval mode, attention within a sequence), so the gradient that
# reaches a layer's output at a token of input i's samples is exactly the
# gradient of input i's own surrogate there. Every parameter's gradient for
# input i is then a sum over input i's tokens τ of per-token terms:
#
#   Linear / Conv1D   y = a W (+ b)      ∇W_i = Σ_τ a_τ g_τᵀ     ∇b_i = Σ_τ g_τ
#   LayerNorm         y = â ⊙ γ + β      ∇γ_i = Σ_τ g_τ ⊙ â_τ    ∇β_i = Σ_τ g_τ
#   RMSNorm           y = γ ⊙ â          ∇γ_i = Σ_τ g_τ ⊙ â_τ    (â = a / sqrt(mean(a²) + eps))
#                     (LayerNorm's â = (a - mean) / sqrt(var + eps))
#   Embedding         y = E[id]          ∇E_i = Σ_τ e_{id_τ} u_τᵀ, i.e. row v of ∇E_i is
#                                        Σ_{τ: id_τ = v} u_τ (u: gradient at the embedding output)
#
# with a_τ the layer input and g_τ the gradient at its output. ||ĝ(x_i)||² is the
# sum over parameters of ||∇θ_i||².
#
# Which tokens. Padded tokens carry a zero output gradient (masked out of the
# loss; attention gives them probability exactly 0) and are dropped. The K
# copies of input i's prompt have the same activations a at each prompt
# position (causal attention: a prompt position sees only the prompt), so
# Σ_k a_{k,t} g_{k,t}ᵀ = a_t (Σ_k g_{k,t})ᵀ: each prompt position enters ONCE,
# with its K gradients summed. Input i then has n_i = |prompt_i| + Σ_k |y_ik|
# tokens (`TokenLayout`), instead of K times the padded width.
#
# Two exact forms of ||Σ_τ a_τ g_τᵀ||²_F, and each layer takes the one its
# device runs faster (`_ghost_is_faster`; the `norm_form` argument forces one):
#
#   explicit   materialise A_iᵀ G_i (d_in x d_out) per input      ~ n d_in d_out
#   ghost      ||Σ_τ a_τ g_τᵀ||²_F = Σ_{τ,σ} (a_τ·a_σ)(g_τ·g_σ)   ~ n² (d_in + d_out)
#              (the sum of the elementwise product of the two n x n Gram matrices)
#
# The LM head (the widest layer: d_out = the vocabulary) is not run through
# autograd at all. The body gives the final hidden states h; at the predicted
# positions of real output tokens only (the loop also computes every prompt
# and padding position's logits), in blocks of inputs sized by the memory
# budget, the gradient of the surrogate at the logits is in closed form,
#
#   z_τ = w_τ (onehot(y_τ) - softmax(logits_τ))      (w_τ = A_ik / K for a token of sample k)
#
# which gives the gradient at h (z W, fed to the body's backward) and the
# head's norms (∇W_i = Σ_τ z_τ h_τᵀ by either form above, ∇b_i = Σ_τ z_τ); the
# [tokens, vocabulary] logits of a block are freed before the next. An input
# too long for one block takes the explicit form, accumulated block by block.
#
# A tied weight (GPT-2, SmolLM2: the LM head's weight IS the token embedding)
# receives both contributions, summed BEFORE the norm:
#
#   ||∇E_emb + ∇E_head||² = ||∇E_emb||² + ||∇E_head||² + 2 <∇E_emb, ∇E_head>
#   <∇E_emb, ∇E_head> = Σ_{v among input i's ids} (Σ_{τ: id_τ = v} u_τ) · (Σ_σ z_σ[v] h_σ)
#
# -- only the head's rows at the ids the input actually contains are needed.
#
# No parameter gradient is ever formed: the parameters are frozen for the
# backward and the embedding outputs are its leaves, so the backward computes
# only activation gradients, and the per-input norms take the weight
# gradients' place.
#
# Memory. A chunk's body activations grow with its tokens times the layers'
# widths (`_activation_bytes_per_token`), the head's scratch with a block's
# tokens times the vocabulary; inputs are taken into a chunk (and a head
# block) until half the memory budget each is reached (at least one input).
# The default budget (`default_memory_budget`) is twice the parameters' bytes
# on CPU -- the loop holds one full gradient plus one input's activations --
# and half the free memory on a GPU.
#
# Covered: causal LMs whose body (model.base_model) gives the final hidden
# states and whose logits are exactly lm_head(those) (checked once per model
# on a 3-token input), with every trainable parameter in an nn.Linear, GPT-2's
# Conv1D, a plain nn.Embedding (no max_norm / scale_grad_by_freq / sparse),
# nn.LayerNorm or an RMSNorm computing γ ⊙ â (Llama, Qwen2, Mistral; checked
# on a probe; â is taken from the module's own forward with γ = 1), each
# module called once per forward, the only tie being the token embedding with
# the LM head: the GPT-2 and Llama families, tied or untied. Everything else
# -- seq2seq models (T5: its relative attention bias is shared by all
# sequences of a batch), logit soft-capping or scaling, (1 + γ) norms --
# takes per_input_grad_norms_loop.

NORM_FORMS = ("auto", "ghost", "explicit")
_CHUNK_ELEMENTS = 1 << 25  # bound on a per-layer scratch tensor (n x n Grams or d_in x d_out per input)
_ACTIVATION_FACTOR = 2.0  # saved activations per token / Σ (d_in + d_out) of the hooked layers (an estimate)
_MIN_BUDGET = 256 << 20
# Relative cost of touching one element of the explicit form's d_in x d_out product (written by the
# matmul, read back to square and sum) against one multiply-add, per device: on CPU these products
# fall out of cache, on a GPU they are cheap beside the matmul (see `_ghost_is_faster`).
_ELEMENT_COST = {"cpu": 8.0, "cuda": 1.0}
_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def per_input_grad_norms(model, prompt_ids: list[list[int]], output_ids: list[list[list[int]]],
                         rewards: torch.Tensor, *, memory_budget_bytes: int | None = None,
                         max_sequences: int | None = None, norm_form: str = "auto",
                         temperature: float = 1.0) -> torch.Tensor:
    """||ĝ(x)|| for each input: a float64 tensor [num_inputs]; the production path.

    Same arguments and result as `per_input_grad_norms_loop` (one backward per
    input), computed with ONE forward and ONE backward per chunk of inputs,
    exactly (same arithmetic up to rounding; the tests hold it to 1e-6 relative
    in float64). Chunks are sized so that their activations and the LM head's
    scratch stay within memory_budget_bytes (default: `default_memory_budget`),
    and hold at most max_sequences sequences when that is given. norm_form
    "auto" lets each layer take the exact form its device runs faster;
    "ghost" or "explicit" forces one for every layer (the tests check both).
    Inputs whose K rewards are all equal have ĝ(x) = 0 exactly and are skipped.
    Models outside the covered family (see the comment above: seq2seq such as
    T5 among them) fall back to the per-input loop. The caller puts the model in
    eval mode (no dropout).
    """
    if norm_form not in NORM_FORMS:
        raise ValueError(f"norm_form must be one of {NORM_FORMS}, not {norm_form!r}")
    if batched_grad_norms_unsupported(model) is not None:
        return per_input_grad_norms_loop(model, prompt_ids, output_ids, rewards, temperature)
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    advantages = leave_one_out_advantages(rewards)
    grad_norms = torch.zeros(len(prompt_ids), dtype=torch.float64)
    active = [i for i in range(len(prompt_ids)) if advantages[i].any()]
    budget = memory_budget_bytes or default_memory_budget(model)
    per_token = _activation_bytes_per_token(model)
    for chunk in _chunks([prompt_ids[i] for i in active], [output_ids[i] for i in active],
                         per_token, budget // 2, max_sequences):
        chunk = [active[j] for j in chunk]
        squared = _batched_squared_grad_norms(model, [prompt_ids[i] for i in chunk],
                                              [output_ids[i] for i in chunk], advantages[chunk],
                                              head_budget=budget // 2, norm_form=norm_form,
                                              temperature=temperature)
        grad_norms[chunk] = squared.clamp(min=0).sqrt()  # the identities can round a true 0 to -1e-30
    return grad_norms


def default_memory_budget(model) -> int:
    """Bytes the batched path may use above the model: on a GPU half the free
    memory; on CPU twice the parameters' bytes (what the loop's gradient and
    one input's activations take), at least 256 MiB, at most a quarter of the
    memory available."""
    param = next(model.parameters())
    if param.device.type == "cuda":
        return int(torch.cuda.mem_get_info(param.device)[0] // 2)
    budget = max(2 * sum(p.numel() * p.element_size() for p in model.parameters()), _MIN_BUDGET)
    try:
        with open("/proc/meminfo") as f:
            available_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        budget = min(budget, max(_MIN_BUDGET, available_kib * 1024 // 4))
    except (OSError, StopIteration, ValueError):
        pass
    return int(budget)


def _activation_bytes_per_token(model) -> float:
    """Estimated bytes the body's forward keeps per token for the backward (hooks included)."""
    head = model.get_output_embeddings()
    width = 0
    for module in model.base_model.modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            width += module.in_features + module.out_features
        elif isinstance(module, Conv1D):
            width += sum(module.weight.shape)
        elif isinstance(module, nn.Embedding):
            width += module.embedding_dim
        elif isinstance(module, nn.LayerNorm) or _is_rms_norm(module):
            width += 2 * module.weight.numel()
    element = torch.promote_types(next(model.parameters()).dtype, torch.float32).itemsize
    return _ACTIVATION_FACTOR * width * element


def _chunks(prompt_ids, output_ids, bytes_per_token: float, budget: int, max_sequences: int | None):
    """Consecutive runs of inputs whose padded batch (sequences x (longest prompt +
    longest output)) fits the budget and max_sequences; at least one input each."""
    chunk, longest_prompt, longest_output, sequences = [], 0, 0, 0
    for i, (prompt, outputs) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        p, o, s = max(longest_prompt, len(prompt)), max([longest_output] + [len(y) for y in outputs]), \
            sequences + len(outputs)
        if chunk and (s * (p + o) * bytes_per_token > budget or (max_sequences and s > max_sequences)):
            yield chunk
            chunk, p, o, s = [], len(prompt), max(len(y) for y in outputs), len(outputs)
        chunk.append(i)
        longest_prompt, longest_output, sequences = p, o, s
    if chunk:
        yield chunk


def _is_rms_norm(module: nn.Module) -> bool:
    return (isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")) and \
        isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 1


def _rms_normalized(module, x: torch.Tensor) -> torch.Tensor:
    """â of an RMSNorm module, exactly as it computes it (its own forward with γ = 1:
    Llama's computes in float32 whatever the model's dtype)."""
    with torch.no_grad():
        return torch.func.functional_call(module, {"weight": torch.ones_like(module.weight)}, (x,))


def _rms_norm_is_weight_times_normalized(module) -> bool:
    """Whether this RMSNorm computes γ ⊙ â (not e.g. (1 + γ) ⊙ â): checked on a probe."""
    weight = module.weight
    probe = torch.randn((3, weight.numel()), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    probe = probe.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        got, expected = module(probe), weight * _rms_normalized(module, probe)
    tolerance = 16 * torch.finfo(got.dtype).eps
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=tolerance, atol=tolerance)


def _logits_are_head_of_body(model) -> bool:
    """Whether model(ids).logits == lm_head(base_model(ids).last_hidden_state) exactly (no soft-capping,
    scaling or other step after the head), on a 3-token probe; remembered per model once true."""
    if _HEAD_CHECKED.get(model):
        return True
    head, vocab = model.get_output_embeddings(), model.config.vocab_size
    ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab]], device=head.weight.device)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        same = torch.equal(full, head(hidden))
    if same:
        _HEAD_CHECKED[model] = True
    return same


def batched_grad_norms_unsupported(model) -> str | None:
    """Why `model` is outside the batched path's family, or None when it is covered."""
    if model.config.is_encoder_decoder:
        return "seq2seq model (shared relative attention bias; not covered)"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or model.base_model is model:
        return "no plain Linear LM head on a separate body (model.base_model)"
    in_body = {id(p) for p in model.base_model.parameters()} | {id(p) for p in head.parameters()}
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            if id(param) not in in_body:
                return f"trainable parameter outside the body and the LM head (in a {type(module).__name__})"
            if _is_rms_norm(module):
                if not _rms_norm_is_weight_times_normalized(module):
                    return f"{type(module).__name__} does not compute weight * x / rms(x)"
            elif not isinstance(module, (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm)):
                return f"trainable parameter in a {type(module).__name__}"
            if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq
                                                     or module.sparse):
                return "embedding with max_norm, scale_grad_by_freq or sparse gradients"
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        if len(modules) > 1 and not (_is_tied_head(modules) and head in modules):
            return "a parameter shared other than between an embedding and the LM head"
    if not _logits_are_head_of_body(model):
        return "the logits are not exactly lm_head(last hidden state) (soft-capping, scaling, ...)"
    return None


def _is_tied_head(modules: list[nn.Module]) -> bool:
    """An embedding and a Linear (an LM head) sharing one weight."""
    return (len(modules) == 2 and modules[0].weight is modules[1].weight
            and sum(isinstance(m, nn.Embedding) for m in modules) == 1
            and sum(type(m) is nn.Linear for m in modules) == 1)


def _ghost_is_faster(n: int, d_in: int, d_out: int, device_type: str) -> bool:
    """Ghost (two n x n Grams) against explicit (a d_in x d_out product) for inputs of n tokens:
    multiply-adds, plus each element of the products weighted by the device's element cost."""
    element = _ELEMENT_COST.get(device_type, _ELEMENT_COST["cuda"])
    ghost = n * n * (d_in + d_out) + element * 2 * n * n
    explicit = n * d_in * d_out + element * d_in * d_out
    return ghost < explicit


def _outer_product_sum_squared_norms(a: torch.Tensor, g: torch.Tensor, norm_form: str) -> torch.Tensor:
    """||Σ_τ a_τ g_τᵀ||²_F for each input: a [G, n, d_in], g [G, n, d_out] -> [G] float64.

    norm_form "auto" takes the form the device runs faster (comment above the batched path)."""
    num_inputs, n, d_in = a.shape
    d_out = g.shape[-1]
    ghost = _ghost_is_faster(n, d_in, d_out, a.device.type) if norm_form == "auto" else norm_form == "ghost"
    step = max(1, _CHUNK_ELEMENTS // (n * n if ghost else d_in * d_out))
    squared = []
    for s in range(0, num_inputs, step):
        a_chunk, g_chunk = a[s : s + step], g[s : s + step]
        if ghost:
            # ghost norm: ||Σ_τ a_τ g_τᵀ||²_F = Σ_{τ,σ} (a_τ·a_σ)(g_τ·g_σ)
            squared.append(((a_chunk @ a_chunk.mT) * (g_chunk @ g_chunk.mT)).sum(dim=(1, 2)))
        else:
            squared.append((a_chunk.mT @ g_chunk).square().sum(dim=(1, 2)))
    return torch.cat(squared).double()


class TokenLayout:
    """A chunk's tokens in the per-input layout of the comment above: input i's
    n_i tokens (its prompt once, then each of its sequences' output tokens) at
    slots 0..n_i-1 of row i of a [G, n_max] table. `pick` takes one copy of each
    token's activation (padding slots 0), `gather_sum` sums the gradients of
    a token's copies (the prompt's copies). `sizes[i]` consecutive sequences
    belong to input i (K each here; the update's skipped completions make them
    differ there, workloads.text.update_grads)."""

    def __init__(self, attention_mask: torch.Tensor, prompt_width: int, sizes: list[int]):
        num_sequences, width = attention_mask.shape
        device = attention_mask.device
        num_inputs = len(sizes)
        real = attention_mask.bool()
        input_of = torch.repeat_interleave(torch.arange(num_inputs, device=device),
                                           torch.tensor(sizes, device=device))
        first_sequence = torch.tensor([0] + sizes, device=device).cumsum(dim=0)[:-1]
        prompt_length = real[:, :prompt_width].sum(dim=1)
        output_length = real[:, prompt_width:].sum(dim=1)
        before = output_length.cumsum(dim=0) - output_length  # output tokens of all earlier sequences
        output_start = before - before[first_sequence][input_of]  # ... of earlier sequences of the same input
        outputs_of_input = torch.zeros(num_inputs, dtype=output_length.dtype, device=device).index_add_(
            0, input_of, output_length)
        self.length = prompt_length[first_sequence] + outputs_of_input
        self.num_inputs, self.width = num_inputs, max(1, int(self.length.max()))
        column = torch.arange(width, device=device)
        slot = torch.where(column < prompt_width, column - (prompt_width - prompt_length[:, None]),
                           prompt_length[:, None] + output_start[:, None] + column - prompt_width)
        sequence = torch.arange(num_sequences, device=device)
        destination = (input_of[:, None] * self.width + slot).reshape(-1)
        first_copy = (column >= prompt_width)[None, :] | (sequence == first_sequence[input_of])[:, None]
        self.real_index = real.reshape(-1).nonzero().squeeze(1)
        self.real_destination = destination[self.real_index]
        self.copy_index = (real & first_copy).reshape(-1).nonzero().squeeze(1)
        self.copy_destination = destination[self.copy_index]
        self.filled = torch.arange(self.width, device=device)[None, :] < self.length[:, None]  # [G, n_max]

    def pick(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """[N, T, d] -> [G, n_max, d]: one copy of each token."""
        d = x.shape[-1]
        out = torch.zeros((self.num_inputs * self.width, d), dtype=dtype, device=x.device)
        out.index_copy_(0, self.copy_destination, x.reshape(-1, d)[self.copy_index].to(dtype))
        return out.view(self.num_inputs, self.width, d)

    def gather_sum(self, g: torch.Tensor, dtype) -> torch.Tensor:
        """[N, T, d] -> [G, n_max, d]: the sum over each token's copies."""
        d = g.shape[-1]
        out = torch.zeros((self.num_inputs * self.width, d), dtype=dtype, device=g.device)
        out.index_add_(0, self.real_destination, g.reshape(-1, d)[self.real_index].to(dtype))
        return out.view(self.num_inputs, self.width, d)

    def pick_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, T] ids -> [G, n_max] (-1 at padding slots)."""
        out = torch.full((self.num_inputs * self.width,), -1, dtype=torch.long, device=ids.device)
        out.index_copy_(0, self.copy_destination, ids.reshape(-1)[self.copy_index])
        return out.view(self.num_inputs, self.width)


class IdsByInput:
    """The distinct ids each input feeds an embedding, as flat rows: row j is
    (input_of[j], id_of[j]), at column slot[j] of the padded table [G, width];
    inverse[τ] is the row of counted token τ (padding slots and padding_idx are
    never counted: nn.Embedding gives that row no gradient)."""

    def __init__(self, ids: torch.Tensor, filled: torch.Tensor, vocab: int, padding_idx: int | None):
        num_inputs = ids.shape[0]
        keys = torch.arange(num_inputs, device=ids.device).unsqueeze(1) * vocab + ids
        counted = filled if padding_idx is None else filled & (ids != padding_idx)
        unique_keys, inverse = torch.unique(keys[counted], return_inverse=True)
        self.input_of, self.id_of = unique_keys // vocab, unique_keys % vocab
        self.counted, self.inverse = counted, inverse
        # padded table [G, max distinct] of each input's ids, for gathering LM-head rows
        first = torch.searchsorted(unique_keys, torch.arange(num_inputs, device=ids.device) * vocab)
        self.first = first.tolist()
        self.count = torch.bincount(self.input_of, minlength=num_inputs).tolist()
        self.slot = torch.arange(len(unique_keys), device=ids.device) - first[self.input_of]
        width = int(self.slot.max()) + 1 if len(unique_keys) else 1
        self.table = torch.zeros((num_inputs, width), dtype=torch.long, device=ids.device)
        self.table[self.input_of, self.slot] = self.id_of

    def row_sums(self, u: torch.Tensor) -> torch.Tensor:
        """Σ_{τ of input i: id_τ = v} u_τ for every row (i, v): [rows, d]; u [G, n, d]."""
        d = u.shape[-1]
        picked = u.reshape(-1, d)[self.counted.reshape(-1)]
        return torch.zeros((len(self.id_of), d), dtype=u.dtype, device=u.device).index_add_(0, self.inverse, picked)


def _head_pass(head, hidden, targets, weights, counts, *, budget: int, norm_dtype, norm_form: str,
               tied_rows: IdsByInput | None, trainable: set[int], temperature: float = 1.0):
    """The LM head over the selected hidden states [M, d] (input-major, counts[i] tokens of input i),
    the logit gradients in closed form: (gradient at hidden [M, d], head's ||∇||² per input [G],
    Σ_σ z_σ[v] h_σ at the tied embedding's rows or None)."""
    weight, bias = head.weight, head.bias
    num_inputs, d, vocab = len(counts), hidden.shape[1], weight.shape[0]
    device = hidden.device
    logit_dtype = torch.promote_types(hidden.dtype, torch.float32)  # as token_log_probs: softmax in >= fp32
    block = max(1, budget // (vocab * 3 * max(norm_dtype.itemsize, logit_dtype.itemsize)))
    want_weight = id(weight) in trainable
    want_bias = bias is not None and id(bias) in trainable
    grad_hidden = torch.empty_like(hidden)
    squared = torch.zeros(num_inputs, dtype=torch.float64, device=device)
    head_rows = None
    if tied_rows is not None and want_weight:
        head_rows = torch.zeros((len(tied_rows.id_of), d), dtype=norm_dtype, device=device)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)

    def logit_grads(t0: int, t1: int) -> torch.Tensor:
        """z for tokens t0..t1-1 (norm dtype); writes their gradient at hidden."""
        logits = nn.functional.linear(hidden[t0:t1], weight, bias)
        # d log softmax(l / T)[y] / d l = (onehot(y) - softmax(l / T)) / T
        z = torch.softmax(logits.to(logit_dtype) / temperature, dim=-1)
        del logits
        w = weights[t0:t1].to(device=device, dtype=logit_dtype) / temperature
        z.mul_(-w[:, None])
        z[torch.arange(t1 - t0, device=device), targets[t0:t1]] += w
        grad_hidden[t0:t1] = z.to(hidden.dtype) @ weight
        return z.to(norm_dtype)

    i = 0
    while i < num_inputs:
        j, total = i + 1, counts[i]
        while j < num_inputs and total + counts[j] <= block:
            total += counts[j]
            j += 1
        if counts[i] == 0:
            i = j
            continue
        if counts[i] > block:  # one long input: explicit form, accumulated block by block
            accumulated = torch.zeros((d, vocab), dtype=norm_dtype, device=device) if want_weight else None
            bias_sum = torch.zeros(vocab, dtype=norm_dtype, device=device)
            for t0 in range(starts[i], starts[i + 1], block):
                t1 = min(t0 + block, starts[i + 1])
                z, h = logit_grads(t0, t1), hidden[t0:t1].to(norm_dtype)
                if want_weight:
                    accumulated.addmm_(h.mT, z)
                    if head_rows is not None and tied_rows.count[i]:
                        rows = slice(tied_rows.first[i], tied_rows.first[i] + tied_rows.count[i])
                        head_rows[rows] += z[:, tied_rows.table[i, : tied_rows.count[i]]].mT @ h
                bias_sum += z.sum(dim=0)
            if want_weight:
                squared[i] += accumulated.square().sum().double()
            if want_bias:
                squared[i] += bias_sum.square().sum().double()
            i = j
            continue
        z_block = logit_grads(starts[i], starts[j])
        for k in range(i, j):
            z = z_block[starts[k] - starts[i] : starts[k + 1] - starts[i]]
            h = hidden[starts[k] : starts[k + 1]].to(norm_dtype)
            if want_weight:
                squared[k] += _outer_product_sum_squared_norms(h[None], z[None], norm_form)[0].to(device)
                if head_rows is not None and tied_rows.count[k]:
                    rows = slice(tied_rows.first[k], tied_rows.first[k] + tied_rows.count[k])
                    head_rows[rows] = z[:, tied_rows.table[k, : tied_rows.count[k]]].mT @ h
            if want_bias:
                squared[k] += z.sum(dim=0).square().sum().double()
        del z_block
        i = j
    return grad_hidden, squared, head_rows


class LayerHooks:
    """What both hooked passes share (this file's norms, update_grads.py's per-prompt gradients):
    the forward hook that registers, on each covered module's output, a hook receiving its output
    gradient with its input activation; the embeddings' ids and outputs (the backward's leaves);
    and a norm layer's â. Subclasses define on_linear_grad and on_norm_grad."""

    def __init__(self, tokens, trainable: set, norm_dtype: torch.dtype):
        self.tokens, self.trainable, self.norm_dtype = tokens, trainable, norm_dtype
        self.ids_of = {}  # embedding module -> IdsByInput of its forward
        self.embedding_outputs = {}  # embedding module -> its output, a leaf of the backward
        self.called, self.probing = set(), set()

    def normalized(self, module, x: torch.Tensor) -> torch.Tensor:
        """â of a LayerNorm / RMSNorm at one copy of each token ([G, n_max, d], norm dtype)."""
        x = self.tokens.pick(x, x.dtype)
        if isinstance(module, nn.LayerNorm):
            normalized = nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
        else:
            self.probing.add(module)  # its forward with γ = 1, which runs this module's forward hook again
            try:
                normalized = _rms_normalized(module, x)
            finally:
                self.probing.discard(module)
        return normalized.to(self.norm_dtype)

    def forward_hook(self, module, args, output):
        if module in self.probing:
            return output
        if module in self.called:
            raise RuntimeError(f"{type(module).__name__} called twice in one forward: the hooked per-input "
                               "passes assume one call per module")
        self.called.add(module)
        if isinstance(module, nn.Embedding):
            self.ids_of[module] = IdsByInput(self.tokens.pick_ids(args[0]), self.tokens.filled,
                                              module.num_embeddings, module.padding_idx)
            output.requires_grad_(True)  # frozen weight: the output is a leaf, the backward stops here
            self.embedding_outputs[module] = output
            return output
        if not output.requires_grad:
            return output
        x = args[0]
        on_grad = self.on_linear_grad if isinstance(module, (nn.Linear, Conv1D)) else self.on_norm_grad
        output.register_hook(lambda g, module=module, x=x: on_grad(module, x, g))
        return output

    def on_linear_grad(self, module, x, g):
        raise NotImplementedError

    def on_norm_grad(self, module, x, g):
        raise NotImplementedError


@contextlib.contextmanager
def hooked_and_frozen(model, layers: LayerHooks):
    """`layers`' forward hook on every covered module of the body with a trainable parameter, and
    every trainable parameter frozen, for one forward and backward: the backward then forms
    activation gradients only, and the hooks take the weight gradients' place."""
    head, trainable = model.get_output_embeddings(), [p for p in model.parameters() if p.requires_grad]
    hooked = [m for m in model.base_model.modules()
              if (isinstance(m, (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm)) or _is_rms_norm(m))
              and m is not head and any(p.requires_grad for p in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(layers.forward_hook) for m in hooked]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)


def tied_input_embedding(model) -> nn.Embedding | None:
    """The token embedding that shares its weight with the LM head, if any."""
    head = model.get_output_embeddings()
    return next((m for m in model.base_model.modules() if isinstance(m, nn.Embedding) and m.weight is head.weight),
                None)


def hidden_states_at(model, input_ids, attention_mask, position_ids, positions) -> torch.Tensor:
    """The body's last hidden states at flat `positions` (row * width + column): [M, d]."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[positions]


class _LayerGradients(LayerHooks):
    """The per-layer hooks of the batched pass: each sees a layer's input activations and
    output gradients and adds that layer's ||∇θ_i||² for every input i to `squared`."""

    def __init__(self, tokens, trainable: set, norm_dtype: torch.dtype, norm_form: str, num_inputs: int, device):
        super().__init__(tokens, trainable, norm_dtype)
        self.norm_form = norm_form
        self.squared = torch.zeros(num_inputs, dtype=torch.float64, device=device)

    def add(self, value: torch.Tensor) -> None:
        self.squared = self.squared + value.to(device=self.squared.device, dtype=torch.float64)

    def on_linear_grad(self, module, x, g):
        # ∇W_i = Σ_τ a_τ g_τᵀ (Conv1D's [d_in, d_out] weight) or its transpose (Linear's): same norm
        g = self.tokens.gather_sum(g, self.norm_dtype)
        if module.bias is not None and id(module.bias) in self.trainable:
            self.add(g.sum(dim=1).square().sum(dim=1))  # ∇b_i = Σ_τ g_τ
        if id(module.weight) in self.trainable:
            self.add(_outer_product_sum_squared_norms(self.tokens.pick(x, self.norm_dtype), g, self.norm_form))

    def on_norm_grad(self, module, x, g):
        normalized = self.normalized(module, x)
        g = self.tokens.gather_sum(g, self.norm_dtype)
        if module.weight is not None and id(module.weight) in self.trainable:
            self.add((g * normalized).sum(dim=1).square().sum(dim=1))  # ∇γ_i = Σ_τ g_τ ⊙ â_τ
        if getattr(module, "bias", None) is not None and id(module.bias) in self.trainable:
            self.add(g.sum(dim=1).square().sum(dim=1))  # ∇β_i = Σ_τ g_τ

    def add_embeddings(self, leaf_grads, input_embedding, head_rows, num_inputs: int) -> None:
        """The embeddings' share, from the gradients at their outputs (and the tied head's cross term)."""
        for embedding, u in zip(list(self.embedding_outputs), leaf_grads, strict=True):
            if u is None:
                continue
            rows = self.ids_of[embedding]
            sums = rows.row_sums(self.tokens.gather_sum(u, self.norm_dtype))  # row v of ∇E_i, v among input i's ids
            per_row = sums.square().sum(dim=1)  # ||∇E_emb,i||² = Σ_v ||Σ_{τ: id_τ=v} u_τ||²
            if embedding is input_embedding and head_rows is not None:
                per_row = per_row + 2 * (sums * head_rows).sum(dim=1)  # + 2 <∇E_emb,i, ∇E_head,i>
            self.add(torch.zeros(num_inputs, dtype=per_row.dtype, device=per_row.device)
                     .index_add_(0, rows.input_of, per_row))


def _batched_squared_grad_norms(model, prompt_ids, output_ids, advantages, *, head_budget: int,
                                norm_form: str = "auto", temperature: float = 1.0) -> torch.Tensor:
    """||ĝ(x_i)||² for the given inputs (all with some nonzero advantage), one forward + one backward."""
    num_inputs, num_samples = advantages.shape
    flat_prompts = [p for p, outputs in zip(prompt_ids, output_ids, strict=True) for _ in outputs]
    flat_outputs = [o for outputs in output_ids for o in outputs]
    if len(flat_outputs) != num_inputs * num_samples:
        raise ValueError("every input needs as many outputs as it has rewards")
    device = next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    norm_dtype = torch.promote_types(model_dtype, torch.float32)  # bf16 activations: norms in fp32
    head = model.get_output_embeddings()

    outputs, output_mask = pad_rows(flat_outputs, left=False, device=device)
    input_ids, attention_mask, position_ids, prompt_width = causal_inputs(flat_prompts, outputs, output_mask)
    tokens = TokenLayout(attention_mask, prompt_width, [num_samples] * num_inputs)
    # the head's tokens: real output tokens, predicted one column to their left, input-major
    sequence, t = output_mask.bool().nonzero(as_tuple=True)
    predicted_at = sequence * input_ids.shape[1] + prompt_width - 1 + t
    targets = outputs[sequence, t]
    token_weights = (advantages / num_samples).reshape(-1).to(device)[sequence]
    counts = output_mask.sum(dim=1).view(num_inputs, num_samples).sum(dim=1).tolist()

    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    layers = _LayerGradients(tokens, trainable, norm_dtype, norm_form, num_inputs, device)
    input_embedding = tied_input_embedding(model)
    with hooked_and_frozen(model, layers), torch.enable_grad():
        hidden = hidden_states_at(model, input_ids, attention_mask, position_ids, predicted_at)
        with torch.no_grad():
            grad_hidden, head_squared, head_rows = _head_pass(
                head, hidden.detach(), targets, token_weights, counts, budget=head_budget,
                norm_dtype=norm_dtype, norm_form=norm_form,
                tied_rows=layers.ids_of.get(input_embedding), trainable=trainable,
                temperature=temperature)
        layers.add(head_squared)
        leaf_grads = torch.autograd.grad(hidden, list(layers.embedding_outputs.values()),
                                         grad_outputs=grad_hidden, allow_unused=True)
    layers.add_embeddings(leaf_grads, input_embedding, head_rows, num_inputs)
    return layers.squared.cpu()
