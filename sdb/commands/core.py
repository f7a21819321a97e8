"""ML commands: train-teacher, box, distill, evaluate, attack, demo."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from sdb_core.teachers import BoxPath

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="digits (bundled), fashion-mnist[:DIR], idx:DIR (MNIST format), cifar10:DIR, cifar100:DIR "
        "or npz:FILE.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch CPU threads (0 = torch default).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (deterministic runs).")]
BoxOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--box-option",
        help="Override a BoxConfig field, KEY=VALUE (repeatable): guard=false; train.KEY for its training, "
        "train.lr=0.05.",
    ),
]


def _override(cfg: Any, options: list[str]) -> Any:
    """sdb_core.configurator.override, its errors as bad CLI parameters."""
    from sdb_core.configurator import OverrideError, override

    try:
        return override(cfg, options)
    except OverrideError as exc:
        raise typer.BadParameter(str(exc)) from None


def _threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def _single_process(command: str) -> None:
    """Refuse a command that has no multi-process mode when torchrun started several copies of it."""
    from sdb_core import parallel

    if parallel.launched():
        raise typer.BadParameter(
            f"{command} runs in one process; under torchrun only train-teacher, box and distill share work"
        )


def _echo_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, indent=2))


def train_teacher(
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")] = Path("runs/teacher"),
    data: DataOpt = "digits",
    arch: Annotated[str, typer.Option(help="Zoo architecture (see sdb_core.zoo.list_models).")] = "small_cnn",
    width: Annotated[int | None, typer.Option(help="Width option of the architecture, if it has one.")] = 32,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    lr: Annotated[float, typer.Option(help="SGD learning rate (cosine schedule).")] = 0.05,
    augment: Annotated[bool, typer.Option(help="Random crop + flip (32x32 natural images).")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
) -> None:
    """Train a teacher classifier and save it (safetensors + JSON). Runs under torchrun too
    (docs/training.md): `torchrun --standalone --nproc-per-node N -m sdb train-teacher ...`."""
    _threads(threads)
    from sdb_core import parallel
    from sdb_core.data import load_dataset
    from sdb_core.training import (
        TrainConfig,
        accuracy,
        model_fn,
        resolve_device,
        save_model,
        train_classifier,
    )

    with parallel.session(device) as device:
        ds = load_dataset(data)
        cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device, augment=augment, checkpoint_every=5)
        extra = {"width": width} if width is not None else {}
        if parallel.is_main():
            out.mkdir(parents=True, exist_ok=True)
        model, kwargs = train_classifier(ds, arch, cfg, arch_extra=extra, checkpoint=out / "resume.pt")
        if parallel.is_main():
            top1 = accuracy(model_fn(model, ds), ds.x_test, ds.y_test, resolve_device(device))
            save_model(
                out, model, arch=arch, arch_kwargs=kwargs, ds=ds, metrics={"top1": top1}, train_config=cfg
            )
            (out / "resume.pt").unlink(missing_ok=True)
            _echo_json({"teacher": str(out), "test_top1": round(top1, 2), "processes": parallel.world_size()})


def box(
    teacher: Annotated[Path, typer.Option("--teacher", help="Teacher checkpoint directory (train-teacher).")],
    out: Annotated[Path, typer.Option("--out", help="Box artifact directory to write, e.g. models/NAME.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: the directory name).")] = None,
    version: Annotated[str, typer.Option(help="Model version string.")] = "1",
    data: DataOpt = "digits",
    epochs: Annotated[int | None, typer.Option(help="Box training epochs (default: BoxConfig).")] = None,
    lam: Annotated[float, typer.Option(help="Key mixing weight lambda.")] = 0.5,
    key_out: Annotated[
        Path | None,
        typer.Option(help="Also move the box key here (e.g. a secret store mount); unsealed boxes only."),
    ] = None,
    box_option: BoxOptionOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
) -> None:
    """Turn a trained teacher into a boxed model (fresh secret box key); resumes an interrupted run. Runs
    under torchrun too: `torchrun --standalone --nproc-per-node N -m sdb box ...` (docs/training.md)."""
    _threads(threads)
    from sdb_core import parallel
    from sdb_core.box import BoxConfig, box_teacher, train_box
    from sdb_core.data import load_dataset
    from sdb_core.keys import BoxKey
    from sdb_core.seal import Keyring
    from sdb_core.training import accuracy, load_model, model_fn, resolve_device

    keyring = Keyring.from_env()  # SDB_SEAL_KEY_FILE set: the artifact is written sealed
    if keyring.current is not None and key_out is not None:
        raise typer.BadParameter("--key-out moves a plaintext box key; with SDB_SEAL_KEY_FILE it is sealed")
    with parallel.session(device) as device:
        ds = load_dataset(data)
        model, meta = load_model(teacher, device=resolve_device(device))
        if meta.get("data_digest") != ds.digest() and parallel.is_main():
            typer.echo("warning: the teacher was trained on different data (digest differs)", err=True)
        base = BoxConfig(lam=lam)
        train = replace(base.train, seed=seed, device=device, checkpoint_every=5)
        if epochs is not None:
            train = replace(train, epochs=epochs)
        cfg = _override(replace(base, train=train), box_option or [])
        ckpt = out.parent / f".{out.name}.resume.pt"
        # One secret key for all ranks: drawn by rank 0, sent over the (local) process group.
        drawn = BoxKey.generate(ds.input_shape, cfg.lam) if parallel.is_main() else None
        key = parallel.broadcast_object(drawn)
        assert key is not None
        if not parallel.is_main():
            # The same training (and collectives) as box_teacher's train_box call on rank 0, which alone
            # evaluates and writes the artifact.
            train_box(
                model,
                ds,
                arch=meta["arch"],
                arch_kwargs=meta["arch_kwargs"],
                key=key,
                cfg=cfg,
                checkpoint=ckpt,
            )
            return
        top1 = accuracy(model_fn(model, ds), ds.x_test, ds.y_test, resolve_device(device))
        boxed = box_teacher(
            model,
            meta,
            ds,
            out,
            name=name or out.name,
            version=version,
            cfg=cfg,
            key=key,
            teacher_top1=top1,
            checkpoint=ckpt,
            keyring=keyring if keyring.current is not None else None,
        )
        if key_out is not None:
            key_out.parent.mkdir(parents=True, exist_ok=True)
            (out / "box_key.json").replace(key_out)
            typer.echo(f"box key moved to {key_out}; load with key_path", err=True)
        sealed = boxed.manifest.get("seal", {}).get("key_id", False)
        _echo_json(
            {
                "box": str(out),
                "metrics": boxed.manifest["metrics"],
                "processes": parallel.world_size(),
                "sealed": sealed,
            }
        )


def distill(
    out: Annotated[Path, typer.Option("--out", help="Student checkpoint directory to write.")] = Path(
        "runs/student"
    ),
    teacher: Annotated[Path | None, typer.Option(help="A normal teacher checkpoint (normal KD).")] = None,
    box_dir: Annotated[Path | None, typer.Option("--box", help="A local box artifact directory.")] = None,
    key_path: Annotated[
        Path | None, typer.Option(help="Box key file if not inside the box directory.")
    ] = None,
    remote: Annotated[str | None, typer.Option(help="Base URL of an sdb service to distill through.")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SDB_API_KEY", help="API key for --remote (or env SDB_API_KEY).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name on the remote service.")] = None,
    path: Annotated[BoxPath, typer.Option(help="Box path: plain, keyed, wrong-key (local only).")] = (
        BoxPath.keyed
    ),
    data: DataOpt = "digits",
    arch: Annotated[str, typer.Option(help="Student architecture.")] = "small_cnn",
    width: Annotated[int | None, typer.Option(help="Student width option, if it has one.")] = 8,
    alpha: Annotated[float, typer.Option(help="KD weight alpha.")] = 0.9,
    temperature: Annotated[float, typer.Option(help="KD temperature T.")] = 4.0,
    labelled_fraction: Annotated[float, typer.Option(help="Fraction of transfer-set labels known.")] = 1.0,
    epochs: Annotated[int, typer.Option(help="Student epochs.")] = 30,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
    yes: Annotated[
        bool,
        typer.Option("--yes", help="With --remote: go ahead when the run takes over half the quota left."),
    ] = False,
) -> None:
    """Distill a student (Hinton KD) from a teacher, a local box, or a remote box; no teacher = scratch.
    Runs under torchrun too (rank 0 alone asks the teacher): `torchrun --standalone --nproc-per-node N -m sdb
    distill ...`."""
    _threads(threads)
    from sdb_core import parallel

    with parallel.session(device) as device:
        from sdb_core.data import load_dataset
        from sdb_core.distill import DistillConfig
        from sdb_core.distill import distill as run_distill
        from sdb_core.teachers import local_teacher
        from sdb_core.training import TeacherFn, TrainConfig, accuracy, model_fn, resolve_device, save_model

        if sum(x is not None for x in (teacher, box_dir, remote)) > 1:
            raise typer.BadParameter("give at most one of --teacher, --box, --remote")
        ds = load_dataset(data)
        dev = resolve_device(device)
        fn: TeacherFn | None
        if remote is not None:
            if not api_key:
                raise typer.BadParameter("--remote needs --api-key (or SDB_API_KEY)")
            if path is BoxPath.wrong_key:
                raise typer.BadParameter("--path wrong-key is only for local boxes")
            from sdb.client import remote_teacher  # lazy: the client is optional for local use

            fn = remote_teacher(remote, api_key, model, "keyed" if path is BoxPath.keyed else "plain")
            source = f"remote:{remote}:{model or 'default'}:{path.value}"
            _remote_budget(fn, len(ds.x_train), path is BoxPath.keyed, yes, loud=parallel.is_main())
        else:
            fn, source = local_teacher(
                ds, dev, teacher=teacher, box_dir=box_dir, key_path=key_path, path=path
            )
        cfg = DistillConfig(
            alpha=alpha,
            temperature=temperature,
            labelled_fraction=labelled_fraction,
            train=TrainConfig(epochs=epochs, seed=seed, device=device),
            teacher_progress=remote is not None and parallel.is_main(),
        )
        extra = {"width": width} if width is not None else {}
        student = run_distill(ds, arch, fn, cfg, arch_extra=extra)
        if not parallel.is_main():
            return
        top1 = accuracy(model_fn(student, ds), ds.x_test, ds.y_test, dev)
        from sdb_core.zoo import arch_kwargs_for

        save_model(
            out,
            student,
            arch=arch,
            arch_kwargs=arch_kwargs_for(ds.input_shape, ds.num_classes, **extra),
            ds=ds,
            metrics={"top1": top1, "source": source},
            train_config=cfg.train,
        )
        _echo_json(
            {
                "student": str(out),
                "source": source,
                "test_top1": round(top1, 2),
                "processes": parallel.world_size(),
            }
        )


def _remote_budget(teacher: Any, n: int, keyed: bool, yes: bool, loud: bool) -> None:
    """Before a remote distillation: say how many samples it sends and, on the keyed path, how much of the
    key's quota is left; stop when that is not enough, or without --yes when the run takes over half of it."""
    say = (lambda line: typer.echo(line, err=True)) if loud else (lambda line: None)
    if not keyed:
        say(f"distill: sending {n:,} samples to /predict (the plain path: no quota)")
        return
    info = teacher.client.own_key()  # GET /auth/key
    left, quota = info.get("samples_remaining"), info.get("sample_quota")
    if left is None:
        say(f"distill: sending {n:,} samples to /distill-batch; this API key has no sample quota")
        return
    say(
        f"distill: sending {n:,} samples to /distill-batch; "
        f"this API key has {left:,} of {quota:,} samples left"
    )
    if n > left:
        typer.echo(f"error: this run needs {n:,} samples and the API key has {left:,} left", err=True)
        raise typer.Exit(5)  # EXIT_LIMIT, as a 429 for a spent quota
    if 2 * n > left and not yes:
        typer.echo(
            f"error: this run would spend {n:,} of the {left:,} samples left, more than half: "
            "run it again with --yes to go ahead",
            err=True,
        )
        raise typer.Exit(1)


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
    _threads(threads)
    from sdb_core.evaluate import evaluate as run_eval
    from sdb_core.evaluate import protocol_for, reduced_config
    from sdb_core.report import merge_reports, write_report

    if merge:
        reports = [json.loads((d / "results.json").read_text()) for d in merge]
        report = merge_reports(reports)
        write_report(report, out)
    else:
        cfg = reduced_config(data) if reduced else protocol_for(data)
        cfg = replace(cfg, device=device)
        if seeds:
            cfg = replace(cfg, seeds=tuple(int(s) for s in seeds.split(",") if s))
        if box_option:
            cfg = replace(cfg, box=_override(cfg.box, box_option))
        if protocol_option:
            cfg = _override(cfg, protocol_option)
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
    _threads(threads)
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
    _echo_json(result)


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
    _threads(threads)
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
    _echo_json(
        {
            "box": str(target),
            "metrics": boxed.manifest["metrics"],
            "seconds": round(time.perf_counter() - start, 1),
        }
    )


def register(app: typer.Typer) -> None:
    """Add the core commands to the top-level app."""
    app.command("train-teacher")(train_teacher)
    app.command("box")(box)
    app.command("distill")(distill)
    app.command("evaluate")(evaluate)
    app.command("attack")(attack)
    app.command("demo")(demo)
