"""The data-driven steps layer by layer (surgery.reconstruct_layerwise) against the in-memory path
(surgery.reconstruct.apply_calibrated on the whole model), the oracle: every fitted block bit for bit equal, the
same fit report, on every family, for both input modes, with whitened and asvd factorisations and dropped layers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, save_tiny

from surgery.apply import validate_plan
from surgery.arch import spec_for_config
from surgery.data import TokenBlocks
from surgery.fingerprint import tokens_fingerprint
from surgery.loading import load_model
from surgery.plan import parse_plan
from surgery.reconstruct import apply_calibrated
from surgery.reconstruct_layerwise import run_data_steps_layerwise


def blocks_of(n: int = 10, seq_len: int = 24) -> TokenBlocks:
    ids = torch.randint(3, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return TokenBlocks(ids, "random", tokens_fingerprint(ids), ids.numel())


def plan(spec, blocks: TokenBlocks, inputs: str) -> dict:
    """Heads and a whitened factor in layer 0, neurons and an asvd factor in layer 1, layer 2 dropped (GPT-2: its
    attention), reconstruct; 3 blocks per batch (the last batch smaller)."""
    mlp_in = spec.gate_up or spec.up
    last = ({"op": "drop_layers", "layers": [2]} if spec.family != "gpt2" else
            {"op": "drop_attention", "layer": 2})
    cal = {"source": "random", "fingerprint": blocks.fingerprint, "tokens": blocks.num_tokens,
           "seq_len": blocks.seq_len, "batch_size": 3}
    return {"version": 1, "calibration": cal, "steps": [
        {"op": "prune_heads", "layer": 0, "heads": [0, 2]},
        {"op": "low_rank", "module": f"{spec.layer_prefix(0)}.{spec.mlp}.{mlp_in}", "rank": 9, "method": "whitened"},
        {"op": "prune_neurons", "layer": 1, "neurons": list(range(0, 96, 2))},
        {"op": "low_rank", "module": f"{spec.layer_prefix(1)}.{spec.attn}.{spec.attn_linears[0]}", "rank": 7,
         "method": "asvd"},
        last,
        {"op": "reconstruct", "ridge": 1e-3, "inputs": inputs},
    ]}  # fmt: skip


# each family once, the two input modes shared out (the suite's time)
CASES = [(family, "pruned" if i % 2 == 0 else "original") for i, family in enumerate(FAMILIES)]


@pytest.mark.parametrize("family, inputs", CASES)
def test_layerwise_fits_equal_in_memory_bit_for_bit(tmp_path, monkeypatch, family, inputs):
    from surgery.importance import layerwise

    opened = []
    real_open = layerwise.open_skeleton
    monkeypatch.setattr(layerwise, "open_skeleton", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])
    src = save_tiny(tmp_path / family, family)
    blocks = blocks_of()
    loaded = load_model(str(src))
    spec = spec_for_config(loaded.model.config)
    resolution = validate_plan(parse_plan(plan(spec, blocks, inputs)), loaded.model)
    want = apply_calibrated(loaded.model, resolution, None, blocks=blocks)
    layers = loaded.model.get_submodule(spec.layers)

    seen = []

    def check(position, block):
        # one original block in memory (the cut copy is `block`): every other layer of the checkpoint is on meta
        in_memory = [not any(p.is_meta for p in layer.parameters()) for layer in opened[0].layers]
        assert sum(in_memory) == 1
        state, ref = block.state_dict(), layers[position].state_dict()
        assert state.keys() == ref.keys()
        for name, value in ref.items():
            assert torch.equal(state[name], value), f"layer {position} {name}"
        seen.append(position)

    got = run_data_steps_layerwise(src, loaded.config_dict, resolution, blocks, on_block=check)
    assert seen == [0, 1] if family != "gpt2" else [0, 1, 2]
    assert got.describe() == want.describe()
    assert all(p.is_meta for p in opened[0].layers.parameters())  # every block freed
    assert {f.module.rpartition(".")[2] for f in got.fits} == {spec.o, spec.down}
