"""The typed stage file: reading 1.0 and 1.1 files, validation errors, the boundary questions, the writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evotool.errors import StageFileError
from evotool.stages import StageFile, write_stages
from evotool.stages.file import SCHEMA_VERSION

BASE = {"model": "m", "fingerprint": "abcd", "num_layers": 12, "critical_layer": 4, "mutation_layers": [10, 11],
        "stages": {"rapid_evolution": [0, 4], "stabilization": [5, 9], "mutation": [10, 12]}}


def dump(tmp_path: Path, payload: object, name: str = "stages.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return path


def test_schema_1_0_file_reads_with_empty_flags_and_answers(tmp_path: Path) -> None:
    st = StageFile.read(dump(tmp_path, {"schema_version": "1.0", **BASE, "curves": {"x": 1}}).parent)  # a run dir
    assert (st.critical, st.mutation, st.stable_range, st.last_stable) == (4, 10, (5, 9), 9)
    assert st.flags == [] and st.payload["curves"] == {"x": 1}
    assert st.stage_layers("mutation") == [10, 11, 12] and st.stage_layers("stabilization") == [5, 6, 7, 8, 9]
    assert st.boundaries() == {k: BASE[k] for k in ("critical_layer", "mutation_layers", "stages")}


def test_writer_bumps_to_1_1_and_keeps_flags(tmp_path: Path) -> None:
    path = tmp_path / "out" / "stages.json"
    written = write_stages(path, {**BASE, "flags": ["short_stable_stage"], "samples": 3})
    on_disk = json.loads(path.read_text())
    assert next(iter(on_disk)) == "schema_version" and on_disk["schema_version"] == SCHEMA_VERSION
    assert StageFile.read(path) == written and written.flags == ["short_stable_stage"]
    assert write_stages(path, BASE).flags == [] and json.loads(path.read_text())["flags"] == []


def test_degenerate_boundaries(tmp_path: Path) -> None:
    none = StageFile.from_payload({"schema_version": "1.1", **BASE, "critical_layer": None, "mutation_layers": [],
                                   "stages": {"rapid_evolution": [0, 12], "stabilization": None, "mutation": None}})
    assert none.mutation is None and none.stage_layers("mutation") == []
    for question in ("critical", "stable_range", "last_stable"):
        with pytest.raises(StageFileError, match="no critical layer"):
            getattr(none, question)
    # critical layer directly followed by the mutation stage: no stabilization stage, last stable = critical
    tight = StageFile.from_payload({"schema_version": "1.1", **BASE, "mutation_layers": [5],
                                    "stages": {"rapid_evolution": [0, 4], "stabilization": None, "mutation": [5, 12]}})
    assert tight.last_stable == 4
    with pytest.raises(StageFileError, match="no stabilization stage"):
        tight.stable_range


@pytest.mark.parametrize("change, message", [
    ({"schema_version": "2.0"}, "schema version 2.0"),
    ({"critical_layer": 13}, "critical_layer must be a layer index in 0..12"),
    ({"critical_layer": "4"}, "critical_layer must be a layer index"),
    ({"mutation_layers": None}, "mutation_layers must be a list"),
    ({"mutation_layers": [True]}, "mutation_layers must be a layer index"),
    ({"num_layers": 0}, "num_layers must be a positive integer"),
    ({"stages": {"rapid_evolution": [0, 4]}}, "stages must be exactly"),
    ({"stages": {**BASE["stages"], "mutation": [12, 10]}}, "stage mutation [12, 10] is empty"),
    ({"stages": {**BASE["stages"], "mutation": 10}}, "stage mutation must be [first, last] or null"),
    ({"flags": "short"}, "flags must be a list of strings"),
    ({"fingerprint": None}, "fingerprint must be a string"),
])
def test_malformed_files_name_the_problem(tmp_path: Path, change: dict, message: str) -> None:
    path = dump(tmp_path, {"schema_version": "1.1", **BASE, **change})
    with pytest.raises(StageFileError, match=f"{path}: .*{message}".replace("[", r"\[").replace("]", r"\]")):
        StageFile.read(path)


def test_missing_null_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(StageFileError, match="stage file not found"):
        StageFile.read(tmp_path / "none.json")
    with pytest.raises(StageFileError, match="expected a JSON object"):
        StageFile.read(dump(tmp_path, None))
    with pytest.raises(StageFileError, match=r"missing keys \['num_layers'\]"):
        StageFile.read(dump(tmp_path, {"schema_version": "1.0", **{k: v for k, v in BASE.items() if k != "num_layers"}}))
    with pytest.raises(StageFileError, match="belongs to another model"):
        StageFile.read(dump(tmp_path, {"schema_version": "1.1", **BASE}), fingerprint="ffff")


def test_for_model_checks_fingerprint_and_depth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import build_tiny

    from evotool.models.loading import fingerprint

    model = build_tiny("llava", layers=4)
    ok = dump(tmp_path, {"schema_version": "1.1", **BASE, "fingerprint": fingerprint(model), "num_layers": 4,
                         "critical_layer": 1, "mutation_layers": [],
                         "stages": {"rapid_evolution": [0, 1], "stabilization": [2, 4], "mutation": None}}, "ok.json")
    assert StageFile.for_model(ok, model).stable_range == (2, 4)
    assert capsys.readouterr().err == ""
    flagged = dump(tmp_path, {**json.loads(ok.read_text()), "flags": ["short_stable_stage", "future_flag"]}, "flagged.json")
    StageFile.for_model(flagged, model)  # commands acting on flagged boundaries say so, one line per flag
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {flagged}: short_stable_stage: the stabilization stage is a single layer; stable-stage pruning "
        "and readouts have little room", f"warning: {flagged}: future_flag"]
    deep = dump(tmp_path, {"schema_version": "1.1", **BASE, "fingerprint": fingerprint(model)}, "deep.json")
    with pytest.raises(StageFileError, match="describes 12 layers, the model has 4"):
        StageFile.for_model(deep, model)
