"""Sealing commands: `sdb seal`, `sdb unseal`, `sdb reseal` (rotation) and `sdb seal-key new`.

The master keys come from SDB_SEAL_KEY_FILE (the current one: new seals use it) and SDB_SEAL_KEY_DIR
(further `*.key` files that may open older seals), as for the service; `--key-file` overrides the first.
Each command takes artifact directories, or a models directory whose artifacts it converts one by one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

Dirs = Annotated[
    list[Path], typer.Argument(help="Box artifact directories, or a directory of them (e.g. models).")
]
KeyFileOpt = Annotated[
    Path | None, typer.Option("--key-file", help="Master key file (default: SDB_SEAL_KEY_FILE).")
]
seal_key_app = typer.Typer(help="Master keys for sealed artifacts.", no_args_is_help=True)


def _artifacts(dirs: list[Path]) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        if (d / "manifest.json").is_file():
            out.append(d)
        elif d.is_dir():
            out += [e for e in sorted(d.iterdir()) if (e / "manifest.json").is_file()]
        else:
            raise typer.BadParameter(f"{d}: not a box artifact directory")
    if not out:
        raise typer.BadParameter("no box artifact (a directory with manifest.json) found")
    return out


def _keyring(key_file: Path | None) -> object:
    import os

    from sdb_core.seal import KEY_DIR_ENV, KEY_FILE_ENV, Keyring

    return Keyring.from_paths(
        key_file or os.environ.get(KEY_FILE_ENV) or None, os.environ.get(KEY_DIR_ENV) or None
    )


def seal(dirs: Dirs, key_file: KeyFileOpt = None) -> None:
    """Seal artifacts in place under the current master key (AES-256-GCM, a fresh data key each); the
    plaintext weights and box key are removed once the sealed artifact is in place."""
    from sdb_core.artifact import read_manifest, seal_artifact
    from sdb_core.seal import Keyring, is_sealed

    ring = _keyring(key_file)
    assert isinstance(ring, Keyring)
    for d in _artifacts(dirs):
        if is_sealed(read_manifest(d)):
            typer.echo(f"{d}: already sealed, skipped", err=True)
            continue
        master = ring.sealing_key(str(d))
        seal_artifact(d, master)
        typer.echo(json.dumps({"sealed": str(d), "key_id": master.key_id}))


def unseal(dirs: Dirs, key_file: KeyFileOpt = None) -> None:
    """Write sealed artifacts back as plaintext files (a migration away from sealing)."""
    from sdb_core.artifact import read_manifest, unseal_artifact
    from sdb_core.seal import Keyring, is_sealed

    ring = _keyring(key_file)
    assert isinstance(ring, Keyring)
    for d in _artifacts(dirs):
        if not is_sealed(read_manifest(d)):
            typer.echo(f"{d}: not sealed, skipped", err=True)
            continue
        unseal_artifact(d, ring)
        typer.echo(json.dumps({"unsealed": str(d)}))


def reseal(
    dirs: Dirs,
    to: Annotated[Path, typer.Option("--to", help="The new master key file.")],
    key_file: KeyFileOpt = None,
    rekey: Annotated[
        bool,
        typer.Option(help="Also draw a fresh data key and re-encrypt every file (after a master key leak)."),
    ] = False,
) -> None:
    """Rotation: re-wrap each artifact's data key under the master key --to (opened with SDB_SEAL_KEY_FILE
    / SDB_SEAL_KEY_DIR), without retraining; --rekey re-encrypts the files as well."""
    from sdb_core.artifact import read_manifest, reseal_artifact
    from sdb_core.seal import Keyring, is_sealed, read_master_key

    ring = _keyring(key_file)
    assert isinstance(ring, Keyring)
    new = read_master_key(to, "--to")
    ring.keys.setdefault(new.key_id, new)
    for d in _artifacts(dirs):
        if not is_sealed(read_manifest(d)):
            typer.echo(f"{d}: not sealed, skipped (use `sdb seal`)", err=True)
            continue
        old = read_manifest(d)["seal"]["key_id"]
        reseal_artifact(d, ring, new, rekey=rekey)
        typer.echo(json.dumps({"resealed": str(d), "from": old, "to": new.key_id, "rekeyed": rekey}))


@seal_key_app.command("new")
def seal_key_new(
    path: Annotated[Path, typer.Argument(help="Where to write it (never over a file).")],
) -> None:
    """Write a fresh master key (32 random bytes as 64 hex characters, mode 0600) and print its id."""
    from sdb_core.seal import new_master_key

    try:
        mk = new_master_key(path)
    except FileExistsError:
        raise typer.BadParameter(f"{path} exists; a master key is never overwritten") from None
    typer.echo(json.dumps({"key_file": str(path), "key_id": mk.key_id}))


@seal_key_app.command("id")
def seal_key_id(path: Annotated[Path, typer.Argument(help="A master key file.")]) -> None:
    """Print the id of a master key file (what manifests name in `seal.key_id`)."""
    from sdb_core.seal import read_master_key

    typer.echo(read_master_key(path, str(path)).key_id)


def register(app: typer.Typer) -> None:
    app.command("seal")(seal)
    app.command("unseal")(unseal)
    app.command("reseal")(reseal)
    app.add_typer(seal_key_app, name="seal-key")
