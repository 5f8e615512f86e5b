"""``inferq drift MODEL`` (the most drifted features) and ``inferq models profile MODEL``
(a version's reference profile, written beside its model.onnx)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import numpy as np

from workers.ops import drift

#: Rows a profile is built from at most (the first ones of the file).
PROFILE_ROWS = 100_000
#: Rows a model run takes while profiling a batched model.
RUN_ROWS = 1024


def _client() -> Any:
    from producer.wire.connect import broker_url, connect

    return connect(broker_url(), timeout=5)


@click.command("drift")
@click.argument("model")
@click.option("--version", type=int, default=None,
              help="One version (default: every version with a reference).")
@click.option("--top", default=10, show_default=True, help="Features shown per version.")
@click.option("--window", "window_min", type=click.IntRange(1, drift.COUNTS_TTL_S // 60),
              default=60, show_default=True, help="Minutes of live rows compared.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def drift_command(model: str, version: int | None, top: int, window_min: int,
                  as_json: bool) -> None:
    """List the features and outputs of MODEL that drifted most from their reference.

    PSI (population stability index) per feature over the last --window minutes of a
    sample of the rows served: >= 0.2 drift, 0.1-0.2 watch, below ok.
    """
    client = _client()
    versions = [version] if version is not None else drift.versions_profiled(client, model)
    report: list[dict[str, Any]] = []
    for v in versions:
        window = drift.read_window(client, model, v, window_min)
        if window is None:
            report.append({"version": v, "reference": None})
            continue
        features = window.features()
        report.append({
            "version": v, "reference": {"id": window.profile.id,
                                        "source": window.profile.source,
                                        "rows": window.profile.rows},
            "window_min": window_min, "rows": max(window.rows, default=0),
            "features": [{"tensor": f.tensor, "role": f.role, "feature": f.feature,
                          "psi": round(f.psi, 4), "verdict": f.verdict}
                         for f in features[:top]],
            "drifted": sum(f.verdict == "drift" for f in features),
            "watch": sum(f.verdict == "watch" for f in features)})
    if as_json:
        click.echo(json.dumps({"model": model, "versions": report}))
        return
    if not report:
        click.echo(f"{model}: no drift reference yet (workers build one from the first "
                   f"rows served, or run: inferq models profile {model} --data REF)")
    for r in report:
        if r["reference"] is None:
            click.echo(f"{model} v{r['version']}: no drift reference yet")
            continue
        ref = r["reference"]
        click.echo(f"{model} v{r['version']}  reference {ref['source']} ({ref['rows']} rows, "
                   f"profile {ref['id']})  last {window_min} min: {r['rows']} rows sampled, "
                   f"{r['drifted']} drifted, {r['watch']} to watch")
        if not r["features"]:
            click.echo("  no rows in the window")
            continue
        click.echo(f"  {'tensor':<16} {'feature':>8} {'PSI':>8}  verdict")
        for f in r["features"]:
            click.echo(f"  {f['tensor']:<16} {f['feature']:>8} {f['psi']:>8.3f}  "
                       f"{f['verdict']}")


@click.command("profile")
@click.argument("name")
@click.option("--data", "data", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Reference rows: .npy/.npz (the input's array) or .parquet/.csv.")
@click.option("--version", type=int, default=None, help="Version (default: the latest).")
@click.option("--columns", "columns", multiple=True, metavar="INPUT=SPEC",
              help="Table columns of an input, as inferq batch takes them (pixels=p0:p63).")
@click.option("--rows", "max_rows", type=click.IntRange(min=1), default=PROFILE_ROWS,
              show_default=True, help="Rows read at most (the first ones of the file).")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model repository (default: $INFERQ_MODEL_DIR, else models/ of the "
                   "source tree).")
def profile_command(name: str, data: Path, version: int | None, columns: tuple[str, ...],
                    max_rows: int, model_dir: Path | None) -> None:
    """Write the drift reference of a version of NAME from reference rows (its training
    or validation data): <version>/profile.json beside its model.onnx.

    The version runs on the rows, so its outputs get a reference too. Workers publish the
    profile when they load the version, and pick up a new one within 30 s.
    """
    from workers.batch import columns as cols
    from workers.batch.errors import BatchError
    from workers.batch.readers import open_source
    from workers.errors import WorkerError
    from workers.launch.models_cli import _root
    from workers.repository import load_manifest
    from workers.serving import runtime

    root = _root(model_dir)
    try:
        manifest = load_manifest(root / name)
        version = manifest.latest if version is None else version
        if version not in manifest.versions:
            raise click.ClickException(f"{name} has no version {version} (versions "
                                       f"{sorted(manifest.versions)})")
        source = open_source(data, manifest.inputs, cols.parse(columns), None, RUN_ROWS)
        parts: dict[str, list[np.ndarray[Any, Any]]] = {s.name: [] for s in manifest.inputs}
        read = 0
        for block in source.blocks():
            good = np.setdiff1d(np.arange(block.rows),
                                np.fromiter(block.bad, np.int64) - block.first_row)
            for k, v in block.inputs.items():
                parts[k].append(v[good][:max_rows - read])
            read += min(len(good), max_rows - read)
            if read >= max_rows:
                break
        if not read:
            raise click.ClickException(f"{data}: no usable rows")
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        model = runtime.load(manifest, version, "cpu", 0)
        step = RUN_ROWS if manifest.batched else 1
        runs = [model.run({k: v[i:i + step] for k, v in arrays.items()})
                for i in range(0, read, step)]
        for spec in manifest.outputs:
            arrays[spec.name] = np.concatenate([r[spec.name] for r in runs])
        profile = drift.build_profile(name, version, manifest.inputs, manifest.outputs, arrays,
                                      f"{data.name} ({read} rows)")
    except (BatchError, WorkerError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    path = drift.profile_path(root, name, version)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1))
    os.replace(tmp, path)
    click.echo(f"wrote {path}: {read} rows, profile {profile.id}")
    for t in profile.tensors:
        what = f"{t.size - 1} classes + other" if t.categorical else \
            f"{len(t.feature_names)} features x {drift.BINS} bins"
        click.echo(f"  {t.role:<6} {t.name}: {what}")
