"""The update's own backward, with each prompt's share of it measured on the way.

An optimiser step of GRPO / RLOO applies ∇θ L, where the minibatch loss L is a function of
the per-token log-probs log π(o_t | ...) alone (grpo.py `grpo_loss`, `rloo_loss`: ratios,
clipping and KL are all functions of them). Group the minibatch's sequences by prompt:
sequences never interact (attention stays within a sequence, the policy is in eval mode), so

    ∇θ L = Σ_i W_i,   W_i = the gradient through prompt i's sequences only,

and ||W_i|| is prompt i's contribution to the step the optimiser takes (before the global
clip_grad_norm, which scales every W_i alike). `update_backward` computes ∇θ L into every
parameter's .grad AS that sum of W_i, and returns ||W_i||² for every prompt.

How: gradnorm.py's batched path (read its comment for the per-layer formulas, the prompt
counted once per input, the LM head in closed form), with two changes.
  * The per-token weights come from the loss: the head's log-probs become a leaf tensor, the
    loss is computed on it, and autograd gives w_τ = ∂L/∂log π_τ on that small [B, T] tensor.
    The gradient at the logits is then z_τ = w_τ (onehot(y_τ) - softmax(l_τ / T)) / T.
  * Each layer's per-prompt gradient is formed explicitly (A_iᵀ G_i for a Linear, Σ_τ z_τ h_τᵀ
    over prompt i's tokens for the head, ...), and their sum IS the parameter's gradient:
    autograd never forms weight gradients (the parameters are frozen for the backward), so the
    per-prompt norms cost the squares of those products, not a second backward. With the
    prompt counted once per prompt (not once per completion) and the head run on the real
    output tokens only (an ordinary forward runs it on every prompt and padding position too),
    the products take fewer multiply-adds than autograd's weight gradients.

The paper's leave-one-out norm ||ĝ(x_i)|| (gradnorm.py) comes from the same backward when
prompt i's per-token weights are constant within each completion, w_kt = c_k (ratio exactly 1:
the first optimiser step on a rollout; no KL term in the loss), and proportional to the
leave-one-out weights a_k = A^loo_k / K at the same temperature: then W_i = Σ_k c_k ∇log π(y_k)
and ĝ(x_i) = Σ_k a_k ∇log π(y_k) = λ W_i, so ||ĝ(x_i)|| = |λ| ||W_i|| (`leave_one_out_from_update`).
Otherwise -- clipped or moved ratios, a KL term, loss_type grpo's 1/|o_k| with completions of
different lengths, masked truncated completions, normalised RLOO advantages -- grpo.py takes
the separate pass (gradnorm.per_input_grad_norms) before the first optimiser step.

Covered: the models gradnorm's batched path covers (`batched_grad_norms_unsupported` says
which); others take the ordinary autograd update and the separate pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .gradnorm import (IdsByInput, LayerHooks, TokenLayout, hidden_states_at, hooked_and_frozen,
                       leave_one_out_advantages, tied_input_embedding)
from .models import causal_inputs, pad_rows

LossOfLogProbs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
_CHUNK_ELEMENTS = 1 << 25  # bound on a scratch tensor of per-prompt products


@dataclass
class UpdateBackward:
    """What one minibatch's backward gives besides the parameters' .grad."""

    loss: torch.Tensor  # the minibatch loss (detached)
    stats: dict  # the loss function's statistics
    squared: torch.Tensor | None  # [G] float64: ||W_i||², prompt i's share of the gradient; None unless asked
    token_weights: torch.Tensor  # [B, T] ∂L/∂log π per output token (0 at padding)
    unit_log_probs: torch.Tensor  # [B, T] log π at temperature 1 (the `log_prob` column's; 0 at padding)
    mask: torch.Tensor  # [B, T] 1 on real output tokens


def update_backward(model, prompt_ids: list[list[int]], output_ids: list[list[int]], sizes: list[int],
                    loss_of: LossOfLogProbs, *, temperature: float = 1.0, per_prompt: bool = True,
                    head_budget_bytes: int = 1 << 30) -> UpdateBackward:
    """∇θ of loss_of(log π, mask) into every trainable parameter's .grad (added to what is there),
    for the sequences (prompt_ids[s], output_ids[s]); `sizes[i]` consecutive sequences share
    prompt i. With per_prompt, also ||W_i||² per prompt. The caller checked the model with
    gradnorm.batched_grad_norms_unsupported and put it in eval mode."""
    device = next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    norm_dtype = torch.promote_types(model_dtype, torch.float32)  # as gradnorm: bf16 activations, fp32 products
    head = model.get_output_embeddings()
    num_prompts = len(sizes)

    outputs, output_mask = pad_rows(output_ids, left=False, device=device)
    input_ids, attention_mask, position_ids, prompt_width = causal_inputs(prompt_ids, outputs, output_mask)
    tokens = TokenLayout(attention_mask, prompt_width, sizes)
    sequence, t = output_mask.bool().nonzero(as_tuple=True)  # real output tokens, sequence-major = prompt-major
    predicted_at = sequence * input_ids.shape[1] + prompt_width - 1 + t
    prompt_of = torch.repeat_interleave(torch.arange(num_prompts, device=device), torch.tensor(sizes, device=device))
    counts = torch.bincount(prompt_of[sequence], minlength=num_prompts).tolist()

    params = [p for p in model.parameters() if p.requires_grad]
    layers = _PromptGradients(tokens, {id(p) for p in params}, norm_dtype, num_prompts, device, per_prompt)
    input_embedding = tied_input_embedding(model)
    with hooked_and_frozen(model, layers), torch.enable_grad():
        hidden = hidden_states_at(model, input_ids, attention_mask, position_ids, predicted_at)
        head_part = _head_backward(head, hidden.detach(), sequence, t, output_mask, targets=outputs[sequence, t],
                                   counts=counts, loss_of=loss_of, temperature=temperature,
                                   budget=head_budget_bytes, norm_dtype=norm_dtype, layers=layers,
                                   tied_rows_of=lambda: layers.ids_of.get(input_embedding))
        leaf_grads = torch.autograd.grad(hidden, list(layers.embedding_outputs.values()),
                                         grad_outputs=head_part.grad_hidden, allow_unused=True)
    layers.add_embeddings(leaf_grads, input_embedding, head_part.head_rows)
    for p in params:
        grad = layers.grads.get(id(p))
        grad = torch.zeros_like(p) if grad is None else grad.to(p.dtype)
        p.grad = grad if p.grad is None else p.grad + grad
    return UpdateBackward(head_part.loss, head_part.stats, layers.squared.cpu() if per_prompt else None,
                          head_part.token_weights, head_part.unit_log_probs,
                          output_mask.to(head_part.unit_log_probs.dtype))


@dataclass
class _HeadPart:
    loss: torch.Tensor
    stats: dict
    grad_hidden: torch.Tensor
    head_rows: torch.Tensor | None
    token_weights: torch.Tensor
    unit_log_probs: torch.Tensor


def _head_backward(head, hidden, sequence, t, output_mask, *, targets, counts, loss_of, temperature, budget,
                   norm_dtype, layers: "_PromptGradients", tied_rows_of) -> _HeadPart:
    """The LM head on the real output tokens' hidden states [M, d] (prompt-major, counts[i] of prompt i):
    log π, the loss and its per-token weights, the gradient at the logits in closed form, the
    head's per-prompt gradients (added to `layers`) and the gradient at the hidden states."""
    weight, bias = head.weight, head.bias
    M, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    logit_dtype = torch.promote_types(hidden.dtype, torch.float32)  # as models.token_log_probs
    rows = torch.arange(M, device=device)
    # 1. log π at T (and at 1) of every output token; softmax(l / T) kept for step 3
    probs = torch.empty((M, vocab), dtype=logit_dtype, device=device)
    token_log_probs = torch.empty(M, dtype=logit_dtype, device=device)
    unit_log_probs = torch.empty(M, dtype=logit_dtype, device=device)
    block = max(1, budget // (vocab * 2 * logit_dtype.itemsize))
    for t0 in range(0, M, block):
        t1 = min(M, t0 + block)
        logits = nn.functional.linear(hidden[t0:t1], weight, bias).to(logit_dtype)
        picked = logits[rows[: t1 - t0], targets[t0:t1]]
        unit_log_probs[t0:t1] = picked - torch.logsumexp(logits, dim=-1)
        if temperature != 1.0:
            logits = logits / temperature
            picked = picked / temperature
        normaliser = torch.logsumexp(logits, dim=-1)
        token_log_probs[t0:t1] = picked - normaliser
        probs[t0:t1] = torch.exp(logits - normaliser[:, None])
        del logits
    # 2. the loss as a function of the log-probs; its per-token weights w = ∂L/∂log π
    def padded(values):
        out = torch.zeros(output_mask.shape, dtype=logit_dtype, device=device)
        out[sequence, t] = values
        return out

    log_probs = padded(token_log_probs).requires_grad_(True)
    with torch.enable_grad():
        loss, stats = loss_of(log_probs, output_mask.to(logit_dtype))
        (token_weights,) = torch.autograd.grad(loss, log_probs)
    w = token_weights[sequence, t] / temperature
    # 3. z = ∂L/∂l = w (onehot(y) - softmax(l / T)) / T, in place of the probabilities
    z = probs.mul_(-w[:, None])
    z[rows, targets] += w
    grad_hidden = torch.empty_like(hidden)
    for t0 in range(0, M, block):
        grad_hidden[t0 : t0 + block] = z[t0 : t0 + block].to(hidden.dtype) @ weight
    # 4. the head's per-prompt gradients Σ_τ z_τ h_τᵀ ([V, d] each), summed into its gradient
    head_rows = layers.add_head(weight, bias, z, hidden, counts, tied_rows_of())
    return _HeadPart(loss.detach(), {k: v.detach() for k, v in stats.items()}, grad_hidden, head_rows,
                     token_weights.detach(), padded(unit_log_probs))


class _PromptGradients(LayerHooks):
    """The per-layer hooks (gradnorm.LayerHooks): each sees a layer's input activations and output
    gradients, forms that layer's per-prompt gradients, adds their sum to the parameter's gradient
    (`grads`) and, with per_prompt, their squared norms to `squared`."""

    def __init__(self, tokens: TokenLayout, trainable: set, norm_dtype, num_prompts: int, device, per_prompt: bool):
        super().__init__(tokens, trainable, norm_dtype)
        self.per_prompt = per_prompt
        self.squared = torch.zeros(num_prompts, dtype=torch.float64, device=device)
        self.grads: dict[int, torch.Tensor] = {}  # id(parameter) -> its gradient (norm dtype)

    def add_grad(self, param, value: torch.Tensor) -> None:
        key = id(param)
        self.grads[key] = value if key not in self.grads else self.grads[key] + value

    def add_squared(self, value: torch.Tensor) -> None:
        if self.per_prompt:
            self.squared += value.to(device=self.squared.device, dtype=torch.float64)

    def add_products(self, param, a: torch.Tensor, g: torch.Tensor, transpose: bool) -> None:
        """Σ_τ a_τ g_τᵀ of every prompt (a [G, n, d_in], g [G, n, d_out]): their squared norms and sum."""
        if not self.per_prompt:  # the sum only: one product over all prompts' tokens
            total = a.reshape(-1, a.shape[-1]).mT @ g.reshape(-1, g.shape[-1])
        else:
            num_prompts, _, d_in = a.shape
            step = max(1, _CHUNK_ELEMENTS // (d_in * g.shape[-1]))
            total = None
            for s in range(0, num_prompts, step):
                products = a[s : s + step].mT @ g[s : s + step]  # [chunk, d_in, d_out]
                self.squared[s : s + step] += products.square().sum(dim=(1, 2)).double()
                total = products.sum(dim=0) if total is None else total + products.sum(dim=0)
        self.add_grad(param, total.mT if transpose else total)

    def on_linear_grad(self, module, x, g):
        g = self.tokens.gather_sum(g, self.norm_dtype)
        if module.bias is not None and id(module.bias) in self.trainable:
            sums = g.sum(dim=1)  # ∇b_i = Σ_τ g_τ
            self.add_squared(sums.square().sum(dim=1))
            self.add_grad(module.bias, sums.sum(dim=0))
        if id(module.weight) in self.trainable:  # Linear's weight is [d_out, d_in], Conv1D's [d_in, d_out]
            self.add_products(module.weight, self.tokens.pick(x, self.norm_dtype), g,
                              transpose=isinstance(module, nn.Linear))

    def on_norm_grad(self, module, x, g):
        normalized = self.normalized(module, x)
        g = self.tokens.gather_sum(g, self.norm_dtype)
        for param, per_prompt in ((module.weight, (g * normalized).sum(dim=1)),  # ∇γ_i = Σ_τ g_τ ⊙ â_τ
                                  (getattr(module, "bias", None), g.sum(dim=1))):  # ∇β_i = Σ_τ g_τ
            if param is not None and id(param) in self.trainable:
                self.add_squared(per_prompt.square().sum(dim=1))
                self.add_grad(param, per_prompt.sum(dim=0))

    def add_head(self, weight, bias, z, hidden, counts, tied_rows: IdsByInput | None):
        """The head's per-prompt gradients Σ_τ z_τ h_τᵀ; returns, for a tied embedding, each
        prompt's head-gradient rows at the ids it contains (for the cross term)."""
        want_weight, want_bias = id(weight) in self.trainable, bias is not None and id(bias) in self.trainable
        h = hidden.to(self.norm_dtype)
        z = z.to(self.norm_dtype)
        head_rows = None
        if want_weight and self.per_prompt and tied_rows is not None:
            head_rows = torch.zeros((len(tied_rows.id_of), h.shape[1]), dtype=self.norm_dtype, device=h.device)
        if want_weight and not self.per_prompt:
            self.add_grad(weight, z.mT @ h)
        start = 0
        for i, count in enumerate(counts):
            z_i, h_i = z[start : start + count], h[start : start + count]
            start += count
            if want_bias:
                sums = z_i.sum(dim=0)  # ∇b_i = Σ_τ z_τ
                if self.per_prompt:
                    self.squared[i] += sums.square().sum().double()
                self.add_grad(bias, sums)
            if not (want_weight and self.per_prompt) or count == 0:
                continue
            product = z_i.mT @ h_i  # [V, d]: prompt i's head gradient
            self.squared[i] += torch.linalg.vector_norm(product, dtype=torch.float64).square()
            self.add_grad(weight, product)
            if head_rows is not None and tied_rows.count[i]:
                rows = slice(tied_rows.first[i], tied_rows.first[i] + tied_rows.count[i])
                head_rows[rows] = product[tied_rows.table[i, : tied_rows.count[i]]]
        return head_rows

    def add_embeddings(self, leaf_grads, input_embedding, head_rows) -> None:
        """The embeddings' share, from the gradients at their outputs (and the tied head's cross term)."""
        for embedding, u in zip(list(self.embedding_outputs), leaf_grads, strict=True):
            if u is None:
                continue
            rows = self.ids_of[embedding]
            sums = rows.row_sums(self.tokens.gather_sum(u, self.norm_dtype))  # row v of ∇E_i, v among prompt i's ids
            if self.per_prompt:
                per_row = sums.square().sum(dim=1)  # ||∇E_emb,i||² = Σ_v ||Σ_{τ: id_τ=v} u_τ||²
                if embedding is input_embedding and head_rows is not None:
                    per_row = per_row + 2 * (sums * head_rows).sum(dim=1)  # + 2 <∇E_emb,i, ∇E_head,i>
                self.add_squared(torch.zeros_like(self.squared).index_add_(0, rows.input_of, per_row.double()))
            grad = torch.zeros_like(embedding.weight, dtype=self.norm_dtype).index_add_(0, rows.id_of, sums)
            self.add_grad(embedding.weight, grad)


def leave_one_out_from_update(squared: torch.Tensor, token_weights: torch.Tensor, mask: torch.Tensor,
                              rewards: torch.Tensor, sizes_kept: list[list[int]],
                              tolerance: float = 1e-6) -> list[float | None]:
    """||ĝ(x_i)|| (gradnorm.py) from ||W_i||, where the algebra allows (module docstring), else None.

    squared [G]            ||W_i||² of the prompts of one backward
    token_weights [B, T]   ∂L/∂log π of its sequences (prompt-major); mask [B, T] their real tokens
    rewards [G, K]         each prompt's K rewards
    sizes_kept[i]          indices (0..K-1) of prompt i's completions among the backward's sequences,
                           in order; a completion left out had a zero weight (skipped, A = 0)
    """
    norms: list[float | None] = []
    start = 0
    for i, kept in enumerate(sizes_kept):
        rows = slice(start, start + len(kept))
        start += len(kept)
        a = leave_one_out_advantages(rewards[i].double()) / rewards.shape[1]  # ĝ = Σ_k a_k ∇log π(y_k)
        w, m = token_weights[rows].double(), mask[rows].double()
        c = (w * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # c_k: the completion's (constant) weight
        spread = ((w - c[:, None]).abs() * m).amax() if len(kept) else torch.zeros(())
        coefficients = torch.zeros_like(a)
        coefficients[kept] = c
        scale = coefficients.abs().max()
        if not a.any():
            norms.append(0.0)
            continue
        if scale == 0 or spread > tolerance * scale:
            norms.append(None)
            continue
        ratio = (a @ coefficients) / (coefficients @ coefficients)  # a = λ c
        if (a - ratio * coefficients).abs().max() > tolerance * a.abs().max():
            norms.append(None)
            continue
        norms.append(abs(ratio.item()) * squared[i].clamp(min=0).sqrt().item())
    return norms
