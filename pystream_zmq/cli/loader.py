"""``MODULE:ATTR`` references: import them, build objects from them, and find the reference
of an object (so a pipeline defined in Python can be written out as a Procfile)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from pystream_zmq.errors import PyStreamError


class LoadError(PyStreamError):
    """A ``MODULE:ATTR`` reference cannot be imported, or its object cannot be used."""


def load(ref: str) -> Any:
    """The object ``ATTR`` (dots allowed) of module ``MODULE``."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"{ref!r} is not MODULE:ATTR (for example services.demo:DummyStage)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise LoadError(f"cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # the module itself raised while importing
        raise LoadError(f"importing module {module_name!r} failed: {e!r}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise LoadError(f"module {module_name!r} has no attribute {attr!r}") from e
    return obj


def build(
    obj: Any, params: dict[str, Any], *, factory: bool = False, iterable: bool = False
) -> Any:
    """A class is constructed with ``params``, a factory (``factory=True``) called with them;
    anything else is used as it is and takes no params. What is built must be callable, or
    with ``iterable`` (a source) iterable."""
    if not callable(obj):
        raise LoadError(f"{_describe(obj)} is not callable")
    if not (isinstance(obj, type) or factory):
        if params:
            raise LoadError(
                f"{_describe(obj)} takes no params: it is neither a class nor a factory (--factory)"
            )
        return obj
    try:
        built = obj(**params)
    except Exception as e:
        args = ", ".join(f"{key}={value!r}" for key, value in params.items())
        raise LoadError(f"{_describe(obj)}({args}) failed: {type(e).__name__}: {e}") from e
    if not (callable(built) or (iterable and isinstance(built, Iterable))):
        what = "callable nor iterable" if iterable else "callable"
        raise LoadError(f"{_describe(obj)} returned {_describe(built)}, which is not {what}")
    return built


def parse_params(pairs: tuple[str, ...], params_json: str | None) -> dict[str, Any]:
    """``--params '{"k": 1}'`` then ``--param k=v`` pairs on top; a value is JSON if it
    parses as JSON, else a string."""
    params: dict[str, Any] = {}
    if params_json:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"--params is not valid JSON: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError("--params must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--param {pair!r} is not NAME=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def reference(obj: Any) -> tuple[str, dict[str, Any]]:
    """``(MODULE:ATTR, params)`` that rebuild ``obj`` with ``build``: a module-level
    function or class as it is; an instance from its class, with each ``__init__``
    argument read from the attribute of the same name (the scikit-learn convention)."""
    target = obj if inspect.isfunction(obj) or isinstance(obj, type) else type(obj)
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    ref = f"{module}:{name}"
    if module == "__main__" or "<" in name:
        raise LoadError(
            f"{ref} cannot be imported by name: define it at the top level of an importable module"
        )
    if load(ref) is not target:
        raise LoadError(f"{ref} does not name {_describe(obj)}")
    if target is obj:
        return ref, {}
    params: dict[str, Any] = {}
    for arg in list(inspect.signature(target).parameters.values()):
        if arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD):
            continue
        if hasattr(obj, arg.name):
            value = getattr(obj, arg.name)
            if arg.default is arg.empty or value != arg.default:
                params[arg.name] = value
        elif arg.default is arg.empty:
            raise LoadError(
                f"cannot tell how to rebuild {_describe(obj)}: it has no "
                f"attribute {arg.name!r} for the __init__ argument of that name"
            )
    try:
        json.dumps(params)
    except TypeError as e:
        raise LoadError(f"the params of {_describe(obj)} are not JSON: {e}") from e
    return ref, params


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None)
    return name if isinstance(name, str) else f"an object of type {type(obj).__name__}"


def default_name(obj: Any, ref: str) -> str:
    """A stage's name when none is given: its own ``name`` attribute, else the last part of
    ATTR in ``MODULE:ATTR``."""
    own = getattr(obj, "name", None)
    return own if isinstance(own, str) else ref.rpartition(":")[2].rpartition(".")[2]


def import_from_working_directory() -> None:
    """Let ``MODULE`` be found in the working directory, as ``python -m`` does: a console
    script starts with its own folder first on sys.path instead."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
