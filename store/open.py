"""A path or URL -> a zarr store: local, s3, gs, http(s), zip, hf. The one place that knows schemes.

    runs/a.zarr, file:///abs/a.zarr   local folder            read, write
    s3://bucket/a.zarr, gs://...      object store (fsspec)   read, write
    http(s)://host/a.zarr             web server (fsspec)     read
    a.zarr.zip (a local path)         packed store            read
    hf://datasets/ORG/NAME/a.zarr     Hugging Face dataset    read (huggingface_hub's filesystem)

Credentials and endpoints come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...); more
options for the filesystem (fsspec's `storage_options`) come from `--storage-options JSON`, which the CLI
scopes around one library call with `storage_options(...)`.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NamedTuple

# fsspec implementation of each remote scheme, and what to install when it is missing.
REMOTE = {
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "hf": "huggingface_hub",
}
WRITABLE = frozenset({"local", "s3", "gs", "gcs"})
KNOWN = "a local folder, file://, s3://, gs://, http(s)://, hf://datasets/ORG/NAME/PATH, or a .zarr.zip file"

_OPTIONS: ContextVar[dict[str, Any] | None] = ContextVar("tide_storage_options", default=None)


class LocationError(ValueError):
    """A store location tide cannot use: the message names it and the fix."""


class Where(NamedTuple):
    """Where a store lives."""

    text: str
    """The location as the user wrote it (URLs keep their scheme), for messages."""
    scheme: str
    """'local', 'zip', or a URL scheme from REMOTE."""
    path: Path | None
    """The local folder or zip file; None for a URL."""

    @property
    def writable(self) -> bool:
        return self.scheme in WRITABLE

    @property
    def local(self) -> bool:
        return self.path is not None


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(value: object) -> bool:
    """A string with a scheme (`s3://...`); a Path never is one."""
    return isinstance(value, str) and _URL.match(value) is not None


def as_location(value: str | Path) -> str | Path:
    """What a config field holding a store location keeps: the URL string, or a Path."""
    return value if is_url(value) else Path(value)


def where(value: str | Path) -> Where:
    """Classify a store location; raise LocationError for a scheme tide does not know."""
    text = str(value)
    m = _URL.match(text) if isinstance(value, str) else None
    if m is None:
        path = Path(value)
        return Where(text, "zip" if path.suffix == ".zip" else "local", path)
    scheme = m.group(1).lower()
    if scheme == "file":
        return where(Path(text[len("file://") :]))
    if scheme not in REMOTE:
        raise LocationError(f"{text}: unknown scheme {scheme + '://'!r}; a store is {KNOWN}")
    if scheme == "hf" and not text.startswith("hf://datasets/"):
        raise LocationError(
            f"{text}: a store on the Hugging Face hub lives in a dataset repository; write "
            "hf://datasets/ORG/NAME/PATH.zarr"
        )
    return Where(text.rstrip("/"), scheme, None)


def canonical(value: str | Path) -> str:
    """A location as recorded (e.g. in sae.json): a local path made absolute, a URL as written."""
    loc = where(value)
    return str(loc.path.resolve()) if loc.local else loc.text


@contextmanager
def storage_options(options: str | dict[str, Any] | None) -> Iterator[None]:
    """Pass fsspec `storage_options` (a dict, or JSON text from --storage-options) to stores opened inside."""
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError as e:
            raise LocationError(
                f"--storage-options {options!r} is not JSON ({e}); write e.g. '{{\"anon\": true}}'"
            ) from None
        if not isinstance(options, dict):
            raise LocationError(
                f"--storage-options {options!r} must be a JSON object, e.g. '{{\"anon\": true}}'"
            )
    token = _OPTIONS.set(dict(options or {}))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def zarr_store(loc: Where, mode: str = "r") -> Any:
    """The zarr store object at `loc`, opened read-only (mode 'r') or for writing ('w')."""
    from zarr.storage import FsspecStore, LocalStore, ZipStore

    if mode != "r" and not loc.writable:
        raise read_only(loc)
    if loc.scheme == "local":
        return LocalStore(loc.path, read_only=mode == "r")
    if loc.scheme == "zip":
        if not loc.path.is_file():
            raise LocationError(
                f"store {loc.text} does not exist; make one with `tide store pack STORE {loc.text}`"
            )
        store = ZipStore(loc.path, mode="r")
        try:
            store._sync_open()  # zarr opens it on first use through its own API; tide also reads keys directly
        except zipfile.BadZipFile as e:
            raise LocationError(f"{loc.text} is not a zip file ({e}); make one with `tide store pack`") from e
        return store
    try:
        return FsspecStore.from_url(loc.text, storage_options=_OPTIONS.get() or {}, read_only=mode == "r")
    except ImportError as e:
        raise missing_package(loc) from e


def read_only(loc: Where) -> LocationError:
    kind = {"zip": "a packed .zip store", "hf": "a Hugging Face dataset"}.get(
        loc.scheme, f"a {loc.scheme} URL"
    )
    return LocationError(
        f"{loc.text} is {kind}, which tide only reads; write the store to a local folder or to s3:// or gs://, "
        "then share it (README, 'Sharing a store')"
    )


def missing_package(loc: Where) -> LocationError:
    package = REMOTE[loc.scheme]
    return LocationError(f"{loc.text}: reading {loc.scheme}:// URLs needs {package}: pip install {package}")


def explain(loc: Where, e: BaseException) -> LocationError | None:
    """A one-line reason for an error met reaching `loc` (credentials, bucket, network), or None."""
    name = type(e).__name__
    text = f"{name}: {e}"
    if isinstance(e, ImportError):
        return missing_package(loc)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return LocationError(
            f"{loc.text}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or pass --storage-options '{\"anon\": true}' for a public bucket"
        )
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return LocationError(
            f"{loc.text}: the bucket {bucket(loc)!r} does not exist; create it or fix the URL"
        )
    if isinstance(e, PermissionError) or "AccessDenied" in text or "403" in text:
        return LocationError(f"{loc.text}: access denied ({e}); check the credentials and their permissions")
    if name in (
        "ClientConnectorError",
        "EndpointConnectionError",
        "ConnectionError",
        "ClientConnectionError",
    ):
        return LocationError(f"{loc.text}: cannot connect ({e}); check the URL and AWS_ENDPOINT_URL")
    return None


def bucket(loc: Where) -> str:
    return loc.text.split("://", 1)[1].split("/", 1)[0]


def bucket_exists(store: Any, loc: Where) -> bool:
    """Whether an s3/gs URL's bucket exists (True for other schemes); errors become LocationError."""
    if loc.scheme not in ("s3", "gs", "gcs"):
        return True
    from zarr.core.sync import sync

    try:
        return bool(sync(store.fs._exists(bucket(loc))))
    except Exception as e:
        raise explain(loc, e) or LocationError(f"{loc.text}: cannot reach the bucket ({e})") from e


def read_json(store: Any, loc: Where, key: str = "zarr.json") -> dict | None:
    """The JSON document at `key` of `store` (None when it is not there); network errors become LocationError."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    except Exception as e:
        raise explain(loc, e) or LocationError(
            f"{loc.text}: reading {key} failed ({type(e).__name__}: {e})"
        ) from e
    if buf is None:
        return None
    try:
        doc = json.loads(buf.to_bytes())
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def list_top(store: Any) -> list[str]:
    """Names directly under the store's root."""
    from zarr.core.sync import sync

    async def names() -> list[str]:
        return [n async for n in store.list_dir("")]

    return sorted(sync(names()))
