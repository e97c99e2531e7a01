"""A path or URL -> a zarr store: local, s3, gs, http(s), zip, hf. The one place that knows schemes.

    runs/a.zarr, file:///abs/a.zarr   local folder            read, write
    s3://bucket/a.zarr, gs://...      object store (obstore)  read, write
    http(s)://host/a.zarr             web server (fsspec)     read
    a.zarr.zip (a local path)         packed store            read
    hf://datasets/ORG/NAME/a.zarr     Hugging Face dataset    read (huggingface_hub's filesystem)

Object stores go through zarr's obstore-backed ObjectStore, not fsspec's s3fs: on the loopback S3 server of
the tests it read tide's shuffled chunks about 2x faster (store/FORMAT.md, "Remote stores", has the figures).
Credentials and endpoints come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_*, ...);
more options come from `--storage-options JSON`, which the CLI scopes around one library call with
`storage_options(...)`: obstore's config keys (`region`, `endpoint`, `skip_signature`, `client_options`, ...),
or for s3 the s3fs spellings people already use (`anon`, `key`, `secret`, `endpoint_url`, ...); for http and
hf they are fsspec's `storage_options`.
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

from tide.store.timeouts import RemoteError, http_budget, obstore_budget

# What reaches each remote scheme, and so what to install when it is missing.
REMOTE = {
    "s3": "obstore",
    "gs": "obstore",
    "gcs": "obstore",
    "http": "aiohttp",
    "https": "aiohttp",
    "hf": "huggingface_hub",
}
WRITABLE = frozenset({"local", "s3", "gs", "gcs"})
OBJECT_STORES = frozenset({"s3", "gs", "gcs"})
# s3fs's spellings of obstore's S3 config keys, so that options written for s3fs keep working.
S3FS_KEYS = {
    "anon": "skip_signature",
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
    "endpoint_url": "endpoint",
    "region_name": "region",
}
# Where each object store looks for credentials, and how to read a public bucket without them.
CREDENTIALS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass --storage-options "
    "'{\"anon\": true}' for a public bucket",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run `gcloud auth "
    "application-default login`), or pass --storage-options '{\"skip_signature\": true}' for a public bucket",
}
CREDENTIALS["gcs"] = CREDENTIALS["gs"]
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
    """What a config field holding a store location keeps: the URL string, or a Path (file:// URLs too)."""
    if is_url(value) and value.lower().startswith("file://"):
        return Path(value[len("file://") :])
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
        text = options
        try:
            options = json.loads(text)
        except ValueError as e:
            raise LocationError(
                f"--storage-options {text!r} is not JSON ({e}); write e.g. '{{\"anon\": true}}'"
            ) from None
        if not isinstance(options, dict):
            raise LocationError(
                f"--storage-options {text!r} must be a JSON object, e.g. '{{\"anon\": true}}'"
            )
    token = _OPTIONS.set(dict(options or {}))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current_storage_options() -> dict[str, Any]:
    """The storage options in force here (see `storage_options`), e.g. to hand them to another process."""
    return dict(_OPTIONS.get() or {})


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
    if loc.scheme in OBJECT_STORES:
        return _object_store(loc, read_only=mode == "r")
    options = _OPTIONS.get() or {}
    try:
        if loc.scheme in ("http", "https"):
            options = http_budget(options)
        return FsspecStore.from_url(loc.text, storage_options=options, read_only=mode == "r")
    except ImportError as e:
        raise missing_package(loc) from e


def _object_store(loc: Where, read_only: bool) -> Any:
    """zarr's obstore-backed store for an s3:// or gs:// URL, configured from the environment and the options."""
    try:
        from obstore.store import from_url
        from zarr.storage import ObjectStore
    except ImportError as e:
        raise missing_package(loc) from e
    url = "gs://" + loc.text.split("://", 1)[1] if loc.scheme == "gcs" else loc.text
    options = obstore_budget(obstore_options(loc.scheme, _OPTIONS.get() or {}))
    if loc.scheme == "s3":
        options = _aws_credentials(loc, options)
    try:
        inner = from_url(url, **options)
    except Exception as e:  # obstore's config errors (unknown key, bad value) are not one class
        raise LocationError(
            f"{loc.text}: the storage options {json.dumps(_OPTIONS.get() or {})} were refused ({first_line(e)}); "
            "--storage-options takes obstore's config keys (e.g. region, endpoint, skip_signature)"
        ) from e
    return ObjectStore(inner, read_only=read_only)


def obstore_options(scheme: str, options: dict[str, Any]) -> dict[str, Any]:
    """obstore keyword arguments for `scheme` from --storage-options: s3fs spellings are translated for s3, and
    plain http is allowed when the S3 endpoint (from the options or AWS_ENDPOINT_URL) is an http:// URL, which
    is what a local S3-compatible server (MinIO, moto) serves."""
    import os

    out: dict[str, Any] = {}
    for key, value in options.items():
        if scheme == "s3" and key == "client_kwargs" and isinstance(value, dict):
            out |= {S3FS_KEYS.get(k, k): v for k, v in value.items()}
        else:
            out[S3FS_KEYS.get(key, key) if scheme == "s3" else key] = value
    if scheme == "s3":
        endpoint = out.get("endpoint") or next(
            (
                os.environ[k]
                for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
                if os.environ.get(k)
            ),
            "",
        )
        if str(endpoint).startswith("http://"):
            out["client_options"] = {"allow_http": True, **(out.get("client_options") or {})}
    return out


def _aws_credentials(loc: Where, options: dict[str, Any]) -> dict[str, Any]:
    """Credentials from boto3's chain when neither the options nor AWS_ACCESS_KEY_ID give keys: obstore alone
    reads only the environment and the instance metadata service, not ~/.aws profiles (AWS_PROFILE, SSO)."""
    import os

    if options.get("skip_signature") or options.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID"):
        return options
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return options  # obstore's own search: environment, web identity, instance metadata
    session = boto3.Session()
    if session.get_credentials() is None:
        raise explain(loc, PermissionError("Unable to locate credentials"))
    return {**options, "credential_provider": Boto3CredentialProvider(session)}


def first_line(e: BaseException) -> str:
    """An exception as one line (obstore's messages go on with a multi-line debug dump)."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def read_only(loc: Where) -> LocationError:
    kind = {"zip": "a packed .zip store", "hf": "a Hugging Face dataset"}.get(
        loc.scheme, f"a {loc.scheme} URL"
    )
    return LocationError(
        f"{loc.text} is {kind}, which tide only reads; write the store to a local folder or to s3:// or gs://, "
        "then share it (docs/stores.md, 'Stores at URLs, and sharing a store')"
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
    if (
        name in ("NoCredentialsError", "PartialCredentialsError", "UnauthenticatedError")
        or "Unable to locate credentials" in text
        or "169.254.169.254" in text  # obstore found no credentials and asked the instance metadata service
    ):
        return LocationError(
            f"{loc.text}: no credentials found; {CREDENTIALS.get(loc.scheme, CREDENTIALS['s3'])}"
        )
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return LocationError(
            f"{loc.text}: the bucket {bucket(loc)!r} does not exist; create it or fix the URL"
        )
    if isinstance(e, PermissionError) or "AccessDenied" in text or "403" in text:
        return LocationError(
            f"{loc.text}: access denied ({first_line(e)}); check the credentials and their permissions"
        )
    if (
        name
        in (
            "ClientConnectorError",
            "EndpointConnectionError",
            "ConnectionError",
            "ClientConnectionError",
        )
        or "error sending request" in text
    ):
        endpoint = " and AWS_ENDPOINT_URL" if loc.scheme == "s3" else ""
        return LocationError(f"{loc.text}: cannot connect ({first_line(e)}); check the URL{endpoint}")
    return None


def remote_error(e: BaseException, loc: Where) -> LocationError | None:
    """The one-line error for a request to the remote store at `loc` that failed (obstore's and aiohttp's
    errors, store/timeouts.py's RemoteError, a timeout), found anywhere in `e`'s chain; None when there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, LocationError | RemoteError):
            return LocationError(str(e))
        if type(e).__module__.split(".")[0] in ("obstore", "aiohttp") or isinstance(e, TimeoutError):
            return explain(loc, e) or LocationError(
                f"{loc.text}: the store stopped answering ({first_line(e)})"
            )
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def bucket(loc: Where) -> str:
    return loc.text.split("://", 1)[1].split("/", 1)[0]


def bucket_exists(store: Any, loc: Where) -> bool:
    """Whether an s3/gs URL's bucket exists (True for other schemes); errors become LocationError."""
    if loc.scheme not in OBJECT_STORES:
        return True
    import obstore
    from zarr.core.sync import sync

    async def first_page() -> None:
        # Listing answers NoSuchBucket where a GET of a missing key answers only "not found".
        async for _ in obstore.list(store.store, chunk_size=1):
            return

    try:
        sync(first_page())
    except Exception as e:
        if "NoSuchBucket" in str(e) or "bucket does not exist" in str(e).lower():
            return False
        raise explain(loc, e) or LocationError(
            f"{loc.text}: cannot reach the bucket ({first_line(e)})"
        ) from e
    return True


def read_json(store: Any, loc: Where, key: str = "zarr.json") -> dict | None:
    """The JSON document at `key` of `store` (None when it is not there); network errors become LocationError."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    except Exception as e:
        raise explain(loc, e) or LocationError(f"{loc.text}: reading {key} failed ({first_line(e)})") from e
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
