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

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .models import sequence_log_probs, token_log_probs


def reward_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std with 1/K, std with 1/(K-1)) over the last dimension (the K samples)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    mean = rewards.mean(dim=-1)
    return mean, rewards.std(dim=-1, correction=0), rewards.std(dim=-1, correction=1)


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """r_k - b_k with b_k the mean of the other K-1 rewards (= K/(K-1) * (r_k - r̄))."""
    num_samples = rewards.shape[-1]
    baseline = (rewards.sum(dim=-1, keepdim=True) - rewards) / (num_samples - 1)
    return rewards - baseline


def per_input_grad_norms_loop(model, prompt_ids: list[list[int]], output_ids: list[list[list[int]]],
                              rewards: torch.Tensor) -> torch.Tensor:
    """||ĝ(x)|| for each input, one backward per input: the slow, obviously-correct
    reference of `per_input_grad_norms` (same arguments, same result), and its
    path for models the batched path does not cover (seq2seq, see there).

    prompt_ids[i]     token ids of input i's prompt (unpadded)
    output_ids[i][k]  token ids of its k-th sample, EOS included
    rewards[i, k]     that sample's reward

    One backward per input, its K samples batched in one forward: the gradient
    of the surrogate (1/K) Σ_k A_k log π(y_k|x) with the advantages A_k held
    constant is exactly ĝ(x). The caller puts the model in eval mode (no dropout).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    advantages = leave_one_out_advantages(torch.as_tensor(rewards, dtype=torch.float64))
    grad_norms = torch.zeros(len(prompt_ids), dtype=torch.float64)
    for i, (prompt, outputs) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        if not advantages[i].any():  # all K rewards equal: ĝ(x) = 0 exactly, skip the backward
            continue
        log_probs = sequence_log_probs(model, [prompt] * len(outputs), outputs)
        surrogate = (advantages[i].to(device=log_probs.device, dtype=log_probs.dtype) * log_probs).mean()
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        squared = sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads if g is not None)
        grad_norms[i] = squared.sqrt().item()
    return grad_norms


# --------------------------------------------------------------------------
# The batched path: one forward and one backward for many inputs
# --------------------------------------------------------------------------
#
# All G inputs' N = G*K sequences go through the model in one padded batch and
# ONE backward of the summed surrogate Σ_i (1/K) Σ_k A_ik log π(y_ik|x_i). The
# sequences of a batch never interact (eval mode, attention within a sequence),
# so the gradient that reaches a layer's output at a token of input i's samples
# is exactly the gradient of input i's own surrogate there. Every parameter's
# gradient for input i is then a sum over input i's tokens τ (its K sequences
# times the padded width, n = K*T of them) of per-token terms; padded tokens
# carry a zero output gradient (masked out of the loss, and attention gives
# them probability exactly 0), so they add exactly nothing:
#
#   Linear / Conv1D   y = a W (+ b)      ∇W_i = Σ_τ a_τ g_τᵀ     ∇b_i = Σ_τ g_τ
#   LayerNorm         y = â ⊙ γ + β      ∇γ_i = Σ_τ g_τ ⊙ â_τ    ∇β_i = Σ_τ g_τ
#                     (â = the input normalised: (a - mean) / sqrt(var + eps))
#   Embedding         y = E[id]          ∇E_i = Σ_τ e_{id_τ} u_τᵀ, i.e. row v of ∇E_i is
#                                        Σ_{τ: id_τ = v} u_τ (u: gradient at the embedding output)
#
# with a_τ the layer input and g_τ the gradient at its output. ||ĝ(x_i)||² is the
# sum over parameters of ||∇θ_i||². For ∇W_i = Σ_τ a_τ g_τᵀ there are two exact
# ways to its squared Frobenius norm, and each layer takes the cheaper one:
#
#   explicit   materialise A_iᵀ G_i (d_in x d_out) per input      ~ n d_in d_out
#   ghost      ||Σ_τ a_τ g_τᵀ||²_F = Σ_{τ,σ} (a_τ·a_σ)(g_τ·g_σ)   ~ n² (d_in + d_out)
#              (the sum of the elementwise product of the two n x n Gram matrices)
#
# A tied weight (GPT-2: the LM head's weight IS the token embedding) receives
# both contributions, summed BEFORE the norm:
#
#   ||∇E_emb + ∇E_head||² = ||∇E_emb||² + ||∇E_head||² + 2 <∇E_emb, ∇E_head>
#   <∇E_emb, ∇E_head> = Σ_{v among input i's ids} (Σ_{τ: id_τ = v} u_τ) · (Σ_σ z_σ[v] h_σ)
#
# (z: gradient of the logits, h: the LM head's input) -- only the head's rows at
# the ids the input actually contains are needed.
#
# No parameter gradient is ever formed: the parameters are frozen for the
# backward and the embedding outputs are its leaves, so the backward computes
# only activation gradients (half an ordinary backward), and the per-input
# norms above take the other half's place.
#
# Covered: causal LMs whose trainable parameters all sit in nn.Linear, GPT-2's
# Conv1D, nn.Embedding (plain: no max_norm / scale_grad_by_freq / sparse) and
# nn.LayerNorm, each module called once per forward, the only tie being an
# embedding with a Linear of the same shape (GPT-2 family). Everything else --
# seq2seq models (T5: its relative attention bias is shared by all sequences of
# a batch, and its RMS norm is another module), rotary / RMS-norm models -- takes
# per_input_grad_norms_loop.

# Sequences per forward/backward: bounds activation memory. On CPU, chunks of 64
# sequences ran faster than 256 (cache-sized activations; benchmarks/bench_gradnorm.py
# --max-sequences); a GPU wants bigger batches to fill its cores.
DEFAULT_MAX_SEQUENCES = {"cpu": 64, "cuda": 256}
_CHUNK_ELEMENTS = 1 << 25  # bound on a per-layer scratch tensor (n x n Grams or d_in x d_out per input)
_FORCE_NORM_FORM: str | None = None  # "ghost" or "explicit" for every layer (the tests check both); None: cheaper


def per_input_grad_norms(model, prompt_ids: list[list[int]], output_ids: list[list[list[int]]],
                         rewards: torch.Tensor, *, max_sequences: int | None = None) -> torch.Tensor:
    """||ĝ(x)|| for each input: a float64 tensor [num_inputs]; the production path.

    Same arguments and result as `per_input_grad_norms_loop` (one backward per
    input), computed for up to max_sequences sequences (max_sequences // K
    inputs) at a time with ONE forward and ONE backward, exactly (same
    arithmetic up to rounding; the tests hold it to 1e-6 relative in float64).
    Inputs whose K rewards are all equal have ĝ(x) = 0 exactly and are skipped.
    Models outside the covered family (see the comment above: seq2seq such as
    T5 among them) fall back to the per-input loop. The caller puts the model in
    eval mode (no dropout).
    """
    if batched_grad_norms_unsupported(model) is not None:
        return per_input_grad_norms_loop(model, prompt_ids, output_ids, rewards)
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    advantages = leave_one_out_advantages(rewards)
    grad_norms = torch.zeros(len(prompt_ids), dtype=torch.float64)
    active = [i for i in range(len(prompt_ids)) if advantages[i].any()]
    num_samples = rewards.shape[-1]
    if max_sequences is None:
        max_sequences = DEFAULT_MAX_SEQUENCES.get(next(model.parameters()).device.type, DEFAULT_MAX_SEQUENCES["cuda"])
    inputs_per_chunk = max(1, max_sequences // num_samples)
    for start in range(0, len(active), inputs_per_chunk):
        chunk = active[start : start + inputs_per_chunk]
        squared = _batched_squared_grad_norms(model, [prompt_ids[i] for i in chunk],
                                              [output_ids[i] for i in chunk], advantages[chunk])
        grad_norms[chunk] = squared.clamp(min=0).sqrt()  # the identities can round a true 0 to -1e-30
    return grad_norms


def batched_grad_norms_unsupported(model) -> str | None:
    """Why `model` is outside the batched path's family, or None when it is covered."""
    if model.config.is_encoder_decoder:
        return "seq2seq model (shared relative attention bias; not covered)"
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            if not isinstance(module, (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm)):
                return f"trainable parameter in a {type(module).__name__}"
            if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq
                                                     or module.sparse):
                return "embedding with max_norm, scale_grad_by_freq or sparse gradients"
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        if len(modules) > 1 and not _is_tied_head(modules):
            return "a parameter shared other than between an embedding and a same-shape Linear"
    return None


def _is_tied_head(modules: list[nn.Module]) -> bool:
    """An embedding and a Linear (an LM head) sharing one weight."""
    return (len(modules) == 2 and modules[0].weight is modules[1].weight
            and sum(isinstance(m, nn.Embedding) for m in modules) == 1
            and sum(type(m) is nn.Linear for m in modules) == 1)


def _per_input(x: torch.Tensor, num_inputs: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, ..., d] (N = num_inputs * K sequences, input-major) -> [num_inputs, n tokens, d]."""
    return x.reshape(num_inputs, -1, x.shape[-1]).to(dtype)


def _outer_product_sum_squared_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||Σ_τ a_τ g_τᵀ||²_F for each input: a [G, n, d_in], g [G, n, d_out] -> [G] float64.

    Picks the cheaper of the two exact forms (comment above the batched path)."""
    num_inputs, n, d_in = a.shape
    d_out = g.shape[-1]
    ghost = n * (d_in + d_out) < d_in * d_out if _FORCE_NORM_FORM is None else _FORCE_NORM_FORM == "ghost"
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


class _IdsByInput:
    """The distinct ids each input feeds an embedding, as flat rows: row j is
    (input_of[j], id_of[j]), at column slot[j] of the padded table [G, width];
    inverse[τ] is the row of counted token τ (padding_idx is never counted:
    nn.Embedding gives that row no gradient)."""

    def __init__(self, ids: torch.Tensor, num_inputs: int, vocab: int, padding_idx: int | None):
        ids = ids.reshape(num_inputs, -1)
        keys = torch.arange(num_inputs, device=ids.device).unsqueeze(1) * vocab + ids
        counted = torch.ones_like(ids, dtype=torch.bool) if padding_idx is None else ids != padding_idx
        unique_keys, inverse = torch.unique(keys[counted], return_inverse=True)
        self.input_of, self.id_of = unique_keys // vocab, unique_keys % vocab
        self.counted, self.inverse = counted, inverse
        # padded table [G, max distinct] of each input's ids, for gathering LM-head rows
        first = torch.searchsorted(unique_keys, torch.arange(num_inputs, device=ids.device) * vocab)
        self.slot = torch.arange(len(unique_keys), device=ids.device) - first[self.input_of]
        width = int(self.slot.max()) + 1 if len(unique_keys) else 1
        self.table = torch.zeros((num_inputs, width), dtype=torch.long, device=ids.device)
        self.table[self.input_of, self.slot] = self.id_of

    def row_sums(self, u: torch.Tensor) -> torch.Tensor:
        """Σ_{τ of input i: id_τ = v} u_τ for every row (i, v): [rows, d]; u [G, n, d]."""
        d = u.shape[-1]
        picked = u.reshape(-1, d)[self.counted.reshape(-1)]
        return torch.zeros((len(self.id_of), d), dtype=u.dtype, device=u.device).index_add_(0, self.inverse, picked)


def _batched_squared_grad_norms(model, prompt_ids, output_ids, advantages) -> torch.Tensor:
    """||ĝ(x_i)||² for the given inputs (all with some nonzero advantage), one forward + one backward."""
    num_inputs, num_samples = advantages.shape
    flat_prompts = [p for p, outputs in zip(prompt_ids, output_ids, strict=True) for _ in outputs]
    flat_outputs = [o for outputs in output_ids for o in outputs]
    if len(flat_outputs) != num_inputs * num_samples:
        raise ValueError("every input needs as many outputs as it has rewards")
    device = next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    norm_dtype = torch.promote_types(model_dtype, torch.float32)  # bf16 activations: norms in fp32

    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    squared = torch.zeros(num_inputs, dtype=torch.float64, device=device)
    tied_head_of = {}  # embedding module -> the Linear sharing its weight
    for module in model.modules():
        if type(module) is nn.Linear and id(module.weight) in trainable:
            for other in model.modules():
                if isinstance(other, nn.Embedding) and other.weight is module.weight:
                    tied_head_of[other] = module
    head_rows = {}  # LM head module -> Σ_σ z_σ[v] h_σ at its input's distinct ids, [rows, d]
    ids_of = {}  # embedding module -> _IdsByInput of its forward
    embedding_outputs = {}  # embedding module -> its output, a leaf of the backward
    called = set()

    def add(value: torch.Tensor) -> None:
        nonlocal squared
        squared = squared + value.to(device=device, dtype=torch.float64)

    def on_linear_grad(module, a, g):
        # ∇W_i = Σ_τ a_τ g_τᵀ (Conv1D's [d_in, d_out] weight) or its transpose (Linear's): same norm
        a, g = _per_input(a, num_inputs, norm_dtype), _per_input(g, num_inputs, norm_dtype)
        if module.bias is not None and id(module.bias) in trainable:
            add(g.sum(dim=1).square().sum(dim=1))  # ∇b_i = Σ_τ g_τ
        if id(module.weight) not in trainable:
            return
        embedding = next((e for e, head in tied_head_of.items() if head is module), None)
        if embedding is not None:  # tied: keep the head's rows at the input's ids for the cross term
            rows = ids_of[embedding]
            gathered = g.gather(2, rows.table.unsqueeze(1).expand(-1, g.shape[1], -1))  # z_σ[v]: [G, n, width]
            head_rows[module] = (gathered.mT @ a)[rows.input_of, rows.slot]
        add(_outer_product_sum_squared_norms(a, g))

    def on_layer_norm_grad(module, x, g):
        normalized = torch.nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
        g, normalized = _per_input(g, num_inputs, norm_dtype), _per_input(normalized, num_inputs, norm_dtype)
        if module.weight is not None and id(module.weight) in trainable:
            add((g * normalized).sum(dim=1).square().sum(dim=1))  # ∇γ_i = Σ_τ g_τ ⊙ â_τ
        if module.bias is not None and id(module.bias) in trainable:
            add(g.sum(dim=1).square().sum(dim=1))  # ∇β_i = Σ_τ g_τ

    def forward_hook(module, args, output):
        if module in called:
            raise RuntimeError(f"{type(module).__name__} called twice in one forward: the batched grad-norm "
                               "path assumes one call per module")
        called.add(module)
        if isinstance(module, nn.Embedding):
            ids_of[module] = _IdsByInput(args[0], num_inputs, module.num_embeddings, module.padding_idx)
            output.requires_grad_(True)  # frozen weight: the output is a leaf, the backward stops here
            embedding_outputs[module] = output
            return output
        if not output.requires_grad:
            return output
        x = args[0]
        on_grad = on_layer_norm_grad if isinstance(module, nn.LayerNorm) else on_linear_grad
        output.register_hook(lambda g, module=module, x=x: on_grad(module, x, g))
        return output

    hooked = [m for m in model.modules()
              if isinstance(m, (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm))
              and any(id(p) in trainable for p in m.parameters(recurse=False))]
    frozen = [p for p in model.parameters() if p.requires_grad]
    handles = [m.register_forward_hook(forward_hook) for m in hooked]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            log_probs, _ = token_log_probs(model, flat_prompts, flat_outputs)
            weights = (advantages / num_samples).reshape(-1).to(device=device, dtype=log_probs.dtype)
            surrogate = (log_probs.sum(dim=1) * weights).sum()  # Σ_i (1/K) Σ_k A_ik log π(y_ik|x_i)
            leaves = list(embedding_outputs)
            leaf_grads = torch.autograd.grad(surrogate, [embedding_outputs[e] for e in leaves], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)

    for embedding, u in zip(leaves, leaf_grads, strict=True):
        if u is None:
            continue
        rows = ids_of[embedding]
        sums = rows.row_sums(_per_input(u, num_inputs, norm_dtype))  # row v of ∇E_i, for v among input i's ids
        per_row = sums.square().sum(dim=1)  # ||∇E_emb,i||² = Σ_v ||Σ_{τ: id_τ=v} u_τ||²
        head = tied_head_of.get(embedding)
        if head is not None and head in head_rows:
            per_row = per_row + 2 * (sums * head_rows[head]).sum(dim=1)  # + 2 <∇E_emb,i, ∇E_head,i>
        add(torch.zeros(num_inputs, dtype=per_row.dtype, device=device).index_add_(0, rows.input_of, per_row))
    return squared.cpu()

