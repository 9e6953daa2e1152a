"""The artifacts store ($AMAAS_ARTIFACTS_URL: a folder, a file:// or an s3:// URL): where `amaas package` puts
each bento (BentoML's own export, models included) and where a replica in an empty folder fetches the champion's
and every later champion's from (BentoML's import), so no replica needs the project's checkout.

Layout: `<store>/bentos/<bento name>/<bento version>.bento`. A local export is written beside its final name and
renamed into place, so a reader never sees half a file; S3 writes an object whole. An `s3://` store needs
BentoML's S3 filesystem (`pip install fs-s3fs`); credentials come from the usual AWS environment variables.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("amaas.artifacts")


class ArtifactsError(RuntimeError):
    """A bento could not be put into or fetched from the artifacts store."""


def _local(url: str) -> Path | None:
    """The folder of a local store (a path or file:// URL), or None for a remote one."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path)
    return Path(url) if parts.scheme == "" else None


def bento_location(url: str, tag: str) -> str:
    """Where bento `tag` (name:version) lives in the store at `url`."""
    name, version = tag.split(":", 1)
    folder = _local(url)
    if folder is not None:
        return str(folder / "bentos" / name / f"{version}.bento")
    return f"{url.rstrip('/')}/bentos/{name}/{version}.bento"


def put_bento(url: str, tag: str) -> str:
    """Export bento `tag` from the local BentoML store into the store at `url` (once: an existing copy is kept);
    where it went."""
    import bentoml

    target = bento_location(url, tag)
    folder = _local(url)
    try:
        if folder is None:
            return str(bentoml.export_bento(tag, target))
        final = Path(target)
        if final.is_file():
            return target
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}-", suffix=".bento", dir=final.parent)
        os.close(fd)
        try:
            bentoml.export_bento(tag, tmp)
            os.replace(tmp, final)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except (OSError, bentoml.exceptions.BentoMLException) as exc:
        raise ArtifactsError(f"could not put bento {tag} into the artifacts store {url}: {exc}") from exc
    log.info("bento %s put into the artifacts store: %s", tag, target)
    return target


def fetch_bento(url: str, tag: str) -> None:
    """Import bento `tag` (and the models it carries) from the store at `url` into the local BentoML store, unless
    it is there already."""
    import bentoml

    try:
        bentoml.get(tag)
        return
    except bentoml.exceptions.NotFound:
        pass
    source = bento_location(url, tag)
    if _local(url) is not None and not Path(source).is_file():
        raise ArtifactsError(f"bento {tag} is not in the artifacts store ({source} is missing): run `amaas package` "
                             f"on the project host with {'AMAAS_ARTIFACTS_URL'} set to this store")
    try:
        bentoml.import_bento(source)
    except bentoml.exceptions.BentoMLException as exc:
        if "exists" in str(exc).lower():  # another worker of this replica imported it meanwhile
            return
        raise ArtifactsError(f"could not fetch bento {tag} from the artifacts store {url}: {exc}") from exc
    log.info("bento %s fetched from the artifacts store", tag)
