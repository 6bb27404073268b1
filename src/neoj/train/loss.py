"""Next-token cross-entropy computed from hidden states chunk by chunk, never holding all the logits.

With GPT-2's 50257-token vocabulary the logits of a batch are the largest tensor in training
(8 x 512 tokens: 820 MB in fp32, twice that with their gradient). The LM head and the loss are fused
here: each chunk's logits are made, turned into the loss and into the gradients of the hidden states
and of the head, then dropped. The forward pass therefore does the backward's matrix products too;
the backward only scales the stored gradients. The cost equals the unfused forward + backward.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T + bias, target_i), gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, want_grad, compute_dtype):
        keep = token_weights.nonzero().squeeze(1)
        h_all = hidden
        if keep.numel() < hidden.shape[0]:
            hidden, targets, token_weights = hidden[keep], targets[keep], token_weights[keep]
        need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        need_b = want_grad and bias is not None and ctx.needs_input_grad[2]
        w = weight.to(compute_dtype)
        in_dtype, hidden = hidden.dtype, hidden.to(compute_dtype)
        grad_h = torch.zeros_like(h_all, dtype=compute_dtype) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_buf = None
        rows = torch.arange(min(CHUNK_ROWS, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], CHUNK_ROWS):
            h, t, tw = hidden[s : s + CHUNK_ROWS], targets[s : s + CHUNK_ROWS], token_weights[s : s + CHUNK_ROWS]
            logits = (h @ w.t()).float()  # (n, V)
            if bias is not None:
                logits += bias.float()
            r = rows[: h.shape[0]]
            target_logit = logits[r, t]
            # One in-place pass each: max, subtract, exp, sum. The exponentials become the softmax
            # that the gradient needs, so nothing of size (n, V) is allocated twice.
            m = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(m).exp_()
            z = e.sum(dim=-1, keepdim=True)
            lse = (m + z.log()).squeeze(1)
            total += ((lse - target_logit) * tw).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = w_i * (softmax - onehot), written straight in the matmul dtype.
            scale = tw[:, None] / z
            if h.dtype == torch.float32:
                g = e.mul_(scale)
            else:
                if g_buf is None:
                    g_buf = torch.empty(e.shape, dtype=h.dtype, device=e.device)
                g = torch.mul(e, scale, out=g_buf[: e.shape[0]])
            g[r, t] -= tw.to(g.dtype)
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
            if need_h:
                gh = g @ w
                if keep.numel() < h_all.shape[0]:
                    grad_h.index_copy_(0, keep[s : s + CHUNK_ROWS], gh)
                else:
                    grad_h[s : s + CHUNK_ROWS] = gh
            if need_w:
                if h.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:  # low-precision product, accumulated in fp32 as autocast's linear layers are
                    grad_w += (g.t() @ h).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.w_dtype, ctx.h_dtype = weight.dtype, in_dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.has
        gh = (next(saved) * grad_out).to(ctx.h_dtype) if need_h else None
        gw = (next(saved) * grad_out).to(ctx.w_dtype) if need_w else None
        gb = (next(saved) * grad_out).to(ctx.b_dtype) if need_b else None
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                         token_weights: torch.Tensor) -> torch.Tensor:
    """Returns sum_i token_weights_i * CE(head(hidden_i), targets_i) for hidden (N, C), targets (N,)."""
    want_grad = torch.is_grad_enabled()
    dev = hidden.device.type
    # Under autocast the head's matrix products run in the autocast dtype, like any linear layer's.
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, token_weights.float(), want_grad,
                                     dtype)


class CausalLMLoss(nn.Module):
    """Wraps a Transformer so that forward(ids, weights) returns the weighted next-token loss.

    DDP and FSDP wrap this module: the LM head is used inside its forward, where they expect it.
    `weights` (B, T) says how much each token counts as a prediction target (token 0 never is).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h = self.model(ids)[:, :-1]  # (B, T-1, C): position t predicts token t+1
        C = h.shape[-1]
        return linear_cross_entropy(h.reshape(-1, C), self.model.lm_head, ids[:, 1:].reshape(-1),
                                    weights[:, 1:].reshape(-1))
