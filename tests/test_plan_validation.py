"""Plan files: parsing, canonical JSON, and validation against a model reporting every problem at once."""

from __future__ import annotations

import json

import pytest

from surgery.errors import PlanError
from surgery.plan import Plan, load_plan, parse_plan, plan_json_schema
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from tiny_models import make_config

SMOL = {  # SmolLM2-135M's shapes, as config.json says them
    "model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
    "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49152, "head_dim": 64,
    "tie_word_embeddings": True,
}


def validate(steps):
    return resolve_plan(parse_plan({"version": 1, "steps": steps}), shape_from_config(SMOL))


def problems(steps) -> list[str]:
    with pytest.raises(PlanError) as info:
        validate(steps)
    return info.value.problems


def test_issue_example_plan_is_accepted_and_resolved():
    res = validate([
        {"op": "prune_heads", "layer": 4, "heads": [0, 3, 6]},
        {"op": "prune_kv_groups", "layer": 7, "groups": [2]},
        {"op": "prune_neurons", "layer": 4, "neurons": [5, 17, 200]},
        {"op": "drop_layers", "layers": [28, 29]},
        {"op": "drop_attention", "layer": 12},
        {"op": "drop_mlp", "layer": 13},
        {"op": "low_rank", "module": "model.layers.5.mlp.down_proj", "rank": 128},
    ])
    shapes = res.result_shapes()
    assert len(shapes) == 28
    assert (shapes[4].heads, shapes[4].kv_heads, shapes[4].mlp) == (6, 3, 1533)
    assert (shapes[7].heads, shapes[7].kv_heads) == (6, 2)
    assert shapes[12].heads == 0 and shapes[13].mlp == 0
    assert shapes[5].low_rank == {"mlp.down_proj": 128}


def test_out_of_range_head_names_step_field_and_layer_size():
    assert problems([{"op": "prune_heads", "layer": 5, "heads": [12]}]) == [
        "steps[0].heads: query head 12 out of range (layer 5 has 9 query heads)"
    ]


def test_every_problem_is_reported_at_once():
    found = problems([
        {"op": "prune_heads", "layer": 40, "heads": [0]},
        {"op": "prune_neurons", "layer": 1, "neurons": [1536, 3, 3]},
        {"op": "low_rank", "module": "model.layers.2.mlp.down_proj", "rank": 999},
        {"op": "low_rank", "module": "lm_head", "rank": 8},
    ])
    assert len(found) == 5, found
    assert found[0].startswith("steps[0].layer: layer 40 out of range (the model has 30 layers)")
    assert "steps[1].neurons: neuron 1536 out of range" in found[1]
    assert "steps[1].neurons: neuron 3 listed twice" in found[2]
    assert any(p.startswith("steps[3].module: 'lm_head' is not a decoder-layer Linear") for p in found)
    assert any(p.startswith("steps[2].rank: rank 999 exceeds min(out, in) = 576") for p in found)


def test_gqa_violation_says_which_group_and_what_is_legal():
    (msg,) = problems([{"op": "prune_heads", "layer": 3, "heads": [0, 1, 3]}])
    assert msg.startswith("steps[0].heads: layer 3 breaks the GQA rule")
    assert "group 0 keeps 1" in msg and "group 1 keeps 2" in msg and "group 2 keeps 3" in msg
    assert "prune_kv_groups" in msg


def test_removing_a_whole_group_by_heads_is_legal():
    res = validate([{"op": "prune_heads", "layer": 3, "heads": [0, 1, 2]}])
    assert (res.result_shapes()[3].heads, res.result_shapes()[3].kv_heads) == (6, 2)


def test_steps_combine_in_any_order():
    a = validate([{"op": "prune_heads", "layer": 2, "heads": [0]}, {"op": "prune_heads", "layer": 2, "heads": [3, 6]}])
    b = validate([{"op": "prune_heads", "layer": 2, "heads": [6, 3]}, {"op": "prune_heads", "layer": 2, "heads": [0]}])
    assert a.result_shapes() == b.result_shapes()


def test_removing_every_head_suggests_drop_attention():
    (msg,) = problems([{"op": "prune_kv_groups", "layer": 1, "groups": [0, 1, 2]}])
    assert "removes every query head of layer 1; use drop_attention instead" in msg


def test_removing_every_neuron_suggests_drop_mlp():
    (msg,) = problems([{"op": "prune_neurons", "layer": 1, "neurons": list(range(1536))}])
    assert "use drop_mlp instead" in msg


def test_dropping_every_layer_is_refused():
    assert problems([{"op": "drop_layers", "layers": list(range(30))}]) == [
        "steps: the plan drops every layer of the model"
    ]


def test_low_rank_above_break_even_warns():
    res = validate([{"op": "low_rank", "module": "model.layers.0.self_attn.q_proj", "rank": 400}])
    assert any("does not reduce parameters" in w for w in res.warnings)


def test_unknown_fields_and_ops_are_errors():
    with pytest.raises(PlanError) as info:
        parse_plan({"version": 1, "steps": [{"op": "prune_heads", "layer": 1, "heads": [0], "haeds": [1]},
                                            {"op": "prune_head", "layer": 1}], "extra": 1})
    assert "steps[0].haeds: unknown field" in info.value.problems
    assert any(p.startswith("steps[1]: unknown op 'prune_head'") for p in info.value.problems)
    assert "extra: unknown field" in info.value.problems


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"version": 1,\n "steps": [}\n')
    with pytest.raises(PlanError, match=r"malformed JSON at line 2 column 12"):
        load_plan(path)


def test_canonical_json_roundtrips_with_sorted_keys(tmp_path):
    plan = parse_plan({"steps": [{"rank": 4, "op": "low_rank", "module": "model.layers.0.mlp.up_proj"}],
                       "model": {"source": "x", "fingerprint": "sha256:00"}, "version": 1})
    path = tmp_path / "p.json"
    plan.save(path)
    text = path.read_text()
    assert json.loads(text) == json.loads(plan.to_json())
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert load_plan(path) == plan


def test_json_schema_forbids_extra_fields():
    schema = plan_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["$defs"]) >= {"PruneHeads", "LowRank", "ModelRef"}


def test_plan_without_model_block_is_accepted():
    assert parse_plan({"version": 1, "steps": []}).model is None
    assert Plan().version == 1


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_fused_families_validate_against_their_config(family):
    shape = shape_from_config(make_config(family).to_dict())
    res = resolve_plan(parse_plan({"version": 1, "steps": [{"op": "prune_neurons", "layer": 0, "neurons": [1]}]}),
                       shape)
    assert res.result_shapes()[0].mlp == 95


def test_cuts_inside_a_dropped_layer_are_a_warning_not_a_gqa_violation():
    res = validate([{"op": "drop_layers", "layers": [3]}, {"op": "prune_heads", "layer": 3, "heads": [0]}])
    assert any("layer 3: dropped" in w for w in res.warnings)


def test_plan_validate_reports_schema_and_model_problems_together_in_file_order(tmp_path, capsys):
    from cli_helpers import call
    from tiny_models import make_model

    make_model("llama").save_pretrained(tmp_path / "tiny")
    plan_file = tmp_path / "bad.json"
    plan_file.write_text(json.dumps({"version": 1, "model": {"source": str(tmp_path / "tiny")}, "steps": [
        {"op": "prune_neurons", "layer": 7, "neurons": [1]},          # model: layer out of range
        {"op": "prune_heads", "layer": 0, "heads": [0], "typo": 1},    # schema: unknown field
        {"op": "prune_heads", "layer": 2, "heads": [1]},               # model: GQA rule
        {"op": "low_rank", "module": "model.layers.2.mlp.down_proj", "rank": 0},  # schema: rank >= 1
    ]}))
    code, out, err = call(capsys, "plan", "validate", plan_file, "--json")
    assert code == 2
    report = json.loads(out)
    assert report["valid"] is False
    assert [p.split(": ")[1].split(".")[0] for p in report["problems"]] == [
        "steps[0]", "steps[1]", "steps[2]", "steps[3]"]
    assert "GQA" in report["problems"][2] and "unknown field" in report["problems"][1]
    assert err.count("error: ") == 4
