"""Reading the bytes of an ImageSource: S3, inline base64, or (opt-in) a URL.

Every failure is a FetchError (stage "fetch") with a stable code; see
`ImageFetcher.fetch`. Size limits are enforced before and while reading, so an
oversized object is refused without being downloaded.

The URL route is SSRF-hardened: the host is resolved once, every resolved
address must be public (unless the host is allowlisted), and the connection
goes to that vetted address, so a second DNS answer cannot redirect it
(DNS rebinding). Redirects are followed by hand, each target vetted again.
Proxy environment variables are deliberately not honoured.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urljoin, urlsplit

import boto3
import urllib3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from pipeline.config import FetchSettings, S3Settings
from pipeline.errors import FetchError
from schemas.requests import ImageSource, S3Source

_NOT_FOUND = ("s3.not_found", False)
_DENIED = ("s3.access_denied", False)
_UNAVAILABLE = ("s3.unavailable", True)
# S3 error code (or bare HTTP status, which is all a HEAD response carries)
# -> (our code, retryable).
_S3_ERROR_CODES: dict[str, tuple[str, bool]] = {
    "NoSuchBucket": ("s3.bucket_not_found", False),
    "NoSuchKey": _NOT_FOUND,
    "NoSuchVersion": _NOT_FOUND,
    "NotFound": _NOT_FOUND,
    "404": _NOT_FOUND,
    # A version id that names a delete marker.
    "MethodNotAllowed": _NOT_FOUND,
    "405": _NOT_FOUND,
    "InvalidArgument": ("s3.invalid_request", False),
    "400": ("s3.invalid_request", False),
    "AccessDenied": _DENIED,
    "AllAccessDisabled": _DENIED,
    "Forbidden": _DENIED,
    "403": _DENIED,
    "SlowDown": _UNAVAILABLE,
    "Throttling": _UNAVAILABLE,
    "ThrottlingException": _UNAVAILABLE,
    "RequestLimitExceeded": _UNAVAILABLE,
    "RequestTimeout": _UNAVAILABLE,
    "ServiceUnavailable": _UNAVAILABLE,
    "InternalError": _UNAVAILABLE,
    "500": _UNAVAILABLE,
    "502": _UNAVAILABLE,
    "503": _UNAVAILABLE,
    "504": _UNAVAILABLE,
}
_S3_CONNECTION_ERRORS = (BotoConnectionError, HTTPClientError, ResponseStreamingError, IncompleteReadError)
_S3_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK_BYTES = 64 * 1024


class ImageFetcher:
    """Fetches image bytes; one instance is shared by all fetch threads.

    Holds a single boto3 client (boto3 clients are thread-safe, sessions are
    not, so the session is used only here in the constructor). The client is
    public so callers can attach botocore event hooks (metrics, tests).
    """

    def __init__(self, s3: S3Settings, fetch: FetchSettings) -> None:
        self._s3_settings = s3
        self._limits = fetch
        self.s3_client: BaseClient = build_s3_client(s3)

    def fetch(self, source: ImageSource) -> bytes:
        """Return the bytes `source` names, or raise FetchError.

        Codes: s3.bucket_not_allowed, s3.bucket_not_found, s3.not_found,
        s3.access_denied, s3.invalid_request, s3.unavailable*, s3.connection_error*,
        s3.credentials_unavailable*, s3.error, fetch.too_large, image.empty,
        request.invalid_base64, url.disabled, url.invalid, url.dns_error(*),
        url.forbidden_address, url.too_many_redirects, url.timeout*,
        url.connection_error*, url.tls_error, url.http_error(*)
        (* = retryable; (*) = depends on the cause).
        """
        if source.s3 is not None:
            return self._fetch_s3(source.s3)
        if source.url is not None:
            return fetch_url(source.url, self._limits)
        return decode_inline(source.base64 or "", self._limits.max_inline_bytes)

    def _fetch_s3(self, source: S3Source) -> bytes:
        self._check_bucket_allowed(source.bucket)
        location: dict[str, str] = {"Bucket": source.bucket, "Key": source.key}
        if source.version_id:
            location["VersionId"] = source.version_id
        with self._s3_errors(source):
            head = self.s3_client.head_object(**location)
        _check_size(int(head["ContentLength"]), self._limits.max_bytes, source_name=_describe(source))
        with self._s3_errors(source):
            data = _read_at_most(self.s3_client.get_object(**location)["Body"], self._limits.max_bytes + 1)
        # Checked again: the object may have been replaced since the HEAD.
        _check_size(len(data), self._limits.max_bytes, source_name=_describe(source))
        return data

    def _check_bucket_allowed(self, bucket: str) -> None:
        allowed = self._s3_settings.allowed_buckets
        if allowed and bucket not in allowed:
            raise FetchError(f"bucket {bucket!r} is not in s3.allowed_buckets", code="s3.bucket_not_allowed")

    @contextmanager
    def _s3_errors(self, source: S3Source) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            raise self._client_error(exc, source) from None
        except _S3_CONNECTION_ERRORS as exc:
            raise FetchError(f"{_describe(source)}: {exc}", code="s3.connection_error", retryable=True) from None
        except _S3_CREDENTIAL_ERRORS as exc:
            # The worker's fault, not the request's: retrying after a fix helps.
            raise FetchError(f"{_describe(source)}: {exc}", code="s3.credentials_unavailable", retryable=True) from None
        except ParamValidationError as exc:
            raise FetchError(f"{_describe(source)}: {exc}", code="s3.invalid_request") from None
        except BotoCoreError as exc:
            raise FetchError(f"{_describe(source)}: {exc!r}", code="s3.error") from None

    def _client_error(self, exc: ClientError, source: S3Source) -> FetchError:
        error = exc.response.get("Error", {})
        s3_code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        fallback = _UNAVAILABLE if status >= 500 else ("s3.error", False)
        code, retryable = _S3_ERROR_CODES.get(s3_code, fallback)
        if s3_code in ("404", "NotFound") and not self._bucket_exists(source.bucket):
            code = "s3.bucket_not_found"
        message = f"{_describe(source)}: {s3_code or status} {error.get('Message', '')}".rstrip()
        return FetchError(message, code=code, retryable=retryable)

    def _bucket_exists(self, bucket: str) -> bool:
        # A HEAD 404 carries no body, so it cannot say whether the key or the
        # whole bucket is missing; only a second request can.
        try:
            self.s3_client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            return str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound")
        except BotoCoreError:
            pass  # cannot tell; "not found" is still true of the key
        return True


def build_s3_client(settings: S3Settings) -> BaseClient:
    """The one S3 client: standard AWS credential chain, no botocore retries."""
    config = Config(
        region_name=settings.region,
        max_pool_connections=settings.max_pool_connections,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # Retrying is the pipeline's decision (FetchError.retryable); botocore
        # retrying underneath would multiply attempts and hide latency.
        # (`max_attempts` would mean *retries*, so total_max_attempts it is.)
        retries={"mode": "standard", "total_max_attempts": 1},
    )
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, config=config)


def _read_at_most(body: Any, limit: int) -> bytes:
    try:
        return bytes(body.read(limit))
    finally:
        # Closing with bytes unread drops the connection instead of draining it.
        body.close()


def _describe(source: S3Source) -> str:
    version = f"?versionId={source.version_id}" if source.version_id else ""
    return f"s3://{source.bucket}/{source.key}{version}"


def _check_size(size: int, max_bytes: int, *, source_name: str) -> None:
    if size == 0:
        raise FetchError(f"{source_name} is 0 bytes", code="image.empty")
    if size > max_bytes:
        raise FetchError(f"{source_name} is over the {max_bytes}-byte limit", code="fetch.too_large")


# --- inline base64 -----------------------------------------------------------


def decode_inline(payload: str, max_bytes: int) -> bytes:
    """Decode a strict (no whitespace) base64 payload of at most `max_bytes`."""
    # Four characters decode to at most three bytes: refuse before decoding.
    if len(payload) > 4 * (max_bytes // 3 + 2):
        raise FetchError(f"inline payload is over the {max_bytes}-byte limit", code="fetch.too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FetchError(f"inline payload is not valid base64: {exc}", code="request.invalid_base64") from None
    _check_size(len(data), max_bytes, source_name="inline payload")
    return data


# --- URLs --------------------------------------------------------------------


@dataclass(frozen=True)
class UrlTarget:
    """One URL, split into what a vetted connection needs."""

    url: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def fetch_url(url: str, limits: FetchSettings) -> bytes:
    """GET `url` under the SSRF, redirect, size and time limits in `limits`."""
    if not limits.url_enabled:
        raise FetchError("fetching images by URL is disabled (fetch.url_enabled)", code="url.disabled")
    deadline = time.monotonic() + limits.url_timeout_s
    for _ in range(limits.url_max_redirects + 1):
        target = parse_url(url)
        address = vetted_address(target, limits.url_allowed_hosts)
        location = _get_or_redirect(target, address, limits.max_bytes, deadline)
        if isinstance(location, bytes):
            return location
        url = urljoin(url, location)
    raise FetchError(
        f"more than {limits.url_max_redirects} redirects, last to {url}", code="url.too_many_redirects"
    )


def parse_url(url: str) -> UrlTarget:
    """Split an http(s) URL, raising `url.invalid` for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError(f"malformed URL {url!r}: {exc}", code="url.invalid") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise FetchError(f"only http(s) URLs with a host can be fetched, not {url!r}", code="url.invalid")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return UrlTarget(url, scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme], path)


def vetted_address(target: UrlTarget, allowed_hosts: tuple[str, ...]) -> str:
    """Resolve the host once and return the address to connect to.

    Refuses (`url.forbidden_address`) when ANY resolved address is not public,
    unless the host is in `allowed_hosts`.
    """
    addresses = _resolve(target)
    if target.host in {host.lower() for host in allowed_hosts}:
        return addresses[0]
    forbidden = [address for address in addresses if is_forbidden_address(address)]
    if forbidden:
        raise FetchError(
            f"{target.host} resolves to non-public address {forbidden[0]}", code="url.forbidden_address"
        )
    return addresses[0]


def _resolve(target: UrlTarget) -> list[str]:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        retryable = exc.errno == socket.EAI_AGAIN
        raise FetchError(f"cannot resolve {target.host}: {exc}", code="url.dns_error", retryable=retryable) from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise FetchError(f"{target.host} resolves to no address", code="url.dns_error")
    return addresses


def is_forbidden_address(address: str) -> bool:
    """True when `address` is anything but a public unicast address.

    Covers loopback, private, carrier-grade NAT, link-local (cloud metadata at
    169.254.169.254), multicast, reserved and unspecified, and IPv4 addresses
    smuggled inside IPv6 (IPv4-mapped, 6to4, NAT64, Teredo).
    """
    ip = ipaddress.ip_address(address)
    return any(_is_non_public(candidate) for candidate in _addresses_to_judge(ip))


def _addresses_to_judge(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Any]:
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:
        # The kernel connects to the embedded IPv4 address; judge only that.
        return [ip.ipv4_mapped]
    embedded = [ip.sixtofour, *(ip.teredo or ())]
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [ip, *(address for address in embedded if address is not None)]


def _is_non_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _get_or_redirect(target: UrlTarget, address: str, max_bytes: int, deadline: float) -> bytes | str:
    """The body (bytes) of a 2xx answer, or the Location (str) of a redirect."""
    with _url_errors(target), _connection_pool(target, address, deadline) as pool:
        response = pool.urlopen(
            "GET",
            target.path,
            headers={"Host": target.host_header, "Accept-Encoding": "identity", "User-Agent": "labelstream"},
            retries=False,
            redirect=False,
            preload_content=False,
        )
        try:
            location = _redirect_location(response, target)
            return location if location is not None else _read_capped(response, target, max_bytes, deadline)
        finally:
            response.release_conn()


def _connection_pool(target: UrlTarget, address: str, deadline: float) -> urllib3.HTTPConnectionPool:
    remaining = max(deadline - time.monotonic(), 0.001)
    timeout = urllib3.Timeout(connect=remaining, read=remaining)
    if target.scheme == "http":
        return urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False, maxsize=1)
    # Connect to the vetted IP, but verify the certificate (and send SNI) for
    # the name in the URL.
    sni = None if _is_ip_literal(target.host) else target.host
    return urllib3.HTTPSConnectionPool(
        address,
        target.port,
        timeout=timeout,
        retries=False,
        maxsize=1,
        cert_reqs="CERT_REQUIRED",
        assert_hostname=target.host,
        server_hostname=sni,
    )


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _redirect_location(response: urllib3.BaseHTTPResponse, target: UrlTarget) -> str | None:
    status = response.status
    location = response.headers.get("Location")
    if status in _REDIRECT_STATUSES and location:
        return location
    if status >= 400:
        retryable = status >= 500 or status in _RETRYABLE_CLIENT_STATUSES
        raise FetchError(f"{target.url}: HTTP {status}", code="url.http_error", retryable=retryable)
    if not 200 <= status < 300:
        raise FetchError(f"{target.url}: unexpected HTTP {status}", code="url.http_error")
    return None


def _read_capped(response: urllib3.BaseHTTPResponse, target: UrlTarget, max_bytes: int, deadline: float) -> bytes:
    declared = _content_length(response)
    if declared is not None and declared > max_bytes:
        raise FetchError(f"{target.url}: Content-Length {declared} is over {max_bytes} bytes", code="fetch.too_large")
    received = bytearray()
    for chunk in response.stream(_CHUNK_BYTES):
        received += chunk
        if len(received) > max_bytes:
            raise FetchError(f"{target.url}: body is over {max_bytes} bytes", code="fetch.too_large")
        if time.monotonic() > deadline:
            _raise_timeout(target)
    _check_size(len(received), max_bytes, source_name=target.url)
    return bytes(received)


def _content_length(response: urllib3.BaseHTTPResponse) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _raise_timeout(target: UrlTarget) -> NoReturn:
    raise FetchError(f"{target.url}: timed out", code="url.timeout", retryable=True)


@contextmanager
def _url_errors(target: UrlTarget) -> Iterator[None]:
    try:
        yield
    except NewConnectionError as exc:  # a subclass of the timeout error, so first
        raise FetchError(f"{target.url}: {exc}", code="url.connection_error", retryable=True) from None
    except Urllib3TimeoutError:
        _raise_timeout(target)
    except SSLError as exc:
        raise FetchError(f"{target.url}: TLS failed: {exc}", code="url.tls_error") from None
    except Urllib3HTTPError as exc:
        raise FetchError(f"{target.url}: {exc}", code="url.connection_error", retryable=True) from None
