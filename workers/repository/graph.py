"""The signature an ONNX graph declares, read with ONNX Runtime (a worker has no ``onnx``
package): what ``inferq models add`` records in a manifest, what it refuses, and how the
graph's leading axes batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.wire import DTYPES, TensorSpec
from workers.errors import ManifestError
from workers.repository.manifest import ORT_DTYPES

_ZIPMAP_FIX = (
    "this is scikit-learn's ZipMap (class -> probability dictionaries); re-export with skl2onnx "
    "and the ZipMap off: to_onnx(clf, ..., options={id(clf): {\"zipmap\": False}}) (or "
    "options={type(clf): {\"zipmap\": False}}), which gives a float tensor [N, classes]"
)


@dataclass(frozen=True)
class GraphTensor:
    """One input or output of a graph, as a manifest records it."""

    spec: TensorSpec
    #: The graph's name of each free dimension (None where fixed or unnamed).
    symbols: tuple[str | None, ...]


@dataclass(frozen=True)
class Graph:
    """A graph's inputs and outputs, with -1 for every symbolic or unknown dimension."""

    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    #: The model's doc string (ONNX ``ModelProto.doc_string``), often empty.
    description: str

    @property
    def tensors(self) -> tuple[tuple[str, GraphTensor], ...]:
        """("input" or "output", tensor) for every input, then every output."""
        return (*(("input", t) for t in self.inputs), *(("output", t) for t in self.outputs))


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def refusal(model: str, kind: str, name: str, ort_type: str) -> str | None:
    """Why a graph input or output of ONNX Runtime type ``ort_type`` cannot be served, with
    the fix; None when it can."""
    if ort_type in ORT_DTYPES:
        return None
    where = f"model '{model}': {kind} '{name}' is {ort_type}"
    if not ort_type.startswith("tensor("):
        fix = (_ZIPMAP_FIX if ort_type.startswith(("seq(map(", "map("))
               else "return a tensor instead (e.g. ConcatFromSequence in the graph)")
        return f"{where}, not a tensor; inferq carries tensors only: {fix}"
    fix = ("encode the strings outside the model (e.g. as int64 ids, or UTF-8 bytes as uint8)"
           if ort_type == "tensor(string)" else "Cast it to one of these in the graph")
    return f"{where}; inferq carries {', '.join(sorted(DTYPES))} tensors only: {fix}"


def _tensor(arg: Any) -> GraphTensor:
    dims = list(arg.shape or [])
    shape = tuple(d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else -1
                  for d in dims)
    symbols = tuple(d if isinstance(d, str) and d else None for d in dims)
    return GraphTensor(TensorSpec(arg.name, ORT_DTYPES[arg.type], shape), symbols)


def read_graph(path: Path, model: str) -> Graph:
    """Read the inputs and outputs of the ONNX file at ``path`` (on the CPU provider).

    Raises :class:`ManifestError` when ONNX Runtime cannot load the file, or when an input
    or output is not a tensor inferq carries (a ZipMap's sequence of maps, strings, …): one
    line per offending input or output, each with what to change.
    """
    try:
        session = _ort().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's errors derive from Exception only
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ManifestError(f"model '{model}': ONNX Runtime cannot load {path}: {first}") from None
    args = [("input", a) for a in session.get_inputs()]
    args += [("output", a) for a in session.get_outputs()]
    problems = [p for kind, a in args if (p := refusal(model, kind, a.name, a.type))]
    if problems:
        raise ManifestError("\n".join(problems))
    return Graph(
        inputs=tuple(_tensor(a) for a in session.get_inputs()),
        outputs=tuple(_tensor(a) for a in session.get_outputs()),
        description=str(session.get_modelmeta().description or ""),
    )


# --- batching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Batching:
    """How a graph batches jobs, and the shapes its manifest records for that."""

    #: "dynamic": every leading axis is free; "single": some are fixed to 1 (recorded as -1,
    #: batches of one row); "none": some tensor has no batch axis (shapes kept as declared).
    mode: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: Why batching is limited, for the manifest's comment; empty when dynamic.
    reason: str = ""

    def comment(self) -> list[str]:
        """The TOML comment above ``max_batch_rows`` explaining a forced value of 1."""
        if self.mode == "single":
            return [f"# max_batch_rows = 1: {self.reason}, so each run takes one row (a job of "
                    "several rows runs row by row).",
                    "# Re-export the graph with a dynamic batch axis to batch jobs together."]
        if self.mode == "none":
            return [f"# max_batch_rows = 1: {self.reason}: each job runs alone, with exactly "
                    "the shapes declared."]
        return []


def plan_batching(graph: Graph) -> Batching:
    """Decide how ``graph`` batches from the leading dimension of each input and output."""
    tensors = graph.tensors
    leading = [(kind, t.spec) for kind, t in tensors]
    if all(s.shape[:1] == (-1,) for _, s in leading):
        return Batching("dynamic", _specs(graph.inputs), _specs(graph.outputs))
    unbatched = [(k, s) for k, s in leading if s.shape[:1] not in ((-1,), (1,))]
    if unbatched:
        kind, spec = unbatched[0]
        why = (f"{kind} '{spec.name}' has no batch axis (shape {list(spec.shape)})")
        return Batching("none", _specs(graph.inputs), _specs(graph.outputs), why)
    fixed = [f"{k} '{s.name}'" for k, s in leading if s.shape[0] == 1]
    why = f"the graph fixes the batch dimension of {', '.join(fixed)} to 1"
    return Batching("single", _specs(graph.inputs, free=True), _specs(graph.outputs, free=True),
                    why)


def _specs(tensors: Sequence[GraphTensor], free: bool = False) -> tuple[TensorSpec, ...]:
    # A batch axis fixed to 1 is recorded as -1: the worker feeds one row at a time.
    return tuple(TensorSpec(t.spec.name, t.spec.dtype, (-1, *t.spec.shape[1:]))
                 if free else t.spec for t in tensors)
