"""What the environment of a run makes of the patches: the backtest loader's compile variables, and the
patched forecaster's sampling variable.

Pure: an environment mapping and the patches in effect go in, findings come out.  The loader reads:

- the compile mode from ``REAL_TOTO_COMPILE_MODE``, then ``TOTO_COMPILE_MODE`` (an ``or`` chain, so an
  empty value counts as unset); only when both are unset, or the value is blank, does it use the
  literal that ``compile-mode`` switches;
- whether to compile from two pairs, each read in order, the first recognised value deciding
  (``1/true/yes/on`` or ``0/false/no/off``, any case; anything else is skipped):
  ``TOTO_DISABLE_COMPILE``/``MARKETSIM_TOTO_DISABLE_COMPILE`` turn compile off when true; otherwise
  ``TOTO_COMPILE``/``MARKETSIM_TOTO_COMPILE`` switch it on or off when set; otherwise the loader
  compiles when Toto runs on CUDA.

The forecaster that ``shared-prefill`` patches reads ``TOTOPATCH_SAMPLING`` on every forecast: ``exact``
or ``same-law`` (any case, spaces stripped) overrides the sampling chosen at apply time; an empty or blank
value counts as unset; any other value samples exactly (the forecaster warns once).

And ``cuda-graphs``' switch: ``TOTOPATCH_CUDA_GRAPHS`` set to ``0/false/no/off`` (any case) turns the graph path
off; unset, a true value or a value it does not recognise leaves it on.  The graph path steps aside where Toto
is compiled, so it acts only with compile off (``TOTO_DISABLE_COMPILE=1``) or where Toto runs eagerly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from .patches import COMPILE_MODES, SAMPLING_MODES
from .spec import PatchRef

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")
MODE_VARIABLES = ("REAL_TOTO_COMPILE_MODE", "TOTO_COMPILE_MODE")
DISABLE_VARIABLES = ("TOTO_DISABLE_COMPILE", "MARKETSIM_TOTO_DISABLE_COMPILE")
ENABLE_VARIABLES = ("TOTO_COMPILE", "MARKETSIM_TOTO_COMPILE")
SAMPLING_VARIABLE = "TOTOPATCH_SAMPLING"
GRAPHS_VARIABLE = "TOTOPATCH_CUDA_GRAPHS"
VARIABLES = MODE_VARIABLES + DISABLE_VARIABLES + ENABLE_VARIABLES + (SAMPLING_VARIABLE, GRAPHS_VARIABLE)
# a patch option -> the variables that replace it at run time
OVERRIDDEN_BY = {"compile_mode": MODE_VARIABLES, "sampling": (SAMPLING_VARIABLE,)}
SAMPLING_PATCH = "shared-prefill"
FALLBACK_SAMPLING = "exact"  # what the forecaster does with a value it does not recognise
GRAPHS_PATCH = "cuda-graphs"
IN_EFFECT_STATES = ("applied", "outdated", "drifted", "applied-unrecorded")  # the patched code is in the file
_FLAG_VALUES = "/".join(TRUE_VALUES) + " or " + "/".join(FALSE_VALUES)


@dataclass(frozen=True)
class Variable:
    name: str
    value: str | None  # None: unset
    meaning: str


@dataclass(frozen=True)
class Environment:
    compile: str  # "on", "off", or "cuda" (the loader's default: compile when Toto runs on CUDA)
    compile_set_by: str | None  # "NAME=value" of the deciding variable; None for the default
    mode: str | None  # the compile mode the loader uses; None: the backtest's own literal, not known here
    mode_set_by: str | None  # the variable that sets it; None for the script's literal
    sampling: str | None  # "exact" or "same-law"; None: shared-prefill is not in effect (upstream's sampler)
    sampling_set_by: str | None  # "TOTOPATCH_SAMPLING=value", or "shared-prefill" (chosen at apply time)
    variables: tuple[Variable, ...]
    notes: tuple[str, ...]
    graphs: str = "not applied"  # cuda-graphs at run time: "on", "off" or "not applied"
    graphs_set_by: str | None = None  # "TOTOPATCH_CUDA_GRAPHS=value" where that variable turns it off

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def flag(value: str) -> bool | None:
    """The loader's reading of one flag value; None for a value it does not recognise."""
    lowered = value.strip().lower()
    return True if lowered in TRUE_VALUES else False if lowered in FALSE_VALUES else None


def read(env: Mapping[str, str], patches: Sequence[PatchRef],
         in_effect: Mapping[str, Mapping[str, str]]) -> Environment:
    """``in_effect`` maps the id of each patch whose code is in the tree to the options it was applied with."""
    compile_state, compile_by = _compile(env)
    patched_mode = _patched(patches, in_effect, "compile_mode")
    mode_var = next((n for n in MODE_VARIABLES if env.get(n)), None)
    mode = env[mode_var].strip() if mode_var else ""
    patched_sampling = _patched(patches, in_effect, "sampling")
    sampling, sampling_by, sampling_note = _sampling(env, patched_sampling)
    graphs, graphs_by = _graphs(env, in_effect)
    variables = tuple(_sampling_meaning(env, patched_sampling) if name == SAMPLING_VARIABLE else
                      _meaning(env, name, compile_state, compile_by, mode_var, patched_mode, graphs) for name in VARIABLES)
    notes = _flag_notes(env) + _off_note(compile_state, compile_by, patches, in_effect)
    if compile_state != "off" and mode_var and patched_mode and mode and mode != patched_mode:
        notes += (f"{shown(mode_var, env[mode_var])} overrides the patched default {patched_mode}" + _bad_mode(mode),)
    notes += sampling_note
    if graphs_by:
        notes += (f"{graphs_by}: {GRAPHS_PATCH} is off at run time; one-step forecasts run without CUDA graphs",)
    return Environment(compile_state, compile_by, mode or patched_mode, mode_var if mode else
                       ("compile-mode" if patched_mode else None), sampling, sampling_by, variables, notes, graphs,
                       graphs_by)


def _graphs(env: Mapping[str, str], in_effect: Mapping[str, Mapping[str, str]]) -> tuple[str, str | None]:
    """cuda-graphs at run time ("on", "off", "not applied") and the variable that turns it off, if any."""
    if GRAPHS_PATCH not in in_effect:
        return "not applied", None
    value = env.get(GRAPHS_VARIABLE)
    if value is not None and flag(value) is False:
        return "off", shown(GRAPHS_VARIABLE, value)
    return "on", None


def _compile(env: Mapping[str, str]) -> tuple[str, str | None]:
    disabled_by, disabled = _first_flag(env, DISABLE_VARIABLES)
    if disabled:
        return "off", shown(disabled_by, env[disabled_by])
    enabled_by, enabled = _first_flag(env, ENABLE_VARIABLES)
    if enabled_by is not None:
        return ("on" if enabled else "off"), shown(enabled_by, env[enabled_by])
    return "cuda", None


def _first_flag(env: Mapping[str, str], names: Sequence[str]) -> tuple[str | None, bool | None]:
    for name in names:
        if name in env and flag(env[name]) is not None:
            return name, flag(env[name])
    return None, None


def _patched(patches: Sequence[PatchRef], in_effect: Mapping[str, Mapping[str, str]], option: str) -> str | None:
    """The value a patch in effect set for ``option`` (its declared default where none was recorded), if any."""
    for ref in patches:
        if ref.env_option == option and ref.id in in_effect:
            return in_effect[ref.id].get(option, ref.options.get(option))
    return None


def _sampling(env: Mapping[str, str], patched: str | None) -> tuple[str | None, str | None, tuple[str, ...]]:
    """The sampling forecasts use, what set it, and a note where the environment changes it."""
    if patched is None:
        return None, None, ()
    value = env.get(SAMPLING_VARIABLE, "")
    wanted = value.strip().lower()
    if not wanted:
        return patched, SAMPLING_PATCH, ()
    by = shown(SAMPLING_VARIABLE, value)
    if wanted not in SAMPLING_MODES:
        return FALLBACK_SAMPLING, by, (f"{by} is not a sampling mode ({', '.join(SAMPLING_MODES)}): forecasts "
                                       f"sample {FALLBACK_SAMPLING}, and the forecaster warns once",)
    if wanted == patched:
        return wanted, by, ()
    return wanted, by, (f"{by} overrides the sampling chosen at apply time ({patched}): forecasts sample "
                        f"{wanted}{_SAMPLING_WORDS[wanted]}",)


_SAMPLING_WORDS = {"exact": " (upstream's samples for a seed)",
                   "same-law": " (upstream's distribution, not its samples for a seed)"}


def _sampling_meaning(env: Mapping[str, str], patched: str | None) -> Variable:
    value = env.get(SAMPLING_VARIABLE)
    if value is None:
        return Variable(SAMPLING_VARIABLE, None, "unset")
    wanted = value.strip().lower()
    if not wanted:
        text = ("empty: counts as unset" if not value else "blank: counts as unset")
    elif wanted not in SAMPLING_MODES:
        text = f"not a sampling mode ({', '.join(SAMPLING_MODES)}): the forecaster samples {FALLBACK_SAMPLING}"
    elif patched is None:
        return Variable(SAMPLING_VARIABLE, value, f"no effect: {SAMPLING_PATCH} is not applied")
    elif wanted == patched:
        text = f"sampling {wanted}, the same as chosen at apply time"
    else:
        text = f"sampling {wanted}, overriding {patched} chosen at apply time"
    if patched is None:
        text += f"; no effect while {SAMPLING_PATCH} is not applied"
    return Variable(SAMPLING_VARIABLE, value, text)


def _off_note(state: str, by: str | None, patches: Sequence[PatchRef],
              in_effect: Mapping[str, Mapping[str, str]]) -> tuple[str, ...]:
    idle = [p.id for p in patches if p.compiled_only and p.id in in_effect]
    if state != "off" or not idle:
        return ()
    note = f"{by}: Toto runs eager; {join(idle)} {'have' if len(idle) > 1 else 'has'} no effect at run time"
    eager = [p.id for p in patches if not p.compiled_only]
    live = [i for i in eager if i in in_effect]
    dormant = [i for i in eager if i not in in_effect]
    if live:
        note += f"; {join(live)} {'do' if len(live) > 1 else 'does'}"
    if dormant:
        note += f"; {join(dormant)} would, but {'are' if len(dormant) > 1 else 'is'} not applied"
    return (note,)


def shown(name: str, value: str) -> str:
    return f"{name}={shown_value(value)}"


def shown_value(value: str) -> str:
    """The value as is, or quoted when it is empty or has surrounding spaces."""
    return value if value and value == value.strip() else repr(value)


def _flag_notes(env: Mapping[str, str]) -> tuple[str, ...]:
    notes = tuple(f"{shown(name, env[name])} is not a recognised value ({_FLAG_VALUES}): the loader ignores it"
                  for name in DISABLE_VARIABLES + ENABLE_VARIABLES if name in env and flag(env[name]) is None)
    value = env.get(GRAPHS_VARIABLE)
    if value and flag(value) is None:
        notes += (f"{shown(GRAPHS_VARIABLE, value)} is not a recognised value ({_FLAG_VALUES}): "
                  "the CUDA graphs stay on",)
    return notes


def _bad_mode(mode: str) -> str:
    if mode in COMPILE_MODES:
        return ""
    return f", and is not a torch.compile mode ({', '.join(COMPILE_MODES)}): torch.compile rejects it"


def _meaning(env: Mapping[str, str], name: str, compile_state: str, compile_by: str | None,
             mode_var: str | None, patched_mode: str | None, graphs: str) -> Variable:
    value = env.get(name)
    if value is None:
        return Variable(name, None, "unset")
    if name == GRAPHS_VARIABLE:
        return Variable(name, value, _graphs_meaning(value, graphs))
    if name in MODE_VARIABLES:
        return Variable(name, value, _mode_meaning(name, value, compile_state, mode_var, patched_mode))
    pair = DISABLE_VARIABLES if name in DISABLE_VARIABLES else ENABLE_VARIABLES
    return Variable(name, value, _flag_meaning(env, name, pair, compile_state, compile_by))


def _mode_meaning(name: str, value: str, compile_state: str, mode_var: str | None, patched: str | None) -> str:
    default = f"the patched default {patched}" if patched else "the backtest's own default"
    if not value:
        return "empty: counts as unset"
    if name != mode_var:
        return f"ignored: {mode_var} is read first"
    mode = value.strip()
    if not mode:
        text = f"blank: the loader falls back to {default}"
    elif mode not in COMPILE_MODES:
        text = f"not a torch.compile mode ({', '.join(COMPILE_MODES)}): torch.compile rejects it"
    elif mode == patched:
        text = f"compile mode {mode}, the same as the patched default"
    else:
        text = f"compile mode {mode}, overriding {default}"
    return text + ("; unused while compile is off" if compile_state == "off" else "")


def _flag_meaning(env: Mapping[str, str], name: str, pair: Sequence[str], compile_state: str,
                  compile_by: str | None) -> str:
    value = env[name]
    reading = flag(value)
    if reading is None:
        return f"not a recognised value ({_FLAG_VALUES}): ignored"
    decider, _ = _first_flag(env, pair)
    if decider != name:
        return f"ignored: {shown(decider, env[decider])} is read first"  # type: ignore[arg-type,index]
    if pair is DISABLE_VARIABLES:
        return "compile off: Toto runs eager" if reading else "does not disable compile"
    if compile_by is not None and compile_by.split("=", 1)[0] in DISABLE_VARIABLES:
        return f"ignored: {compile_by} disables compile"
    return "compile on, on any device" if reading else "compile off: Toto runs eager"


def join(ids: Sequence[str]) -> str:
    return ids[0] if len(ids) == 1 else f"{', '.join(ids[:-1])} and {ids[-1]}"


def _graphs_meaning(value: str, graphs: str) -> str:
    reading = flag(value)
    if graphs == "not applied":
        return f"no effect: {GRAPHS_PATCH} is not applied"
    if reading is None:
        return f"not a recognised value ({_FLAG_VALUES}): ignored, the CUDA graphs stay on"
    return "CUDA graphs on (the default)" if reading else "CUDA graphs off: one-step forecasts run without them"
