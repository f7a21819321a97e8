"""Quick tuning trial: teacher -> box -> students (one seed). Usage: core_trial.py key=value ..."""

import sys, time, json
import torch
from sdb_core.data import load_digits
from sdb_core.training import TrainConfig, train_classifier, accuracy, model_fn, resolve_device
from sdb_core.box import BoxConfig, train_box, wrong_key_fn
from sdb_core.artifact import BoxedModel
from sdb_core.keys import BoxKey
from sdb_core.distill import DistillConfig, distill

torch.set_num_threads(1)
args = dict(a.split("=") for a in sys.argv[1:])
seed = int(args.pop("seed", 0))
ep = int(args.pop("ep", 30))
bep = int(args.pop("bep", 30))
sep = int(args.pop("sep", 30))
frac = float(args.pop("frac", 1.0))
students = args.pop("students", "small_cnn:8,mlp").split(",")
tw = int(args.pop("tw", 32))
blr = float(args.pop("blr", 0.05))
ds = load_digits()
dev = resolve_device("cpu")
t0 = time.time()
teacher, kw = train_classifier(
    ds, "small_cnn", TrainConfig(epochs=ep, seed=seed, progress=False), arch_extra={"width": tw}
)
tacc = accuracy(model_fn(teacher, ds), ds.x_test, ds.y_test, dev)
bcfg = BoxConfig(train=TrainConfig(epochs=bep, seed=seed, progress=False, lr=blr))
for k, v in args.items():
    setattr(bcfg, k, v if k == "disturb_form" else (int(v) if k == "freeze_layers" else float(v)))
key = BoxKey.from_int_seed(seed + 100, ds.input_shape, bcfg.lam)
box = train_box(teacher, ds, arch="small_cnn", arch_kwargs=kw, key=key, cfg=bcfg)
man = {
    "name": "t",
    "version": "1",
    "input_shape": list(ds.input_shape),
    "num_classes": 10,
    "class_names": ds.class_names,
    "temperature": 4.0,
    "arch": "small_cnn",
    "normalization": ds.normalization,
    "lam": bcfg.lam,
}
bm = BoxedModel(box, key, man, "cpu")
wk = wrong_key_fn(bm, bcfg.lam, 999)
r = {
    "teacher": tacc,
    "plain": accuracy(bm.plain_logits, ds.x_test, ds.y_test, dev),
    "keyed": accuracy(bm.keyed_logits, ds.x_test, ds.y_test, dev),
    "wrongkey": accuracy(wk, ds.x_test, ds.y_test, dev),
}
t1 = time.time()
dcfg = lambda: DistillConfig(labelled_fraction=frac, train=TrainConfig(epochs=sep, seed=seed, progress=False))
for s in students:
    arch, _, w = s.partition(":")
    extra = {"width": int(w)} if w else {}
    teachers = {
        "scratch": None,
        "normal": model_fn(teacher, ds),
        "unauth": bm.plain_logits,
        "auth": bm.keyed_logits,
        "wrong": wk,
    }
    for name, fn in teachers.items():
        st = distill(ds, arch, fn, dcfg(), arch_extra=extra)
        r[f"{s}/{name}"] = accuracy(model_fn(st, ds), ds.x_test, ds.y_test, dev)
r["t_box"] = round(t1 - t0, 1)
r["t_students"] = round(time.time() - t1, 1)
print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}))
import torch.nn.functional as F
from sdb_core.training import predict

for nm, fn in [
    ("teacher", model_fn(teacher, ds)),
    ("plain", bm.plain_logits),
    ("keyed", bm.keyed_logits),
    ("wrong", wk),
]:
    z = predict(fn, ds.x_test, dev)
    p = F.softmax(z / 4, 1)
    y = torch.from_numpy(ds.y_test)
    pt = p[torch.arange(len(y)), y]
    p2 = p.clone()
    p2[torch.arange(len(y)), y] = 0
    top2 = p2.sort(1, descending=True).values
    print(
        nm,
        "p4_true=%.3f p4_2nd=%.3f p4_3rd=%.3f logit_range=%.1f"
        % (pt.mean(), top2[:, 0].mean(), top2[:, 1].mean(), (z.max(1).values - z.min(1).values).mean()),
    )
