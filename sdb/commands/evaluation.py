"""The evaluation protocol's commands, one process each: evaluate, attack, demo."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from sdb.commands.options import (
    BoxOptionOpt,
    DataOpt,
    DeviceOpt,
    SeedOpt,
    ThreadsOpt,
    echo_json,
    override_config,
    set_threads,
)


def _single_process(command: str) -> None:
    """Refuse a command that has no multi-process mode when torchrun started several copies of it."""
    from sdb_core import parallel

    if parallel.launched():
        raise typer.BadParameter(
            f"{command} runs in one process; under torchrun only train-teacher, box and distill share work"
        )


def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Directory for results.json/.md/.png.")] = Path(
        "runs/eval"
    ),
    data: DataOpt = "digits",
    seeds: Annotated[
        str | None, typer.Option(help="Comma-separated seeds (default 0,1,2; with --reduced: 0).")
    ] = None,
    reduced: Annotated[bool, typer.Option(help="The small configuration used by the test suite.")] = False,
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            help="Merge these earlier result directories (one seed each, say) into --out; no training."
        ),
    ] = None,
    box_option: BoxOptionOpt = None,
    protocol_option: Annotated[
        list[str] | None,
        typer.Option(
            "--protocol-option",
            help="Override a scalar EvalConfig field, KEY=VALUE (repeatable), e.g. transfer=500.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
    trace: Annotated[
        bool,
        typer.Option(
            help="Also run the traceability evaluation (per-licensee watermarks, sdb_core.trace_eval) on the "
            "first seed's box, into OUT/traceability.json."
        ),
    ] = False,
) -> None:
    """Run the protocol of --data (teacher, box, licensees' and attackers' students) over several seeds and
    report the knowledge the box delivers and leaks."""
    _single_process("evaluate")
    set_threads(threads)
    from sdb_core.evaluate import evaluate as run_eval
    from sdb_core.evaluate import protocol_for, reduced_config
    from sdb_core.report import merge_reports, write_report

    if merge:
        reports = [json.loads((d / "results.json").read_text()) for d in merge]
        report = merge_reports(reports)
        write_report(report, out)
    else:
        cfg = reduced_config(data) if reduced else protocol_for(data)
        cfg = replace(cfg, device=device, threads=threads)
        if seeds:
            cfg = replace(cfg, seeds=tuple(int(s) for s in seeds.split(",") if s))
        if box_option:
            cfg = replace(cfg, box=override_config(cfg.box, box_option))
        if protocol_option:
            cfg = override_config(cfg, protocol_option)
        report = run_eval(cfg, out)
        if trace:
            from sdb_core.trace_eval import trace_evaluate
            from sdb_core.trace_report import trace_summary
            from sdb_core.trace_setup import trace_config_for

            traced = trace_evaluate(cfg, trace_config_for(data, reduced), out, command=shlex.join(sys.argv))
            typer.echo(trace_summary(traced))
    typer.echo((out / "results.md").read_text())
    if not all(report["checks"].values()):
        typer.echo("some targets were not met (see above)", err=True)


def attack(
    data: DataOpt = "digits",
    box_dir: Annotated[
        Path | None,
        typer.Option("--box", help="A local box artifact directory (its plain path is attacked)."),
    ] = None,
    stolen: Annotated[
        bool,
        typer.Option(help="With --box: attack the raw weights without the key instead of the plain path."),
    ] = False,
    remote: Annotated[
        str | None, typer.Option(help="Base URL of an sdb service: attack its POST /predict, anonymously.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name on the remote service.")] = None,
    transfer: Annotated[
        int, typer.Option(help="Transfer-set images (from the training split; 0 = all).")
    ] = 1000,
    labelled_fraction: Annotated[float, typer.Option(help="Fraction of transfer-set labels known.")] = 0.1,
    arch: Annotated[
        str, typer.Option(help="Student architecture spec, e.g. mlp:hidden=512.")
    ] = "mlp:hidden=512",
    attacks: Annotated[
        str | None, typer.Option(help="Comma-separated attack names (default: the whole suite).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Student epochs.")] = 120,
    out: Annotated[Path | None, typer.Option(help="Also write the results as JSON here.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
) -> None:
    """Run the attack suite (sdb_core.attacks) as an outsider would: students trained from plain-path answers
    of a local box or a running service, each compared with the label-only student."""
    _single_process("attack")
    set_threads(threads)
    import numpy as np

    from sdb_core.attacks import LABEL_ONLY, AttackConfig, Oracle, attack_names, run_attack
    from sdb_core.data import load_dataset
    from sdb_core.distill import DistillConfig
    from sdb_core.evaluate import parse_student
    from sdb_core.oracles import plain_api_oracle, stolen_weights_oracle
    from sdb_core.training import TrainConfig, accuracy, model_fn, resolve_device

    if (box_dir is None) == (remote is None):
        raise typer.BadParameter("give exactly one of --box or --remote")
    ds = load_dataset(data)
    if 0 < transfer < len(ds.x_train):
        ds = ds.subset_train(transfer, seed=seed)
    oracle: Oracle
    if box_dir is not None:
        from sdb_core.artifact import load_box

        # The owner tests their own box; the key is loaded (to verify the artifact) but never used here.
        boxed = load_box(box_dir, device=resolve_device(device))
        oracle = stolen_weights_oracle(boxed) if stolen else plain_api_oracle(boxed)
        target = f"box:{box_dir}:{'stolen' if stolen else 'plain'}"
    else:
        from sdb.client import remote_teacher

        oracle = remote_teacher(str(remote), None, model, "plain")
        target = f"remote:{remote}:{model or 'default'}"
    cfg = AttackConfig(attacks=tuple(a for a in (attacks or "").split(",") if a))
    names = attack_names(cfg)
    if LABEL_ONLY not in names:
        names.insert(0, LABEL_ONLY)
    student_arch, extra = parse_student(arch)
    dcfg = DistillConfig(
        labelled_fraction=labelled_fraction, train=TrainConfig(epochs=epochs, seed=seed, device=device)
    )
    dev = resolve_device(device)
    top1: dict[str, float] = {}
    for name in names:
        student = run_attack(name, oracle, ds, student_arch, dcfg, cfg, arch_extra=extra)
        top1[name] = round(accuracy(model_fn(student, ds), ds.x_test, ds.y_test, dev), 2)
        typer.echo(f"{name}: {top1[name]:.2f}", err=True)
    floor = top1[LABEL_ONLY]
    result = {
        "target": target,
        "data": data,
        "transfer": len(ds.x_train),
        "student": arch,
        "top1": top1,
        "gain_over_label_only": {k: round(v - floor, 2) for k, v in top1.items() if k != LABEL_ONLY},
        "best_attack": max((k for k in top1 if k != LABEL_ONLY), key=lambda k: top1[k], default=None),
        "seed": seed,
        "transfer_labels_known": float(np.round(labelled_fraction, 4)),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    echo_json(result)


def demo(
    out: Annotated[Path | None, typer.Option("--out", help="Box artifact directory.")] = None,
    data: Annotated[
        str, typer.Option("--data", help="digits (bundled) or fashion-mnist[:DIR] (Debian's package).")
    ] = "digits",
    name: Annotated[str | None, typer.Option(help="Model name (default: directory name).")] = None,
    seed: SeedOpt = 0,
    deterministic_key: Annotated[
        bool, typer.Option(help="Derive the box key from --seed (reproducible; the shipped demos use it).")
    ] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
) -> None:
    """Train a teacher with the evaluation protocol of --data and box it into OUT (the service's demo models:
    models/digits-demo in 1-2 min, models/fashion-mnist in about 10 min on a CPU)."""
    _single_process("demo")
    set_threads(threads)
    from sdb_core.data import load_dataset
    from sdb_core.evaluate import owner_box, protocol_for, split_owner_transfer
    from sdb_core.keys import BoxKey

    start = time.perf_counter()
    cfg = replace(protocol_for(data), device=device)
    ds = load_dataset(data)
    target = out or Path("models") / ("digits-demo" if data == "digits" else ds.name)
    owner, _ = split_owner_transfer(ds, cfg, seed)
    key = BoxKey.from_int_seed(seed, ds.input_shape, cfg.box.lam) if deterministic_key else None
    _, boxed = owner_box(cfg, owner, seed, target, name=name or target.name, key=key)
    echo_json(
        {
            "box": str(target),
            "metrics": boxed.manifest["metrics"],
            "seconds": round(time.perf_counter() - start, 1),
        }
    )


def register(app: typer.Typer) -> None:
    """Add the evaluation commands to the top-level app."""
    app.command("evaluate")(evaluate)
    app.command("attack")(attack)
    app.command("demo")(demo)
