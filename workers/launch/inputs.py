"""Reading a job's inputs for ``inferq submit``: files (``.npy``, ``.json``), names, and
the model's dtypes, with a cast only where no value changes."""

from __future__ import annotations

import difflib
import json
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np

from producer import InferenceClient
from producer.errors import ModelNotFound


def _signature(client: InferenceClient, model: str, version: int | None) -> Any:
    """The signature ``submit`` checks a job for ``model`` against (None: none advertised),
    raising what it would raise: ModelNotFound for an unknown model, with a guess."""
    served = client.models()
    try:
        return client.model(model, version)
    except ModelNotFound as exc:
        guess = difflib.get_close_matches(model, list(served), n=1)
        if guess and guess[0] != model:
            raise click.ClickException(f"{exc.message}; did you mean {guess[0]!r}?") from None
        raise


def _as_dtype(value: Any, dtype: str, what: str) -> np.ndarray[Any, Any]:
    """``value`` as ``dtype`` when no value changes but for float rounding (float64 rounded
    to float32 is what a float32 model computes with anyway); else say how to convert it."""
    try:
        arr = np.asarray(value)
    except ValueError as exc:
        raise click.ClickException(f"{what}: not an array ({exc})") from None
    want = np.dtype(dtype)
    if arr.dtype == want:
        return arr
    if arr.dtype.kind in "biuf" and want.kind in "biuf":
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cast = arr.astype(want)
            if arr.dtype.kind == want.kind == "f":  # rounding, but no value overflows
                fits = np.array_equal(np.isfinite(cast), np.isfinite(arr))
            else:  # every value exactly representable
                fits = np.array_equal(cast.astype(arr.dtype), arr)
        if fits:
            return cast
    raise click.ClickException(
        f"{what} is {arr.dtype}, the model takes {want}, and its values do not all fit "
        f"{want}: convert them yourself, e.g. np.save(path, x.astype('{want}'))")


def _read(path: str) -> Any:
    """A .json file's object of input name -> array, or a .npy file's array."""
    try:
        if path.endswith(".json"):
            doc = json.loads(Path(path).read_text())
            if not isinstance(doc, dict):
                raise click.ClickException(f"{path}: expected an object of input name -> array")
            return doc
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:  # JSONDecodeError, or not an .npy file
        raise click.ClickException(f"{path}: cannot read it ({exc})") from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise click.ClickException(f"{path}: holds several arrays: save one per .npy file")
    return arr


def load_inputs(client: InferenceClient, model: str, version: int | None,
                 items: tuple[str, ...]) -> dict[str, Any]:
    """The job's inputs from ``--input`` files, cast to the model's dtypes (_as_dtype)."""
    files = []
    for item in items:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else ("", item)
        if not Path(path).is_file():
            raise click.ClickException(f"--input {item}: no such file: {path}")
        files.append((name, path))
    info = _signature(client, model, version)
    inputs: dict[str, Any] = {}
    for name, path in files:
        if path.endswith(".json"):
            inputs.update(_read(path))
            continue
        if not name:
            if info is None:
                raise click.ClickException(
                    f"no worker advertises model {model!r}, so its input's name is unknown: "
                    "name it (--input NAME=file.npy)")
            if len(info.inputs) != 1:
                names = ", ".join(s.name for s in info.inputs)
                raise click.ClickException(
                    f"model {model!r} takes {names}: name each (--input NAME=file.npy)")
            name = info.inputs[0].name
        inputs[name] = _read(path)
    for spec in info.inputs if info is not None else ():
        if spec.name in inputs:
            inputs[spec.name] = _as_dtype(inputs[spec.name], spec.dtype,
                                          f"input {spec.name!r}")
    return inputs
