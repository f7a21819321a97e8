"""The evaluation protocol over several seeds: teacher -> box -> licensees' and attackers' students, with the
measures of knowledge delivered and leaked (`sdb_core.report` computes them and writes the report as JSON,
Markdown and PNG).

Per seed the training split is cut in two, disjoint: the model owner's images (teacher and box train on them)
and a transfer set of `transfer` images that a licensee or an attacker holds, of which `labelled_fraction`
carry their true label (`transfer = 0`: the transfer set is the owner's own split, the quick digits check).
Every student family then learns from the transfer set in these ways (`sdb_core.distill`, one query per
image, answers cached and shared by all families):

- scratch: cross-entropy on the known labels only;
- normal KD: the original teacher's soft labels (what the knowledge is worth);
- authorized KD: the box's keyed path (what a licensee gets through `/distill-batch`);
- every attack of `sdb_core.attacks` against the plain path (`api/...`, what `/predict` answers), against
  the box's weights run as shipped without the key (`stolen/...`, a copy of the weights off a server), and,
  for a key-gated box, against the soft labels inside it with the gate cut out (`whitebox/...`).

Every attack also runs on its top-1 twin (`attacks.top1_oracle`: the same queries, each answer cut down to its
top-1). The label-only floor is the best of those twins: the best student that the suite's recipes train from
top-1 answers alone, which no service that answers correctly can prevent (`api/label_only`, the top-1 as
pseudo-labels, is one of them). Measures per family, in top-1 points over that floor, per seed then
mean ± std: V = normal KD - floor (the value of the dark knowledge), delivered = authorized KD - floor, and
leaked = the best attack - floor (the attack is named). `beyond_top1` is each attack's gain over its own twin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdb_core.artifact import ArtifactError, BoxedModel, load_box
from sdb_core.attacks import (
    FORGE,
    AttackConfig,
    Oracle,
    Targets,
    attack_names,
    attack_targets,
    forge_trigger,
    forged_oracle,
    top1_oracle,
    train_on_targets,
)
from sdb_core.box import BoxConfig, box_teacher
from sdb_core.data import Dataset, load_dataset
from sdb_core.distill import DistillConfig, distill, query_teacher
from sdb_core.keys import BoxKey
from sdb_core.oracles import plain_api_oracle, stolen_weights_oracle, whitebox_oracle
from sdb_core.report import build_report, write_report
from sdb_core.students import Job, StudentPool
from sdb_core.training import (
    TeacherFn,
    TrainConfig,
    accuracy,
    load_model,
    model_fn,
    resolve_device,
    save_model,
    train_classifier,
)


@dataclass
class EvalConfig:
    dataset: str = "digits"
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_arch: str = "small_cnn"
    teacher_extra: dict[str, Any] = field(default_factory=lambda: {"width": 32})
    teacher_epochs: int = 30
    owner_images: int = 0  # > 0: the owner's training images (teacher and box); 0: all but the transfer set
    transfer: int = 0  # images in the transfer set, disjoint from the owner's; 0: the owner's own images
    labelled_fraction: float = 0.1  # of the transfer set's images, those whose true label is known
    students: tuple[str, ...] = ("small_cnn:width=8", "mlp:hidden=64")
    student_epochs: int = 30
    alpha: float = 0.9
    temperature: float = 4.0
    box: BoxConfig = field(default_factory=BoxConfig)
    attacks: AttackConfig = field(default_factory=AttackConfig)
    # Attacks on the stolen weights (run without the key): the raw outputs themselves, re-tempered, and
    # guessed keys; the network's raw logits are a superset of what any query-based attack gets from them.
    # "forge": `stolen/forge`, a key-gate trigger forged from the weights (`attacks.forge_trigger`).
    stolen_attacks: tuple[str, ...] = ("retemper:1", "retemper:4", "retemper:20", "guess:lam=0.5", "forge")
    device: str = "auto"
    threads: int = 1  # torch intra-op threads; small models run fastest on one (0 = torch's default)
    # processes training the students on a CPU, one thread each (sdb_core.students; one on CUDA, and
    # with augmentation, where the teacher answers every batch)
    workers: int = 2
    progress: bool = True


def digits_config() -> EvalConfig:
    """The quick check on the bundled digits: the transfer set is the owner's own 1300 images."""
    return EvalConfig()


def fashion_mnist_config() -> EvalConfig:
    """The documented protocol on Fashion-MNIST (docs/evaluation.md: why these sizes)."""
    return EvalConfig(
        dataset="fashion-mnist",
        teacher_arch="cnn",
        teacher_extra={"width": 32},
        teacher_epochs=12,
        owner_images=20_000,
        transfer=500,
        students=("small_cnn:width=16", "mlp:hidden=512"),
        student_epochs=120,
        # lambda 0.75 and a gentle fine-tune keep both paths within 0.5 points of the teacher
        # (docs/evaluation.md: lambda 0.5 / lr 0.05 cost 1.4 points); the split box (split_width=16,
        # dis_spread=1) leaks less white-box but delivers less (docs/evaluation.md, "The split box")
        box=replace(BoxConfig(lam=0.75), train=TrainConfig(epochs=10, lr=0.01)),
    )


PROTOCOLS: dict[str, Callable[[], EvalConfig]] = {
    "digits": digits_config,
    "fashion-mnist": fashion_mnist_config,
}


def protocol_for(dataset: str) -> EvalConfig:
    """The protocol of a named dataset (its kind before ':'), else the digits protocol on that data."""
    make = PROTOCOLS.get(dataset.partition(":")[0], digits_config)
    return replace(make(), dataset=dataset)


def reduced_config(dataset: str = "digits") -> EvalConfig:
    """A small configuration that checks the same directions quickly (for the test suite)."""
    cfg = replace(
        protocol_for(dataset),
        seeds=(0,),
        attacks=AttackConfig(
            temperatures=(1.0, 20.0), guess_lams=(0.5,), forge_steps=40, forge_batch=64, forge_restarts=1
        ),
        stolen_attacks=("retemper:4", "guess:lam=0.5", "forge"),
        progress=False,
    )
    if dataset.startswith("fashion-mnist"):
        return replace(
            cfg,
            owner_images=4_000,
            transfer=500,
            teacher_epochs=6,
            student_epochs=40,
            students=("mlp:hidden=512",),
            box=replace(cfg.box, train=replace(cfg.box.train, epochs=4)),
        )
    return replace(
        cfg,
        teacher_epochs=20,
        student_epochs=20,
        students=("mlp:hidden=64",),
        box=replace(cfg.box, train=replace(cfg.box.train, epochs=20)),
    )


def parse_student(spec: str) -> tuple[str, dict[str, Any]]:
    """`arch` or `arch:key=value,key=value` (ints/floats parsed)."""
    arch, _, rest = spec.partition(":")
    extra: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            extra[k] = int(v)
        except ValueError:
            extra[k] = float(v)
    return arch, extra


def split_owner_transfer(ds: Dataset, cfg: EvalConfig, seed: int) -> tuple[Dataset, Dataset]:
    """The owner's training set and the transfer set (disjoint, drawn per seed); both test on all of ds's
    test split."""
    if cfg.transfer <= 0:
        return ds, ds
    n = len(ds.x_train)
    owner = cfg.owner_images or n - cfg.transfer
    if owner + cfg.transfer > n:
        raise ValueError(f"{owner} owner + {cfg.transfer} transfer images > {n} training images")
    perm = np.random.default_rng(1_000 + seed).permutation(n)

    return ds.subset(perm[:owner], "owner"), ds.subset(perm[owner : owner + cfg.transfer], "transfer")


def _train_cfg(cfg: EvalConfig, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, seed=seed, device=cfg.device, progress=cfg.progress)


def distill_config(cfg: EvalConfig, seed: int) -> DistillConfig:
    """How every student of the protocol is distilled (normal, authorized and each attack's)."""
    return DistillConfig(
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        labelled_fraction=cfg.labelled_fraction,
        train=_train_cfg(cfg, cfg.student_epochs, seed),
    )


def _strip_progress(rec: dict[str, Any]) -> dict[str, Any]:
    """A config record as JSON gives it back, without what does not change the result (progress bars)."""
    out: dict[str, Any] = json.loads(json.dumps(rec))
    (out.get("train") or out).pop("progress", None)
    return out


def _recipe(cfg: BoxConfig | TrainConfig) -> dict[str, Any]:
    return _strip_progress(asdict(cfg))


def owner_teacher(
    cfg: EvalConfig, owner: Dataset, seed: int, cache: Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model owner's teacher, trained on `owner` by the protocol's recipe (and its arch kwargs). With
    `cache`, a teacher saved there is reused when it was made by the same recipe from the same data."""
    dev = resolve_device(cfg.device)
    teacher_cfg = _train_cfg(cfg, cfg.teacher_epochs, seed)
    recipe = {
        "arch": cfg.teacher_arch,
        "extra": cfg.teacher_extra,
        "train": _recipe(teacher_cfg),
        "data": owner.digest(),
    }
    if cache is not None and (cache / "model.json").is_file():
        model, meta = load_model(cache, device=dev)
        if meta["metrics"].get("recipe") == json.loads(json.dumps(recipe)):
            return model, meta["arch_kwargs"]
    teacher, kwargs = train_classifier(owner, cfg.teacher_arch, teacher_cfg, arch_extra=cfg.teacher_extra)
    if cache is not None:
        save_model(
            cache, teacher, arch=cfg.teacher_arch, arch_kwargs=kwargs, ds=owner, metrics={"recipe": recipe}
        )
    return teacher, kwargs


def owner_box(
    cfg: EvalConfig,
    owner: Dataset,
    seed: int,
    out: Path,
    *,
    name: str,
    key: BoxKey | None = None,
    cache: Path | None = None,
) -> tuple[TeacherFn, BoxedModel]:
    """The model owner's side: the teacher (`owner_teacher`, cached in `cache`), boxed into `out` (a fresh
    secret box key unless one is given); returns the teacher function and the reloaded box. With `cache`, a
    box already in `out` is reused when it was made by the same recipe from the same data (so a rerun with
    other student settings trains only students)."""
    dev = resolve_device(cfg.device)
    teacher, kwargs = owner_teacher(cfg, owner, seed, cache)
    teacher_fn = model_fn(teacher, owner)
    box_cfg = replace(
        cfg.box, train=replace(cfg.box.train, seed=seed, device=cfg.device, progress=cfg.progress)
    )
    if cache is not None and (out / "manifest.json").is_file():
        try:
            boxed = load_box(out, device=dev)
        except ArtifactError:
            boxed = None
        if (
            boxed is not None
            and _strip_progress(boxed.manifest["extra"].get("box_config", {})) == _recipe(box_cfg)
            and boxed.manifest["data_digest"] == owner.digest()
            and (key is None or boxed.manifest["checksums"]["box_key"] == key.digest())
        ):
            return teacher_fn, boxed
    boxed = box_teacher(
        teacher,
        {"arch": cfg.teacher_arch, "arch_kwargs": kwargs},
        owner,
        out,
        name=name,
        cfg=box_cfg,
        key=key,
        teacher_top1=accuracy(teacher_fn, owner.x_test, owner.y_test, dev),
    )
    return teacher_fn, boxed


def run_seed(cfg: EvalConfig, ds: Dataset, seed: int, out_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    dev = resolve_device(cfg.device)
    owner, transfer = split_owner_transfer(ds, cfg, seed)
    key = BoxKey.from_int_seed(seed, ds.input_shape, cfg.box.lam)
    teacher_fn, boxed = owner_box(
        cfg,
        owner,
        seed,
        out_dir / f"seed{seed}",
        name=f"eval-seed{seed}",
        key=key,
        cache=out_dir / f"seed{seed}-teacher",
    )
    metrics = boxed.manifest["metrics"]
    result: dict[str, Any] = {
        "seed": seed,
        "teacher": {
            "normal": metrics["teacher_top1"],
            "box_plain": metrics["plain_top1"],
            "box_keyed": metrics["keyed_top1"],
            "box_wrong_key": metrics["wrong_key_top1"],
            "box_stolen": accuracy(boxed.raw_plain_logits, ds.x_test, ds.y_test, dev),
        },
        "students": {},
    }
    # Another box's key, as an attacker who bought a different box would hold it.
    acfg = replace(cfg.attacks, other_key=BoxKey.from_int_seed(seed + 7_777, ds.input_shape, cfg.box.lam))
    api, stolen = plain_api_oracle(boxed), stolen_weights_oracle(boxed)
    dcfg = distill_config(cfg, seed)
    # Every attack's answers and those of its top-1 twin, queried once and shared by all student families.
    accesses: list[tuple[str, Oracle, list[str]]] = [
        ("api", api, attack_names(acfg)),
        ("stolen", stolen, [n for n in cfg.stolen_attacks if n != FORGE]),
    ]
    whitebox = whitebox_oracle(boxed)
    if whitebox is not None:
        accesses.append(("whitebox", whitebox, [n for n in cfg.stolen_attacks if n != FORGE]))
    forging = FORGE in cfg.stolen_attacks and acfg.forge_steps > 0
    trigger = forge_trigger(boxed, torch.from_numpy(transfer.x_train), acfg) if forging else None
    if trigger is not None:  # `stolen/forge`: the network as shipped, fed a trigger forged from the weights
        accesses.append(("stolen", forged_oracle(boxed, trigger), [FORGE]))
    targets: dict[str, tuple[Targets, Targets]] = {}
    for access, oracle, names in accesses:
        twin = top1_oracle(oracle)
        for name in names:
            targets[f"{access}/{name}"] = (
                attack_targets(name, oracle, transfer, acfg),
                attack_targets(name, twin, transfer, acfg),
            )
    teachers = {"normal": teacher_fn, "authorized": boxed.keyed_logits}
    result["twins"] = {}
    workers = cfg.workers if dev.type == "cpu" and not dcfg.train.augment else 1
    with StudentPool(workers) as pool:
        for spec in cfg.students:
            top1, twins = _family(spec, transfer, teachers, targets, dcfg, acfg, dev, pool)
            result["students"][spec] = top1
            result["twins"][spec] = twins
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _family(
    spec: str,
    transfer: Dataset,
    teachers: dict[str, TeacherFn],
    targets: dict[str, tuple[Targets, Targets]],
    dcfg: DistillConfig,
    acfg: AttackConfig,
    dev: torch.device,
    pool: StudentPool,
) -> tuple[dict[str, float], dict[str, float]]:
    """Every student of one family: scratch, one per teacher, and one per attack and per top-1 twin; the
    same answers train the same student (deterministic per seed), so each distinct one is trained once."""
    arch, extra = parse_student(spec)
    jobs: dict[str, Job] = {
        "scratch": partial(distill, transfer, arch, None, dcfg, arch_extra=extra, desc=f"{spec} scratch")
    }
    job_of: dict[str, str] = {"scratch": "scratch"}  # student label -> its job
    acfg = replace(acfg, other_key=None)  # the jobs go to worker processes; they need no key

    def add(label: str, teacher: TeacherFn | None, answers: Targets) -> None:
        job_of[label] = answers.digest()
        if teacher is not None and dcfg.train.augment:  # the teacher answers every augmented batch
            job: Job = partial(
                distill, transfer, arch, teacher, dcfg, arch_extra=extra, desc=f"{spec} {label}"
            )
        else:
            job = partial(
                train_on_targets,
                transfer,
                arch,
                answers,
                dcfg,
                acfg,
                arch_extra=extra,
                desc=f"{spec} {label}",
            )
        jobs.setdefault(job_of[label], job)

    for method, fn in teachers.items():
        add(method, fn, _teacher_targets(fn, transfer, dcfg))
    for method, (answers, twin) in targets.items():
        add(method, None, answers)
        add(f"{method} (top-1 twin)", None, twin)
    students = dict(zip(jobs, pool.train(list(jobs.values())), strict=True))
    scores = {
        job: accuracy(model_fn(st, transfer), transfer.x_test, transfer.y_test, dev)
        for job, st in students.items()
    }
    top1 = {label: scores[job] for label, job in job_of.items() if not label.endswith(" (top-1 twin)")}
    twins = {method: scores[job_of[f"{method} (top-1 twin)"]] for method in targets}
    return top1, twins


def _teacher_targets(teacher: TeacherFn, transfer: Dataset, dcfg: DistillConfig) -> Targets:
    """A teacher's answers for every transfer image, as `distill` asks for them (one query per image)."""
    return Targets(query_teacher(teacher, transfer.x_train, dcfg.teacher_batch_size), dcfg.temperature, False)


def config_record(cfg: EvalConfig) -> dict[str, Any]:
    """The protocol as a report records it (JSON-ready; no key material)."""
    rec = asdict(cfg)
    rec["attacks"].pop("other_key", None)
    return rec


def evaluate(cfg: EvalConfig, out_dir: str | Path, ds: Dataset | None = None) -> dict[str, Any]:
    """Run the protocol and write results.json, results.md and results.png into out_dir."""
    start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    ds = ds or load_dataset(cfg.dataset)
    runs = [run_seed(cfg, ds, seed, out / "boxes") for seed in cfg.seeds]
    report = build_report(config_record(cfg), runs, ds.digest(), time.perf_counter() - start)
    write_report(report, out)
    return report
