"""Hooks for the one combined forward+backward pass per batch, and the running sums they keep.

Everything is accumulated per batch into small tensors (one number per head, neuron, layer or input channel), on
the device of the hooked tensor, so memory does not grow with the number of calibration tokens and a model
spread over several devices works too. Activations are only held between a batch's forward and its backward,
which is what autograd would keep for a training step anyway.

Gates (Michel et al. 2019): with a gate xi_h multiplying head h's output at the input of o_proj,
dL/dxi_h at xi = 1 is sum over tokens and the head's features of a * dL/da (chain rule). So the gate gradient is
read from the activation and its gradient, with no gate tensor in the graph; `head_taylor` as the issue defines it
(|sum over tokens of a . dL/da| for the head output vector a) is the same number and is stored from the same sum.
`head_delta` / `neuron_delta` keep the sign and take no absolute value: -dL/dxi with L the mean loss over all
calibration tokens, the first-order estimate of the loss increase that `head_ablate` measures exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surgery.importance.layout import LayerSite, ModelLayout
from surgery.importance.width import WIDTH_FORWARD_METRICS, WIDTH_GRAD_METRICS, WidthHooks

GRAD_METRICS = {"head_grad", "kv_group_grad", "head_taylor", "neuron_taylor", "head_delta", "neuron_delta",
                "layer_grad", *WIDTH_GRAD_METRICS}
HEAD_GRAD_METRICS = {"head_grad", "kv_group_grad", "head_taylor", "head_delta"}
FORWARD_METRICS = {"head_act", "neuron_act", "neuron_wanda", "layer_bi", "sv_act", *WIDTH_FORWARD_METRICS}


class CombinedHooks:
    """Install the scoring hooks on a model; read the per-component sums after the last batch.

    Use as a context manager. Before each batch call `start_batch(ids_shape, weight)` where `weight` is the
    batch's share of all calibration targets: the backward runs on `weight * L_b`, so that parameter gradients
    add up to the gradient of the mean loss over all tokens; the per-batch scores divide it out again to get
    dL_b / d(.) as the definitions require.
    """

    def __init__(self, layout: ModelLayout, metrics: set[str]):
        self.layout = layout
        self.metrics = set(metrics)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.weight = 1.0
        self._handles: list = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its sum of squares)
        self.wants_grad = bool(self.metrics & GRAD_METRICS)
        self.width = WidthHooks(layout, self.metrics, self._add)  # channels and experts (surgery.importance.width)
        # input sum of squares per Linear: sv_act needs every Linear, neuron_wanda only the down projections
        self.sumsq_paths: set[str] = set()
        for site in layout.layers:
            if "sv_act" in self.metrics:
                self.sumsq_paths.update(site.linears)
            if "neuron_wanda" in self.metrics and site.down is not None:
                self.sumsq_paths.add(self.down_path(site))

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def down_path(self, site: LayerSite) -> str:
        return f"{site.mlp_path}.{self.layout.spec.down}"

    def _add(self, key: str, value: torch.Tensor) -> None:
        acc = self.sums.get(key)
        if acc is None:
            self.sums[key] = value.detach().float().clone()
        else:
            acc += value.detach().float().to(acc.device)

    def start_batch(self, ids_shape: torch.Size, weight: float) -> None:
        """Call before a batch's forward: (B, T) of its ids, and its share of all targets."""
        self.tokens += int(ids_shape[0]) * int(ids_shape[1])
        self.weight = float(weight)
        self._last = None
        self.width.start_batch(self.weight)

    def end_batch(self) -> None:
        """Call after a batch's backward (or its forward, when there is none)."""
        self.width.end_batch()

    # -- hooks -------------------------------------------------------------------------------------------------
    def _o_pre(self, site: LayerSite):
        heads, hd = site.heads, site.head_dim

        def hook(module, args):
            x = args[0]  # (B, T, H * hd): head h at features [h * hd, (h + 1) * hd)
            b, t = x.shape[:2]
            xd = x.detach()
            if "head_act" in self.metrics:
                self._add(f"{site.attn_path}/head_act", xd.float().view(b, t, heads, hd).norm(dim=-1).sum((0, 1)))
            if self.wants_grad and x.requires_grad and self.metrics & HEAD_GRAD_METRICS:
                x.register_hook(self._head_grad(site, xd))

        return hook

    def _head_grad(self, site: LayerSite, xd: torch.Tensor):
        heads, hd = site.heads, site.head_dim
        weight = self.weight

        def on_grad(g):
            b, t = g.shape[:2]
            # g is d(weight * L_b)/da, so raw is weight * dL_b/dxi_h: its sum over batches is d(mean loss)/dxi_h
            raw = (xd.float() * g.float()).view(b, t, heads, hd).sum((0, 1, 3))  # (H,)
            signed = raw / weight  # dL_b/dxi_h = sum over tokens and head features of a * dL_b/da
            if "head_delta" in self.metrics:
                # removing the head moves xi from 1 to 0: first-order change of the mean loss is -dL/dxi
                self._add(f"{site.attn_path}/head_delta", -raw)
            if "head_grad" in self.metrics:
                self._add(f"{site.attn_path}/head_grad", signed.abs())
            if "head_taylor" in self.metrics:
                self._add(f"{site.attn_path}/head_taylor", signed.abs())
            if "kv_group_grad" in self.metrics:
                groups = signed.view(site.kv_heads, site.group_size).sum(1)  # one gate per KV group
                self._add(f"{site.attn_path}/kv_group_grad", groups.abs())

        return on_grad

    def _down_pre(self, site: LayerSite):
        def hook(module, args):
            x = args[0]  # (B, T, width): one feature per neuron
            xd = x.detach()
            if "neuron_act" in self.metrics:
                self._add(f"{site.mlp_path}/neuron_act", xd.abs().float().sum((0, 1)))
            if self.wants_grad and x.requires_grad and self.metrics & {"neuron_taylor", "neuron_delta"}:
                weight = self.weight

                def on_grad(g):
                    raw = (xd.float() * g.float()).sum((0, 1))  # (width,): weight * sum over tokens of a * dL_b/da
                    if "neuron_taylor" in self.metrics:
                        self._add(f"{site.mlp_path}/neuron_taylor", (raw / weight).abs())
                    if "neuron_delta" in self.metrics:
                        self._add(f"{site.mlp_path}/neuron_delta", -raw)

                x.register_hook(on_grad)

        return hook

    def _sumsq_pre(self, path: str):
        def hook(module, args):
            x = args[0]
            # q/k/v (and gate/up) are called one after the other on the same tensor: square it once. Only the
            # last input is remembered (by identity, holding a reference so its id cannot be reused).
            if self._last is not None and self._last[0] is x:
                cached = self._last[1]
            else:
                cached = x.detach().float().pow(2).flatten(0, -2).sum(0)  # (in,)
                self._last = (x, cached)
            self._add(f"{path}/sumsq", cached)

        return hook

    def _layer_bi(self, site: LayerSite):
        key = f"{self.layout.model_path}/layer_bi/{site.index}"

        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            # under a device_map the hook sees the block's input where the previous block left it
            h_in = h_in.detach().float().to(h_out.device)
            cos = F.cosine_similarity(h_in, h_out.detach().float(), dim=-1)  # (B, T)
            self._add(key, cos.sum())

        return hook

    def _layer_grad(self, site: LayerSite):
        """A gate xi_l on the layer's residual update: h_out = h_in + xi_l (h_out - h_in); xi_l = 0 is drop_layer.
        dL_b/dxi_l = sum over tokens of (h_out - h_in) . dL_b/dh_out, whatever the block does inside."""
        key = f"{self.layout.model_path}/layer_grad/{site.index}"

        def hook(module, args, kwargs, output):
            h_out = output[0] if isinstance(output, tuple) else output
            if not h_out.requires_grad:
                return
            h_in = args[0] if args else kwargs["hidden_states"]
            delta = h_out.detach().float() - h_in.detach().float().to(h_out.device)
            weight = self.weight

            def on_grad(g):
                self._add(key, ((delta * g.float()).sum() / weight).abs())

            h_out.register_hook(on_grad)

        return hook

    @staticmethod
    def _requires_grad_output(module, args, output):
        # lets activation gradients flow when no parameter requires grad (no weight gradients computed)
        if not output.requires_grad:
            output.requires_grad_(True)
        return output

    def __enter__(self) -> CombinedHooks:
        reg = self._handles.append
        if self.wants_grad:
            reg(self.layout.embed.register_forward_hook(self._requires_grad_output))
        self.width.install(reg)  # after the hook above: the channel gate reads the embedding output's gradient
        for site in self.layout.layers:
            if site.o_proj is not None and self.metrics & (HEAD_GRAD_METRICS | {"head_act"}):
                reg(site.o_proj.register_forward_pre_hook(self._o_pre(site)))
            if site.down is not None and self.metrics & {"neuron_act", "neuron_taylor", "neuron_delta"}:
                reg(site.down.register_forward_pre_hook(self._down_pre(site)))
            if "layer_bi" in self.metrics:
                reg(site.module.register_forward_hook(self._layer_bi(site), with_kwargs=True))
            if "layer_grad" in self.metrics:
                reg(site.module.register_forward_hook(self._layer_grad(site), with_kwargs=True))
            modules = dict(site.linears)
            if site.down is not None:
                modules[self.down_path(site)] = site.down
            for path, module in modules.items():
                if path in self.sumsq_paths:
                    reg(module.register_forward_pre_hook(self._sumsq_pre(path)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    # -- results -----------------------------------------------------------------------------------------------
    def input_rms(self, path: str) -> torch.Tensor | None:
        """Per-input-channel RMS of a Linear's input over all calibration tokens, (in,) float32."""
        s = self.sums.get(f"{path}/sumsq")
        return None if s is None else (s / max(self.tokens, 1)).sqrt()

    def results(self) -> dict[str, torch.Tensor]:
        """Finished scores named `<module path>/<metric>` (float32, CPU), except the weight-based ones."""
        out: dict[str, torch.Tensor] = {}
        n = max(self.tokens, 1)
        for key, value in self.sums.items():
            path, _, metric = key.partition("/")
            if metric in GRAD_METRICS:
                out[key] = value.cpu()
            elif metric in ("head_act", "neuron_act"):
                out[key] = (value / n).cpu()
        if "layer_grad" in self.metrics:
            key = f"{self.layout.model_path}/layer_grad"
            out[key] = torch.stack([self.sums.get(f"{key}/{s.index}", torch.zeros(())).cpu()
                                    for s in self.layout.layers]).float()
        if "layer_bi" in self.metrics:
            key = f"{self.layout.model_path}/layer_bi"
            out[key] = torch.stack(
                [1 - self.sums[f"{key}/{s.index}"].cpu() / n for s in self.layout.layers]
            ).float()
        out.update(self.width.results(self.sums, self.tokens))
        return out
