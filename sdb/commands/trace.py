"""`sdb trace`: which licensee's soft labels taught a suspect model? Run beside the service (its database and
its watermark secret): every watermark ever issued is tested on the suspect's answers to the owner's probe
images, against the served box's own keyed answers (service.watermarks.tracing, as POST /admin/trace)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from sdb.commands.options import DataOpt, DeviceOpt, SeedOpt, ThreadsOpt, set_threads
from sdb.commands.server import DATABASE_URL_HELP, resolve_database_url


def _fmt_p(log10: float | None, p: float) -> str:
    if log10 is None:
        return "0"
    return f"{p:.2e}" if log10 > -300 else f"1e{log10:.0f}"


def _table(report: dict[str, Any]) -> str:
    head = f"{'rank':>4}  {'verdict':<11}  {'key':>5}  {'user':<16}  {'state':<13}  {'watermark':<15}  "
    head += f"{'z':>7}  {'top-1 z':>7}  {'pattern z':>9}  {'p':>9}  {'corrected p':>11}  {'own images':>10}"
    lines = [
        f"model {report['model']}, suspect {report['suspect']}: {report['probes']} probes, "
        f"{report['watermarks_tested']} watermarks tested "
        f"({report['correction']}, alpha {report['alpha']:g})",
        head,
    ]
    for k in report["keys"]:
        z, z_top, z_pattern = (
            "" if k.get(f) is None else f"{k[f]:.2f}"
            for f in ("statistic", "top1_statistic", "pattern_statistic")
        )
        lines.append(
            f"{k['rank']:>4}  {k['verdict']:<11}  {k['key_id']:>5}  {k['user_name'][:16]:<16}  "
            f"{k['key_state']:<13}  {k['watermark_id']:<15}  {z:>7}  {z_top:>7}  {z_pattern or '-':>9}  "
            f"{_fmt_p(k['log10_p'], k['p_value']):>9}  "
            f"{_fmt_p(k['log10_corrected_p'], k['corrected_p']):>11}  {k['own_images'] or '-':>10}"
        )
    d = report["decoys"]
    if d["count"]:
        lines.append(
            f"decoys: {d['count']} never-issued watermarks, false positives at alpha "
            f"{d['false_positive_rate']:.4f} (corrected {d['false_positive_rate_corrected']:.4f}), "
            f"z mean {d['z_mean']:.2f} sd {d['z_std']:.2f}, "
            f"KS {d['ks']:.3f}"
        )
    names = ", ".join(f"key {m['key_id']} ({m['user_name']})" for m in report["matches"])
    lines.append(f"verdict: {names} match" if names else "verdict: no watermark matches")
    return "\n".join(lines)


def trace(
    box_dir: Annotated[Path, typer.Option("--box", help="The served box artifact directory (with its key).")],
    suspect: Annotated[
        Path | None,
        typer.Option(
            help="The suspect: a student directory (`sdb distill`) or a box artifact (its plain path)."
        ),
    ] = None,
    suspect_url: Annotated[
        str | None,
        typer.Option(help="The suspect: an endpoint answering like POST /predict with probabilities."),
    ] = None,
    suspect_model: Annotated[str | None, typer.Option(help="`model` field sent to --suspect-url.")] = None,
    key_path: Annotated[Path | None, typer.Option(help="Box key file if not inside --box.")] = None,
    data: DataOpt = "digits",
    probes: Annotated[
        int, typer.Option(min=1, help="Probe images sent to the suspect (test split first).")
    ] = 10_000,
    decoys: Annotated[
        int, typer.Option(min=100, help="Never-issued watermarks the null is calibrated on.")
    ] = 1000,
    alpha: Annotated[
        float, typer.Option(help="A watermark matches when its corrected p-value is below this.")
    ] = 1e-3,
    database_url: Annotated[str | None, typer.Option(help=DATABASE_URL_HELP)] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="The name the service serves the box under, whose keys' own images (SDB_LICENSEE_IMAGES) "
            "the trace probes with (default: the box's name)."
        ),
    ] = None,
    own_images: Annotated[
        bool,
        typer.Option(help="Test each key with enough images of its own kept on those (else on the probes)."),
    ] = True,
    shadow: Annotated[
        list[Path] | None,
        typer.Option(
            help="A clean student of the suspect's presumed family (`sdb distill` from the box's soft labels "
            "on your own images; repeatable): the class pattern channel subtracts their answers instead of "
            "the box's, which takes most of the family's own error out (docs/traceability.md)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 1,
) -> None:
    """Trace a suspect model to the licensee (API key) whose watermarked soft labels taught it. Needs the
    service's SDB_DATABASE_URL and its watermark secret (SDB_WATERMARK_SECRET or _FILE, else
    SDB_JWT_SECRET)."""
    if (suspect is None) == (suspect_url is None):
        raise typer.BadParameter("give exactly one of --suspect or --suspect-url")
    set_threads(threads)
    import numpy as np
    import torch
    from pydantic import ValidationError

    from sdb_core.artifact import load_box
    from sdb_core.data import load_dataset
    from sdb_core.trace import TraceConfig
    from sdb_core.training import load_model, model_fn, resolve_device
    from service.core.config import Settings
    from service.crud.watermarks import issued_watermarks
    from service.db import migrate
    from service.db.models import utcnow
    from service.db.session import Database
    from service.watermarks.issuer import Watermarker
    from service.watermarks.samples import images_of
    from service.watermarks.secret import WatermarkSecretError, secret_from_environment
    from service.watermarks.tracing import keyed_reference, probe_images, run_trace

    try:
        settings = Settings(demo=True, database_url=resolve_database_url(database_url))
        marks = Watermarker(secret_from_environment(settings), settings.watermark_disabled_models)
    except (ValidationError, WatermarkSecretError) as exc:
        raise typer.BadParameter(str(exc).splitlines()[-1]) from None
    dev = resolve_device(device)
    box = load_box(box_dir, key_path=key_path, device=dev)
    ds = load_dataset(data)
    if tuple(ds.input_shape) != tuple(box.input_shape):
        raise typer.BadParameter(
            f"--data has inputs {list(ds.input_shape)}, the box takes {list(box.input_shape)}"
        )
    pool = np.concatenate([ds.x_test, ds.x_train]) if probes > len(ds.x_test) else ds.x_test
    x = probe_images(pool, probes, seed)

    def probabilities(fn: Any) -> Any:
        def call(t: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return torch.softmax(fn(t.to(dev)).float(), dim=1).cpu()

        return call

    def student_fn(path: Path) -> Any:
        if not (path / "model.json").exists():
            raise typer.BadParameter(f"{path} is not a student directory (model.json)")
        student, _ = load_model(path, device=dev)
        return probabilities(model_fn(student, ds))

    shadows = [student_fn(p) for p in shadow or []]
    name: str
    if suspect is not None:
        if (suspect / "manifest.json").exists():
            suspect_fn = probabilities(load_box(suspect, device=dev).plain_logits)
        elif (suspect / "model.json").exists():
            suspect_fn = student_fn(suspect)
        else:
            raise typer.BadParameter(
                f"{suspect} is neither a student directory (model.json) nor a box artifact"
            )
        name = str(suspect)
    else:
        import httpx

        from service.watermarks.suspect import HttpSuspect

        client = httpx.Client(timeout=60.0, follow_redirects=False)
        suspect_fn = HttpSuspect(str(suspect_url), client, model=suspect_model)
        name = str(suspect_url)
    db = Database(settings.database_url)
    try:
        try:
            migrate.check_schema(db.engine)
        except migrate.SchemaError as exc:
            raise typer.BadParameter(str(exc)) from None
        with db.session() as s:
            issued = issued_watermarks(s)
        kept = (
            images_of(
                db,
                [w.key_id for w in issued],
                model or box.name,
                tuple(box.input_shape),
                settings.licensee_images,
            )
            if own_images
            else {}
        )
    finally:
        db.dispose()
    cfg = TraceConfig(probes=probes, decoys=decoys, alpha=alpha, batch_size=256)
    report = run_trace(
        suspect=suspect_fn,
        reference=keyed_reference(box.keyed_logits),
        probes=x,
        issued=issued,
        marks=marks,
        model=box,
        cfg=cfg,
        now=utcnow(),
        decoy_secret=f"sdb-trace-decoys:{seed}".encode(),
        suspect_name=name,
        own_images=kept,
        shadows=shadows,
    )
    if as_json:
        typer.echo(
            json.dumps(
                report,
                indent=2,
                default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v),
            )
        )
    else:
        typer.echo(_table(report))


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
