"""Scores for the two newer axes: residual channels (prune_hidden) and MoE experts (prune_experts).

They run inside the runner's one forward(+backward) per batch (`WidthHooks`, installed by `CombinedHooks`):

- `channel_norm` (Minitron, Muralidharan et al. 2024): for channel c, the sum over every hidden-size norm (each
  layer's attention and MLP norms, the final norm) of the mean over tokens of |norm output[c]|.
- `channel_taylor`: one gate xi_c per residual channel multiplies channel c of the embedding output and of every
  residual write (each attention block's and each MLP block's output, before it is added to the stream). At
  xi_c = 0 channel c of the residual stream is exactly 0 everywhere, which is what prune_hidden with its norm
  rescale computes (RMSNorm over the kept channels times sqrt(hidden / kept) equals RMSNorm over all channels when
  the removed ones are 0). Per batch, dL_b/dxi_c = sum over those sites and tokens of h_c * dL_b/dh_c; the score
  is the sum over batches of its absolute value (like `neuron_taylor`).
- per MoE layer and expert e: `expert_freq` = the fraction of tokens whose top-k holds e; `expert_reap` (REAP,
  Lasby et al. 2025) = the mean over the tokens routed to e of gate weight x ||expert e's output||_2 (0 for an
  expert no token picked); `expert_grad` = the sum over batches of |dL_b/dg_e| for a gate g_e multiplying expert
  e's routed (weighted) output: dL_b/dg_e = sum over routed (token, slot) of w * E_e(x) . dL_b/dy.

The expert outputs are recomputed from the experts module's inputs (one extra expert pass over the routed tokens),
because the fused experts module adds them up inside its forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.arch import spec_for_config
from surgery.errors import UserError
from surgery.importance.layout import LayerSite, ModelLayout

CHANNEL_METRICS = {"channel_norm", "channel_taylor"}
EXPERT_METRICS = {"expert_freq", "expert_reap", "expert_grad"}
WIDTH_GRAD_METRICS = {"channel_taylor", "expert_grad"}
WIDTH_FORWARD_METRICS = {"channel_norm", "expert_freq", "expert_reap"}
# running sums the hooks keep that are not scores themselves (CombinedHooks.results ignores them)
_COUNT, _REAP_SUM = "expert_count", "expert_reap_sum"


def _expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e` of a fused transformers-5 experts module applied to tokens `x` (N, hidden), unweighted."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class WidthHooks:
    """The channel and expert hooks of the combined pass; `add(key, value)` is CombinedHooks' accumulator."""

    def __init__(self, layout: ModelLayout, metrics: set[str], add: Callable[[str, torch.Tensor], None]):
        self.layout, self.metrics, self.add = layout, metrics, add
        self.weight = 1.0
        self._channel_batch: torch.Tensor | None = None  # this batch's weight * dL_b/dxi, summed over sites

    @property
    def channel_key(self) -> str:
        return f"{self.layout.model_path}/channel_taylor"

    def start_batch(self, weight: float) -> None:
        self.weight = weight
        self._channel_batch = None

    def end_batch(self) -> None:
        """After a batch's backward: its channel gate gradient is complete (every site added to it)."""
        if self._channel_batch is not None:
            self.add(self.channel_key, (self._channel_batch / self.weight).abs())
            self._channel_batch = None

    # -- channels ----------------------------------------------------------------------------------------------
    def _norm_output(self, _module, _args, out):
        self.add(f"{self.layout.model_path}/channel_norm", out.detach().abs().float().flatten(0, -2).sum(0))

    def _residual_write(self, _module, _args, output):
        h = _block_output(output)
        if not h.requires_grad:
            return
        hd = h.detach()

        def on_grad(g):
            raw = (hd.float() * g.float()).flatten(0, -2).sum(0)  # (hidden,): weight * sum_t h_c dL_b/dh_c
            if self._channel_batch is None:
                self._channel_batch = raw.clone()
            else:
                self._channel_batch += raw.to(self._channel_batch.device)

        h.register_hook(on_grad)

    def _residual_writers(self) -> list[nn.Module]:
        spec, writers = self.layout.spec, [self.layout.embed]
        for site in self.layout.layers:
            if site.attn_path is not None:
                writers.append(site.module.get_submodule(spec.attn))
            if site.mlp_path is not None:
                writers.append(site.module.get_submodule(spec.mlp))
        return writers

    # -- experts -----------------------------------------------------------------------------------------------
    def _experts(self, site: LayerSite):
        want_grad = "expert_grad" in self.metrics
        path = site.mlp_path

        def hook(module, args, kwargs, output):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            x, idx, w = (*args, *(kwargs[name] for name in names[len(args):]))
            n, k = idx.shape
            xd, wd = x.detach(), w.detach().float()
            count = torch.zeros(site.num_experts, device=x.device)
            reap = torch.zeros(site.num_experts, device=x.device)
            contrib = xd.new_zeros(n, k, xd.shape[-1], dtype=torch.float32) if want_grad else None
            with torch.no_grad():
                for e in idx.unique().tolist():
                    if not 0 <= e < site.num_experts:
                        continue  # the padding index some kernels use
                    tok, pos = torch.where(idx == e)
                    weighted = _expert_output(module, e, xd[tok]).float() * wd[tok, pos, None]  # (n_e, hidden)
                    count[e] = tok.numel()
                    reap[e] = weighted.norm(dim=-1).sum()  # w >= 0 (softmax): ||w E_e(x)|| = w ||E_e(x)||
                    if contrib is not None:
                        contrib[tok, pos] = weighted
            self.add(f"{path}/{_COUNT}", count)
            self.add(f"{path}/{_REAP_SUM}", reap)
            if contrib is not None and output.requires_grad:
                flat_idx = idx.flatten().clamp(0, site.num_experts - 1)
                valid = ((idx >= 0) & (idx < site.num_experts)).flatten().float()
                weight = self.weight

                def on_grad(g):
                    raw = (contrib * g.float().reshape(n, 1, -1)).sum(-1).flatten() * valid  # (n * k,)
                    gate = torch.zeros(site.num_experts, device=raw.device).index_add_(0, flat_idx, raw)
                    self.add(f"{path}/expert_grad", (gate / weight).abs())

                output.register_hook(on_grad)

        return hook

    def install(self, reg) -> None:
        """Register the forward hooks (`reg` takes each handle)."""
        if "channel_norm" in self.metrics:
            for norm in self.layout.hidden_norms:
                reg(norm.register_forward_hook(self._norm_output))
        if "channel_taylor" in self.metrics:
            for module in self._residual_writers():
                reg(module.register_forward_hook(self._residual_write))
        if self.metrics & EXPERT_METRICS:
            for site in self.layout.layers:
                if site.experts is not None:
                    reg(site.experts.register_forward_hook(self._experts(site), with_kwargs=True))

    def results(self, sums: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
        """The forward-kind scores from the running sums (the gradient ones are final sums already)."""
        out: dict[str, torch.Tensor] = {}
        n = max(tokens, 1)
        key = f"{self.layout.model_path}/channel_norm"
        if key in sums:
            out[key] = (sums[key] / n).cpu()
        for site in self.layout.layers:
            count = sums.get(f"{site.mlp_path}/{_COUNT}")
            if count is None:
                continue
            if "expert_freq" in self.metrics:
                out[f"{site.mlp_path}/expert_freq"] = (count / n).cpu()
            if "expert_reap" in self.metrics:
                out[f"{site.mlp_path}/expert_reap"] = (sums[f"{site.mlp_path}/{_REAP_SUM}"] / count.clamp(min=1)).cpu()
        return out


# -- library shorthands ----------------------------------------------------------------------------------------
def channel_norm_scores(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(hidden,) Minitron channel importance over the token-id `batches` (`channel_norm`, see above)."""
    from surgery.importance.layout import model_layout
    from surgery.importance.runner import score_model

    scores = score_model(model, list(batches), "channel-norm")
    return scores[f"{model_layout(model).model_path}/channel_norm"]


def expert_scores(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"frequency": (E,), "reap": (E,)}} for every MoE layer of `model` (`expert_freq`, `expert_reap`)."""
    from surgery.importance.layout import model_layout
    from surgery.importance.runner import score_model

    spec = spec_for_config(model.config)
    if not spec.cfg_experts:
        raise UserError(f"expert scores need a mixture-of-experts model; this {spec.family} model has no experts")
    scores = score_model(model, list(batches), "expert-freq,expert-reap")
    return {s.index: {"frequency": scores[f"{s.mlp_path}/expert_freq"], "reap": scores[f"{s.mlp_path}/expert_reap"]}
            for s in model_layout(model).layers if s.experts is not None}


__all__ = ["CHANNEL_METRICS", "EXPERT_METRICS", "WidthHooks", "channel_norm_scores", "expert_scores"]
