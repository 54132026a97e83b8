"""Plan index lists held compactly (surgery.indices): the same file bytes, the same errors, a fraction of the memory."""

from __future__ import annotations

import copy
import json
import random
import tracemalloc

import pytest

from surgery.errors import PlanError
from surgery.indices import Indices
from surgery.plan import load_plan, parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config

DOC = {
    "version": 1,
    "model": {"source": "smollm2-135m", "fingerprint": "sha256:" + "ab" * 32},
    "steps": [
        {"op": "prune_kv_groups", "layer": 0, "groups": [1]},
        {"op": "prune_neurons", "layer": 0, "neurons": [700, 3, 41]},
        {"op": "low_rank", "module": "model.layers.1.mlp.down_proj", "rank": 16},
        {"op": "reconstruct", "layers": [0, 1]},
    ],
    "provenance": {"per_layer": [[1, 2], [3]], "op": "prune_neurons", "neurons": [1, 2]},
}
# what Plan.to_json wrote for DOC before index lists were packed (checked against the previous commit's code)
GOLDEN = """{
  "model": {
    "fingerprint": "sha256:abababababababababababababababababababababababababababababababab",
    "source": "smollm2-135m"
  },
  "provenance": {
    "neurons": [1, 2],
    "op": "prune_neurons",
    "per_layer": [
      [1, 2],
      [3]
    ]
  },
  "steps": [
    {
      "groups": [1],
      "layer": 0,
      "op": "prune_kv_groups"
    },
    {
      "layer": 0,
      "neurons": [700, 3, 41],
      "op": "prune_neurons"
    },
    {
      "module": "model.layers.1.mlp.down_proj",
      "op": "low_rank",
      "rank": 16
    },
    {
      "inputs": "original",
      "layers": [0, 1],
      "op": "reconstruct",
      "ridge": 0.1
    }
  ],
  "version": 1
}
"""


def _config(layers: int, width: int) -> dict:
    return {"model_type": "llama", "hidden_size": 64, "intermediate_size": width, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True}


def test_plan_bytes_round_trip_through_a_file(tmp_path):
    path = tmp_path / "plan.json"
    parse_plan(DOC).save(path)
    assert path.read_text() == GOLDEN
    plan = load_plan(path)  # the packing decoder
    assert plan.to_json() == GOLDEN
    assert isinstance(plan.steps[1].neurons, Indices) and plan.steps[1].neurons == [700, 3, 41]
    assert plan == parse_plan(json.loads(GOLDEN)) == copy.deepcopy(plan)
    assert plan.model_dump(mode="json", exclude_none=True) == json.loads(GOLDEN)
    # a step-shaped object outside `steps` stays the plain JSON it was
    assert type(plan.provenance["neurons"]) is list and plan.provenance["per_layer"] == [[1, 2], [3]]


def test_a_large_suggested_plan_round_trips_byte_for_byte(tmp_path):
    rng = random.Random(0)
    steps = [{"op": "prune_neurons", "layer": i, "neurons": sorted(rng.sample(range(5000), 1200))} for i in range(6)]
    path = tmp_path / "plan.json"
    parse_plan({"version": 1, "steps": steps}).save(path)
    text = path.read_text()
    assert load_plan(path).to_json() == text
    assert json.loads(text)["steps"] == steps


@pytest.mark.parametrize("bad", [[], [-1], [3, True], ["1"], [1.5], [2**70], [7, 7], None, [[1]]])
def test_bad_index_lists_read_from_a_file_give_the_errors_of_the_plain_decoder(tmp_path, bad):
    doc = {"version": 1, "steps": [{"op": "prune_neurons", "layer": 0, "neurons": bad}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    shape = shape_from_config(_config(2, 96))
    found = []
    for plan_of in (lambda: load_plan(path), lambda: load_plan(path, json.loads(path.read_text()))):
        try:
            resolve_plan(plan_of(), shape)
            found.append(None)
        except PlanError as exc:
            found.append(exc.problems)
    assert found[0] == found[1] and found[0] is not None, found


def test_resolved_neurons_are_ascending_and_kept_neurons_are_their_complement():
    width = 97
    plan = parse_plan({"version": 1, "steps": [
        {"op": "prune_neurons", "layer": 0, "neurons": [90, 5, 6, 0]},
        {"op": "prune_neurons", "layer": 1, "neurons": [1, 2, 96]},
        {"op": "prune_neurons", "layer": 1, "neurons": [2, 50]},  # overlaps the step before: the union counts
    ]})
    res = resolve_plan(plan, shape_from_config(_config(2, width)))
    for cut, removed in zip(res.layers, ({0, 5, 6, 90}, {1, 2, 50, 96})):
        assert list(cut.neurons) == sorted(removed)
        assert cut.kept_neurons == [i for i in range(width) if i not in removed]
        assert cut.result_shape().mlp == width - len(removed) == cut.n_kept_neurons
    with pytest.raises(PlanError, match=r"steps\[0\]\.neurons: removes every MLP neuron of layer 0"):
        resolve_plan(parse_plan({"version": 1, "steps": [
            {"op": "prune_neurons", "layer": 0, "neurons": list(range(width))}]}), shape_from_config(_config(2, width)))


def test_a_large_plan_is_read_and_resolved_without_a_python_int_per_index(tmp_path):
    # As lists of ints (before surgery.indices) this read peaked at ~54 bytes per index and held ~37; resolving
    # added ~60 more (sets). Measured with tracemalloc, so it does not depend on the load of the box.
    layers, width, drop = 8, 40_000, 10_000
    rng = random.Random(0)
    steps = [{"op": "prune_neurons", "layer": i, "neurons": sorted(rng.sample(range(width), drop))}
             for i in range(layers)]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"version": 1, "steps": steps}))
    shape = shape_from_config(_config(layers, width))
    del steps
    n = layers * drop
    tracemalloc.start()
    try:
        plan = load_plan(path)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        resolution = resolve_plan(plan, shape)
        _, resolve_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / n < 12 and peak / n < 32, (held / n, peak / n)
    assert (resolve_peak - held) / n < 8, (resolve_peak - held) / n
    assert resolution.layers[3].n_kept_neurons == width - drop
