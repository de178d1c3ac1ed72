"""End-to-end loss of a block change from one backward pass: the sweep's linear-cost estimate.

Measuring a (block, format) exactly runs the block and every later block to the logits, so a
sweep over L blocks costs O(L^2) block forwards. Here the fp model runs forward and backward
once per window, and keeps at every block's output h_i the gradient of

- the cross-entropy on the text's own next tokens: ``g`` (first-order change of CE), and
- the log-likelihood of tokens drawn from the fp model's own distribution: ``u_1..u_k``; their
  outer products average to the Fisher information of the output distribution at h_i, which is
  the Hessian of KL(fp || changed) there (Amari; the estimator of HAWQ-v2 / ModelOpt's
  auto_quantize scores, written here for a block's output instead of a weight).

For a block whose output moves by ``d`` (its quantized output minus its fp output, both from
the fp input), per token t:

    KL  ~  1/2 * mean_t  (1/k) sum_s (u_s,t . d_t)^2
    dCE ~  mean_t (g_t . d_t)  +  KL

KL's Hessian at the fp model is exactly that Fisher, so the KL estimate is right to second order;
dCE's second-order part also holds CE's curvature through the later blocks, which the Fisher
(Gauss-Newton) term does not (on tiny state-space blocks it is as large as the first-order
part), so estimated rows choose between the map and the map off by KL, and allocation sums KL
by default. Only block i's forward is run per (block, format), so the sweep costs O(L). The estimate ranks;
the allocation's plan is measured on held-out text and repaired both ways (``calibrate``),
which corrects what the quadratic model misses. ``benchmarks/sweep_estimates.py`` measures how
well it ranks against the full measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .blocks import BlockRunner, get_module, multiplier

SAMPLES = 2  # draws from the fp model's distribution per token (the Fisher's Monte Carlo)
STORE = torch.bfloat16  # gradients are kept at this precision (L x N x S x H values each)


@dataclass
class OutputGradients:
    """Per block, gradients at its output on the runner's windows: ``label[i]`` [N, S, H] and
    ``sampled[i]`` [k, N, S, H] (see module docstring); ``input_label`` / ``input_sampled``: the
    same at block 0's input (the embedding's output, for the table's rows)."""

    label: list[torch.Tensor]
    sampled: list[torch.Tensor]
    tokens: int  # positions that carry a loss (the last of each window predicts nothing)
    input_label: torch.Tensor | None = None
    input_sampled: torch.Tensor | None = None

    def estimate(self, index: int, delta: torch.Tensor) -> tuple[float, float]:
        """(dCE, KL) in nats per token predicted from block ``index``'s output change ``delta`` [N, S, H]."""
        return self._estimate(self.label[index], self.sampled[index], delta)

    def estimate_input(self, delta: torch.Tensor) -> tuple[float, float]:
        """(dCE, KL) predicted from a change ``delta`` [N, S, H] of block 0's input (the embedding's output)."""
        return self._estimate(self.input_label, self.input_sampled, delta)

    def _estimate(self, label: torch.Tensor, sampled: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
        d = delta.float()
        first = float((label.float() * d).sum()) / self.tokens
        projected = (sampled.float() * d).sum(dim=-1)  # [k, N, S]: u . d per draw and token
        kl = 0.5 * float(projected.pow(2).sum()) / (projected.shape[0] * self.tokens)
        return first + kl, kl


def output_gradients(runner: BlockRunner, *, samples: int = SAMPLES, seed: int = 0) -> OutputGradients:
    """Run the fp model forward and backward on each of the runner's windows (one at a time, so
    autograd holds one window's activations) and keep the gradients at every block's output and
    at block 0's input."""
    num, seqlen = runner.ids.shape
    layers = len(runner.layers)
    hidden_size = runner.first_hidden.shape[-1]
    label = [torch.empty(num, seqlen, hidden_size, dtype=STORE) for _ in range(layers)]
    sampled = [torch.empty(samples, num, seqlen, hidden_size, dtype=STORE) for _ in range(layers + 1)]
    label.append(torch.empty(num, seqlen, hidden_size, dtype=STORE))  # the last: block 0's input
    generator = torch.Generator(device=runner.first_hidden.device).manual_seed(seed)
    norm = get_module(runner.model, runner.spec.final_norm)
    head = get_module(runner.model, runner.spec.lm_head)
    scale = multiplier(runner.model, runner.spec.logits_multiplier)
    params = [p for p in runner.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # gradients at the activations only
    try:
        for n in range(num):
            outs = []
            first = hidden = runner.first_hidden[n : n + 1].detach().requires_grad_(True)
            with torch.enable_grad():
                for i in range(layers):
                    hidden = runner.block_forward(i, hidden)
                    outs.append(hidden)
                outs.append(first)
                logits = head(norm(hidden)).float() * scale
                if runner.softcap:
                    logits = torch.tanh(logits / runner.softcap) * runner.softcap
                logprobs = torch.log_softmax(logits[0, :-1], dim=-1)  # [S-1, V]: the last position predicts nothing
                with torch.no_grad():
                    draws = torch.multinomial(logprobs.exp(), samples, replacement=True, generator=generator)  # [S-1, k]
                losses = [F.nll_loss(logprobs, runner.ids[n, 1:], reduction="sum")]
                losses += [-logprobs.gather(1, draws[:, s : s + 1]).sum() for s in range(samples)]
                for j, loss in enumerate(losses):
                    grads = torch.autograd.grad(loss, outs, retain_graph=j < len(losses) - 1)
                    for i, g in enumerate(grads):
                        (label[i] if j == 0 else sampled[i][j - 1])[n] = g[0].to(STORE)
                del outs, logits, logprobs, losses, grads
    finally:
        for p in params:
            p.requires_grad_(True)
    return OutputGradients(label[:layers], sampled[:layers], tokens=num * (seqlen - 1),
                           input_label=label[layers], input_sampled=sampled[layers])
