"""The commands that train, and run under torchrun too: train-teacher, box, distill."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from sdb.commands.options import (
    BoxOptionOpt,
    DataOpt,
    DeviceOpt,
    SeedOpt,
    ThreadsOpt,
    WatermarkOptionOpt,
    echo_json,
    override_config,
    set_threads,
)
from sdb_core.teachers import BoxPath


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
    set_threads(threads)
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
            echo_json({"teacher": str(out), "test_top1": round(top1, 2), "processes": parallel.world_size()})


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
    watermark_option: WatermarkOptionOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
) -> None:
    """Turn a trained teacher into a boxed model (fresh secret box key); resumes an interrupted run. Runs
    under torchrun too: `torchrun --standalone --nproc-per-node N -m sdb box ...` (docs/training.md)."""
    set_threads(threads)
    from sdb_core import parallel
    from sdb_core.box import BoxConfig, box_teacher, train_box
    from sdb_core.data import load_dataset
    from sdb_core.keys import BoxKey
    from sdb_core.seal import Keyring
    from sdb_core.training import accuracy, load_model, model_fn, resolve_device
    from sdb_core.watermark import WatermarkConfig

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
        cfg = override_config(replace(base, train=train), box_option or [])
        wcfg = override_config(WatermarkConfig(), watermark_option or [])
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
            watermark=wcfg,
        )
        if key_out is not None:
            key_out.parent.mkdir(parents=True, exist_ok=True)
            (out / "box_key.json").replace(key_out)
            typer.echo(f"box key moved to {key_out}; load with key_path", err=True)
        sealed = boxed.manifest.get("seal", {}).get("key_id", False)
        echo_json(
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
    set_threads(threads)
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
        echo_json(
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


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level app."""
    app.command("train-teacher")(train_teacher)
    app.command("box")(box)
    app.command("distill")(distill)
