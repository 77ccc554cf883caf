import copy
import json

import pytest

from memfit.plan.errors import PlanValidationError
from memfit.plan.plan_format import FORMAT, Placement, Plan
from memfit.plan.validate import load_plan, plan_traffic, validate
from tests.plan.graphs import order_matters


def good_plan() -> Plan:
    # order b, a, c, d with a spill of Y (8 bytes) around step 2; scratchpad 21 bytes
    g = order_matters()
    pl = [
        Placement("x", 0, 0, 1),    # loaded once, kept for b and a
        Placement("Y", 1, 0, 1),    # produced by b at step 0, spilled at end of step 1
        Placement("X", 11, 1, 2),   # produced by a
        Placement("X2", 0, 2, 3),   # produced by c at step 2
        Placement("Y", 10, 3, 3),   # reloaded for d
        Placement("out", 18, 3, 3),  # produced by d, stored (compulsory)
    ]
    return Plan(g, 21, ["b", "a", "c", "d"], pl)


def test_traffic_of_a_valid_plan():
    tr = validate(good_plan())
    assert tr["compulsory_bytes"] == 1 + 1  # x loaded once, out stored once
    assert tr["load_bytes"] == 1 + 8
    assert tr["store_bytes"] == 8 + 1
    assert tr["non_compulsory_bytes"] == 16  # Y stored and loaded back
    assert tr["spill_bytes"] == 8 and tr["reload_bytes"] == 8


def test_json_round_trip_and_stored_traffic(tmp_path):
    p = good_plan()
    p.traffic = plan_traffic(p)
    path = tmp_path / "p.json"
    p.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["scratchpad_bytes"] == 21
    assert {t["name"]: t["kind"] for t in data["tensors"]}["out"] == "output"
    assert load_plan(path).traffic["non_compulsory_bytes"] == 16
    data["traffic"]["non_compulsory_bytes"] = 0  # a lie about traffic is caught
    path.write_text(json.dumps(data))
    with pytest.raises(PlanValidationError, match="stored traffic"):
        load_plan(path)


def _broken(mutate) -> str:
    p = good_plan()
    mutate(p)
    with pytest.raises(PlanValidationError) as info:
        validate(p)
    return str(info.value)


def test_detects_address_overlap():
    def m(p): p.placements[2] = Placement("X", 5, 1, 2)  # overlaps Y [1, 9) at step 1
    assert "overlaps" in _broken(m)


def test_detects_missing_residency():
    def m(p): p.placements[4] = Placement("Y", 10, 2, 2)  # Y not resident at step 3 where d reads it
    assert "not resident at step 3" in _broken(m)


def test_detects_non_topological_order():
    def m(p): p.order = ["b", "c", "a", "d"]
    assert "not topological" in _broken(m)


def test_detects_outside_scratchpad():
    def m(p): p.scratchpad_bytes = 20  # out at [18, 19) fine, but X at [11, 21) is not
    assert "outside [0, 20)" in _broken(m)


def test_detects_placement_before_producer():
    def m(p): p.placements[3] = Placement("X2", 0, 1, 3)  # c runs at step 2
    msg = _broken(m)
    assert "before its producer" in msg


def test_detects_overlapping_placements_of_one_tensor():
    def m(p): p.placements.append(Placement("x", 19, 1, 1))
    assert "overlapping placements" in _broken(m)


def test_detects_graph_inconsistency():
    def m(p): p.graph.tensor["Y"].consumers = []
    assert "consumers" in _broken(m)


def test_bad_json_structure(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "other", "tensors": []}))
    with pytest.raises(PlanValidationError, match="format"):
        load_plan(path)
    path.write_text("{not json")
    with pytest.raises(PlanValidationError, match="cannot read"):
        load_plan(path)
    data = good_plan().to_dict()
    data["placements"][0] = {"tensor": "x", "offset": "0"}
    path.write_text(json.dumps(data))
    with pytest.raises(PlanValidationError, match="integer"):
        load_plan(path)


def test_to_dict_does_not_alias():
    p = good_plan()
    d = copy.deepcopy(p.to_dict())
    assert Plan.from_dict(d).to_dict() == p.to_dict()


@pytest.fixture(scope="module")
def made_plan(tmp_path_factory) -> dict:
    """A plan as `memfit plan --out` writes it (bert_tiny_encoder, the fast baseline planner)."""
    from memfit.cli import main

    out = tmp_path_factory.mktemp("plan") / "p.json"
    assert main(["plan", "--model", "bert_tiny_encoder", "--planner", "baseline-topo", "--out", str(out),
                 "--no-progress", "--json"]) == 0
    data = json.loads(out.read_text())
    assert data["solver"] and data["traffic"]  # what the mutations below break
    return data


def _set(path, value):
    def mutate(d):
        *keys, last = path
        for k in keys:
            d = d[k]
        d[last] = value
    return mutate


@pytest.mark.parametrize("mutate, words", [
    (_set(["order", 0], None), "order[0] must be an op name"),                      # was TypeError '<'
    (_set(["solver"], {}), "'solver' needs 'status'"),                                # was SolverInfo's TypeError
    (_set(["solver", "extra"], 1), "unknown field 'extra'"),
    (_set(["solver", "time_s"], "fast"), "'solver.time_s' must be a number"),
    (_set(["solver"], "x"), "'solver' must be an object"),
    (_set(["traffic"], []), "'traffic' must be an object"),                           # was AttributeError 'items'
    (_set(["traffic", "load_bytes"], "many"), "'traffic' must be an object"),
    (_set(["tensors", 0, "consumers"], [{}]), "tensors[0] needs"),                    # was unhashable dict
    (_set(["tensors", 0, "producer"], []), "tensors[0] needs"),
    (_set(["tensors", 0, "kind"], None), "tensors[0] needs"),                         # was KeyError on a missing kind
    (_set(["ops", 0, "inputs"], [None]), "ops[0] needs"),
    (_set(["model"], 7), "'model' must be a string"),
])
def test_malformed_plan_files_are_listed_not_crashed_on(made_plan, mutate, words, tmp_path, capsys):
    from memfit.cli import main

    data = copy.deepcopy(made_plan)
    mutate(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    assert main(["plan", "validate", str(path), "--json"]) == 2
    out, err = capsys.readouterr()
    assert words in json.loads(out)["error"] and "Traceback" not in err


def test_the_generated_plan_is_valid_and_solver_may_be_left_out(made_plan, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(made_plan))
    assert load_plan(path).solver.status == made_plan["solver"]["status"]
    path.write_text(json.dumps({k: v for k, v in made_plan.items() if k not in ("solver", "traffic")}))
    assert load_plan(path).solver is None


def test_a_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    """A binary file (a PNG given for the plan) was a UnicodeDecodeError traceback."""
    from memfit.cli import main

    path = tmp_path / "plan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(PlanValidationError, match="not UTF-8"):
        load_plan(path)
    assert main(["plan", "validate", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
