from __future__ import annotations

import json

import pytest

from totopatch import environment
from totopatch.environment import VARIABLES, read
from totopatch.patches import PATCHES, by_id

ALL = {p.id: {} for p in PATCHES if p.default} | {"compile-mode": {"compile_mode": "reduce-overhead"}}  # what a plain apply applies


def _listed(ids: list[str]) -> str:
    return ids[0] if len(ids) == 1 else f"{', '.join(ids[:-1])} and {ids[-1]}"


# what the note says of a plain apply's patches, in the registry's order
COMPILED_ONLY = f"{_listed([p for p in ALL if by_id(p).compiled_only])} have no effect at run time"
EAGER = f"{_listed([p for p in ALL if not by_id(p).compiled_only])} do"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def meaning(found: environment.Environment, name: str) -> str:
    return next(v.meaning for v in found.variables if v.name == name)


@pytest.mark.parametrize("env, compile_state, set_by", [
    pytest.param({}, "cuda", None, id="unset-the-loader-compiles-on-cuda"),
    pytest.param({"TOTO_DISABLE_COMPILE": "1"}, "off", "TOTO_DISABLE_COMPILE=1", id="disable"),
    pytest.param({"MARKETSIM_TOTO_DISABLE_COMPILE": "TRUE"}, "off", "MARKETSIM_TOTO_DISABLE_COMPILE=TRUE",
                 id="marketsim-disable-any-case"),
    pytest.param({"TOTO_DISABLE_COMPILE": " Yes "}, "off", "TOTO_DISABLE_COMPILE=' Yes '", id="spaces-are-stripped"),
    pytest.param({"TOTO_DISABLE_COMPILE": "0"}, "cuda", None, id="false-disable-is-the-default"),
    pytest.param({"TOTO_COMPILE": "off"}, "off", "TOTO_COMPILE=off", id="enable-flag-false"),
    pytest.param({"MARKETSIM_TOTO_COMPILE": "on"}, "on", "MARKETSIM_TOTO_COMPILE=on", id="enable-flag-true"),
    pytest.param({"TOTO_DISABLE_COMPILE": "1", "TOTO_COMPILE": "1"}, "off", "TOTO_DISABLE_COMPILE=1",
                 id="disable-wins-over-enable"),
    pytest.param({"TOTO_DISABLE_COMPILE": "no", "TOTO_COMPILE": "1"}, "on", "TOTO_COMPILE=1",
                 id="false-disable-leaves-it-to-enable"),
    pytest.param({"TOTO_DISABLE_COMPILE": "0", "MARKETSIM_TOTO_DISABLE_COMPILE": "1"}, "cuda", None,
                 id="first-recognised-value-of-a-pair-decides"),
    pytest.param({"TOTO_DISABLE_COMPILE": "maybe", "MARKETSIM_TOTO_DISABLE_COMPILE": "1"}, "off",
                 "MARKETSIM_TOTO_DISABLE_COMPILE=1", id="unrecognised-value-is-skipped"),
    pytest.param({"TOTO_COMPILE": ""}, "cuda", None, id="empty-flag-is-ignored"),
])
def test_compile_switches(env, compile_state, set_by) -> None:
    found = read(env, PATCHES, ALL)
    assert (found.compile, found.compile_set_by) == (compile_state, set_by)


def test_disable_names_the_variable_and_what_still_takes_effect() -> None:
    found = read({"TOTO_DISABLE_COMPILE": "1"}, PATCHES, ALL)
    assert found.notes == (f"TOTO_DISABLE_COMPILE=1: Toto runs eager; {COMPILED_ONLY}; {EAGER}",)
    assert meaning(found, "TOTO_DISABLE_COMPILE") == "compile off: Toto runs eager"


def test_a_patch_that_works_eagerly_is_named_only_once_it_is_registered() -> None:
    applied = {k: v for k, v in ALL.items() if k not in ("shared-prefill", "cuda-graphs")}
    (note,) = read({"TOTO_COMPILE": "0"}, PATCHES, applied).notes
    assert note.endswith("; kv-cache, scaler-constant and id-mask-check do; "
                         "shared-prefill and cuda-graphs would, but are not applied")
    unregistered = tuple(p for p in PATCHES if p.id not in ("shared-prefill", "cuda-graphs"))
    (note,) = read({"TOTO_COMPILE": "0"}, unregistered, applied).notes
    assert note.endswith("; kv-cache, scaler-constant and id-mask-check do") and "shared-prefill" not in note
    (note,) = read({"TOTO_COMPILE": "0"}, PATCHES, ALL).notes
    assert note.endswith(f"; {EAGER}")


@pytest.mark.parametrize("value, graphs, meaning_text", [
    pytest.param("0", "off", "CUDA graphs off: one-step forecasts run without them", id="zero"),
    pytest.param(" Off ", "off", "CUDA graphs off: one-step forecasts run without them", id="off-any-case"),
    pytest.param("1", "on", "CUDA graphs on (the default)", id="one"),
    pytest.param("maybe", "on", "not a recognised value (1/true/yes/on or 0/false/no/off): ignored, "
                 "the CUDA graphs stay on", id="unrecognised"),
])
def test_the_cuda_graphs_switch(value: str, graphs: str, meaning_text: str) -> None:
    found = read({"TOTOPATCH_CUDA_GRAPHS": value}, PATCHES, ALL)
    assert found.graphs == graphs and meaning(found, "TOTOPATCH_CUDA_GRAPHS") == meaning_text
    off = [n for n in found.notes if "cuda-graphs is off" in n]
    assert (found.graphs_set_by, off) == ((f"TOTOPATCH_CUDA_GRAPHS={environment.shown_value(value)}", [
        f"TOTOPATCH_CUDA_GRAPHS={environment.shown_value(value)}: cuda-graphs is off at run time; "
        "one-step forecasts run without CUDA graphs"]) if graphs == "off" else (None, []))
    assert any("is not a recognised value" in n for n in found.notes) == (value == "maybe")


def test_the_cuda_graphs_switch_without_the_patch() -> None:
    applied = {k: v for k, v in ALL.items() if k != "cuda-graphs"}
    found = read({"TOTOPATCH_CUDA_GRAPHS": "0"}, PATCHES, applied)
    assert (found.graphs, found.graphs_set_by, found.notes) == ("not applied", None, ())
    assert meaning(found, "TOTOPATCH_CUDA_GRAPHS") == "no effect: cuda-graphs is not applied"
    assert read({}, PATCHES, ALL).graphs == "on"


def test_no_note_when_no_compile_only_patch_is_applied() -> None:
    assert read({"TOTO_DISABLE_COMPILE": "1"}, PATCHES, {"kv-cache": {}}).notes == ()
    assert read({"TOTO_DISABLE_COMPILE": "1"}, PATCHES, {}).notes == ()


def test_mode_variable_overrides_the_patched_default() -> None:
    found = read({"TOTO_COMPILE_MODE": "max-autotune"}, PATCHES, ALL)
    assert found.notes == ("TOTO_COMPILE_MODE=max-autotune overrides the patched default reduce-overhead",)
    assert (found.mode, found.mode_set_by) == ("max-autotune", "TOTO_COMPILE_MODE")


def test_real_mode_variable_is_read_first() -> None:
    found = read({"REAL_TOTO_COMPILE_MODE": "default", "TOTO_COMPILE_MODE": "max-autotune"}, PATCHES, ALL)
    assert found.notes == ("REAL_TOTO_COMPILE_MODE=default overrides the patched default reduce-overhead",)
    assert meaning(found, "TOTO_COMPILE_MODE") == "ignored: REAL_TOTO_COMPILE_MODE is read first"


@pytest.mark.parametrize("env, mode, set_by", [
    pytest.param({}, "reduce-overhead", "compile-mode", id="unset"),
    pytest.param({"REAL_TOTO_COMPILE_MODE": "", "TOTO_COMPILE_MODE": "reduce-overhead"}, "reduce-overhead",
                 "TOTO_COMPILE_MODE", id="empty-counts-as-unset"),
    pytest.param({"TOTO_COMPILE_MODE": "   "}, "reduce-overhead", "compile-mode", id="blank-falls-back-to-the-literal"),
    pytest.param({"TOTO_COMPILE_MODE": "reduce-overhead"}, "reduce-overhead", "TOTO_COMPILE_MODE", id="same-as-patched"),
])
def test_mode_without_an_override_has_no_note(env, mode, set_by) -> None:
    found = read(env, PATCHES, ALL)
    assert found.notes == () and (found.mode, found.mode_set_by) == (mode, set_by)


def test_unknown_mode_is_named() -> None:
    (note,) = read({"TOTO_COMPILE_MODE": "fast"}, PATCHES, ALL).notes
    assert note.startswith("TOTO_COMPILE_MODE=fast overrides the patched default reduce-overhead, and is not a "
                           "torch.compile mode")


def test_mode_override_is_moot_while_compile_is_off() -> None:
    found = read({"TOTO_COMPILE_MODE": "max-autotune", "TOTO_DISABLE_COMPILE": "on"}, PATCHES, ALL)
    assert [n.split(":")[0] for n in found.notes] == ["TOTO_DISABLE_COMPILE=on"]
    assert meaning(found, "TOTO_COMPILE_MODE").endswith("; unused while compile is off")


def test_mode_variable_without_the_compile_mode_patch_has_no_note() -> None:
    found = read({"TOTO_COMPILE_MODE": "max-autotune"}, PATCHES, {"kv-cache": {}})
    assert found.notes == () and meaning(found, "TOTO_COMPILE_MODE").endswith("the backtest's own default")


@pytest.mark.parametrize("value", ["maybe", "", "enabled"])
def test_unrecognised_flag_value_says_it_is_ignored(value) -> None:
    found = read({"TOTO_DISABLE_COMPILE": value}, PATCHES, ALL)
    assert found.compile == "cuda"
    assert found.notes == (f"{environment.shown('TOTO_DISABLE_COMPILE', value)} is not a recognised value "
                           "(1/true/yes/on or 0/false/no/off): the loader ignores it",)
    assert meaning(found, "TOTO_DISABLE_COMPILE").endswith(": ignored")


@pytest.mark.parametrize("name, value, expected", [
    ("TOTO_DISABLE_COMPILE", "0", "does not disable compile"),
    ("TOTO_COMPILE", "1", "compile on, on any device"),
    ("TOTO_COMPILE", "no", "compile off: Toto runs eager"),
])
def test_each_flag_value_has_a_meaning(name, value, expected) -> None:
    assert meaning(read({name: value}, PATCHES, ALL), name) == expected


def test_enable_flag_is_ignored_when_disabled() -> None:
    found = read({"MARKETSIM_TOTO_DISABLE_COMPILE": "1", "TOTO_COMPILE": "1"}, PATCHES, ALL)
    assert meaning(found, "TOTO_COMPILE") == "ignored: MARKETSIM_TOTO_DISABLE_COMPILE=1 disables compile"


# ---------------------------------------------------------------- status and verify


def test_status_notes_the_environment_and_keeps_its_exit_code(project, cli, monkeypatch) -> None:
    assert cli(project, "apply").exit_code == 0
    monkeypatch.setenv("TOTO_DISABLE_COMPILE", "1")
    monkeypatch.setenv("TOTO_COMPILE_MODE", "max-autotune")
    ran = cli(project, "status", "--check")
    assert ran.exit_code == 0
    assert f"note: TOTO_DISABLE_COMPILE=1: Toto runs eager; {COMPILED_ONLY}; {EAGER}" in ran.stdout


def test_status_json_has_a_structured_environment(project, cli, monkeypatch) -> None:
    assert cli(project, "apply").exit_code == 0
    monkeypatch.setenv("TOTO_COMPILE_MODE", "max-autotune")
    data = json.loads(cli(project, "status", "--check", "--json").stdout)
    assert data["exit_code"] == 0
    env = data["environment"]
    assert (env["compile"], env["mode"], env["mode_set_by"]) == ("cuda", "max-autotune", "TOTO_COMPILE_MODE")
    assert {"name": "TOTO_COMPILE_MODE", "value": "max-autotune",
            "meaning": "compile mode max-autotune, overriding the patched default reduce-overhead"} in env["variables"]
    assert env["notes"] == ["TOTO_COMPILE_MODE=max-autotune overrides the patched default reduce-overhead"]
    assert env["notes"][0] in data["notes"]


def test_verify_notes_the_environment_and_a_failing_check_stays_failing(project, cli, monkeypatch) -> None:
    assert cli(project, "apply", "compile-mode", "--compile-mode", "default").exit_code == 0
    monkeypatch.setenv("REAL_TOTO_COMPILE_MODE", "reduce-overhead")
    ran = cli(project, "verify", "compile-mode")
    assert ran.exit_code == 0
    assert "note: REAL_TOTO_COMPILE_MODE=reduce-overhead overrides the patched default default" in ran.stdout
    ran = cli(project, "status", "--check")  # kv-cache and the others are not applied
    assert ran.exit_code == 1


def test_status_without_anything_applied_has_no_environment_note(project, cli, monkeypatch) -> None:
    monkeypatch.setenv("TOTO_DISABLE_COMPILE", "1")
    ran = cli(project, "status")
    assert "TOTO_DISABLE_COMPILE" not in ran.stdout
    assert json.loads(cli(project, "status", "--json").stdout)["environment"]["compile"] == "off"


# ---------------------------------------------------------------- the forecaster's sampling


def sampling(env: dict, applied: dict | None = None) -> environment.Environment:
    return read(env, PATCHES, ALL if applied is None else applied)


@pytest.mark.parametrize("env, recorded, mode, set_by", [
    pytest.param({}, None, "exact", "shared-prefill", id="unset-exact-by-default"),
    pytest.param({}, "same-law", "same-law", "shared-prefill", id="unset-the-recorded-choice"),
    pytest.param({"TOTOPATCH_SAMPLING": ""}, "same-law", "same-law", "shared-prefill", id="empty-counts-as-unset"),
    pytest.param({"TOTOPATCH_SAMPLING": "  "}, "same-law", "same-law", "shared-prefill", id="blank-counts-as-unset"),
    pytest.param({"TOTOPATCH_SAMPLING": "same-law"}, "same-law", "same-law", "TOTOPATCH_SAMPLING=same-law",
                 id="the-same-as-recorded"),
])
def test_sampling_without_an_override_has_no_note(env, recorded, mode, set_by) -> None:
    applied = ALL if recorded is None else {**ALL, "shared-prefill": {"sampling": recorded}}
    found = sampling(env, applied)
    assert (found.sampling, found.sampling_set_by, found.notes) == (mode, set_by, ())


@pytest.mark.parametrize("value, recorded, mode", [
    ("same-law", "exact", "same-law"),
    (" Same-Law ", "exact", "same-law"),
    ("EXACT", "same-law", "exact"),
])
def test_the_sampling_variable_overrides_the_recorded_choice(value, recorded, mode) -> None:
    found = sampling({"TOTOPATCH_SAMPLING": value}, {**ALL, "shared-prefill": {"sampling": recorded}})
    by = environment.shown("TOTOPATCH_SAMPLING", value)
    assert (found.sampling, found.sampling_set_by) == (mode, by)
    (note,) = found.notes
    assert note.startswith(f"{by} overrides the sampling chosen at apply time ({recorded}): forecasts sample {mode} (")
    assert meaning(found, "TOTOPATCH_SAMPLING") == f"sampling {mode}, overriding {recorded} chosen at apply time"


@pytest.mark.parametrize("value", ["samelaw", "fast", "same law", "1"])
def test_an_unrecognised_sampling_is_exact_and_a_note(value) -> None:
    found = sampling({"TOTOPATCH_SAMPLING": value}, {**ALL, "shared-prefill": {"sampling": "same-law"}})
    assert found.sampling == "exact"
    assert found.notes == (f"{environment.shown('TOTOPATCH_SAMPLING', value)} is not a sampling mode (exact, "
                           "same-law): forecasts sample exact, and the forecaster warns once",)
    assert meaning(found, "TOTOPATCH_SAMPLING").startswith("not a sampling mode")


def test_the_sampling_variable_without_shared_prefill_has_no_effect_and_no_note() -> None:
    applied = {k: v for k, v in ALL.items() if k != "shared-prefill"}
    found = sampling({"TOTOPATCH_SAMPLING": "same-law"}, applied)
    assert (found.sampling, found.sampling_set_by, found.notes) == (None, None, ())
    assert meaning(found, "TOTOPATCH_SAMPLING") == "no effect: shared-prefill is not applied"
    assert meaning(sampling({"TOTOPATCH_SAMPLING": "x"}, applied), "TOTOPATCH_SAMPLING").endswith(
        "; no effect while shared-prefill is not applied")


def test_status_and_verify_say_which_sampling_and_what_set_it(project, cli, monkeypatch) -> None:
    assert cli(project, "apply", "--sampling", "same-law").exit_code == 0
    data = json.loads(cli(project, "status", "--check", "--json").stdout)
    assert (data["environment"]["sampling"], data["environment"]["sampling_set_by"]) == ("same-law", "shared-prefill")
    monkeypatch.setenv("TOTOPATCH_SAMPLING", "exact")
    ran = cli(project, "verify", "shared-prefill")
    assert ran.exit_code == 0
    assert ("note: TOTOPATCH_SAMPLING=exact overrides the sampling chosen at apply time (same-law): forecasts "
            "sample exact (upstream's samples for a seed)") in ran.stdout
    monkeypatch.setenv("TOTOPATCH_SAMPLING", "fast")
    data = json.loads(cli(project, "status", "--check", "--json").stdout)
    assert data["exit_code"] == 0 and data["environment"]["sampling"] == "exact"
    assert any(n.startswith("TOTOPATCH_SAMPLING=fast is not a sampling mode") for n in data["notes"])
