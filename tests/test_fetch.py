"""ImageFetcher against the real moto S3 server, stub HTTP servers and fake DNS."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipeline.config import FetchSettings, S3Settings
from pipeline.errors import FetchError
from pipeline.fetch import ImageFetcher, fetch_url, is_forbidden_address
from schemas.requests import ImageSource

Route = Callable[[BaseHTTPRequestHandler], None]
PAYLOAD = b"\x89PNG pretend image bytes"


# --- stub HTTP servers ---------------------------------------------------------


class StubServer(ThreadingHTTPServer):
    """Answers each path from a route table and remembers every request."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, routes: dict[str, Route]) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.routes = routes
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StubHandler(BaseHTTPRequestHandler):
    server: StubServer

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _serve(self) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers)))
        path = self.path.split("?")[0]
        self.server.routes.get(path, self.server.routes.get("*", reply(404)))(self)

    def log_message(self, *args: Any) -> None:
        pass


def reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, sized: bool = True) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if sized:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    return route


def redirect(location: str, status: int = 302) -> Route:
    return reply(status, headers={"Location": location})


def stall(seconds: float) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        reply(200, PAYLOAD)(handler)

    return route


def s3_error(status: int, code: str) -> Route:
    xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>stub</Message></Error>"
    return reply(status, xml.encode(), {"Content-Type": "application/xml"})


@pytest.fixture
def stub_server() -> Iterator[Callable[[dict[str, Route]], StubServer]]:
    started: list[StubServer] = []

    def start(routes: dict[str, Route]) -> StubServer:
        server = StubServer(routes)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch_error(fetcher: ImageFetcher, source: ImageSource) -> FetchError:
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(source)
    assert caught.value.stage == "fetch"
    return caught.value


def s3_source(bucket: str, key: str, version_id: str | None = None) -> ImageSource:
    return ImageSource(s3={"bucket": bucket, "key": key, "version_id": version_id})


# --- S3 against moto -------------------------------------------------------------


@pytest.fixture
def fetcher(s3_server: Any) -> ImageFetcher:
    return ImageFetcher(S3Settings(endpoint_url=s3_server.endpoint_url), FetchSettings(max_bytes=1_000))


@pytest.fixture
def bucket(new_bucket: Callable[[], str], s3_client: Any) -> str:
    name = new_bucket()
    s3_client.put_object(Bucket=name, Key="cat.png", Body=PAYLOAD)
    return name


def test_fetch_s3_object(fetcher: ImageFetcher, bucket: str) -> None:
    assert fetcher.fetch(s3_source(bucket, "cat.png")) == PAYLOAD


def test_fetch_s3_versions(fetcher: ImageFetcher, new_bucket: Callable[[], str], s3_client: Any) -> None:
    name = new_bucket()
    s3_client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    old = s3_client.put_object(Bucket=name, Key="k", Body=b"old bytes")["VersionId"]
    new = s3_client.put_object(Bucket=name, Key="k", Body=b"new bytes")["VersionId"]
    assert fetcher.fetch(s3_source(name, "k")) == b"new bytes"
    assert fetcher.fetch(s3_source(name, "k", new)) == b"new bytes"
    assert fetcher.fetch(s3_source(name, "k", old)) == b"old bytes"


def test_unknown_version_is_not_found(fetcher: ImageFetcher, new_bucket: Callable[[], str], s3_client: Any) -> None:
    name = new_bucket()
    s3_client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    s3_client.put_object(Bucket=name, Key="k", Body=b"bytes")
    assert fetch_error(fetcher, s3_source(name, "k", "no-such-version")).code == "s3.not_found"


def test_version_id_on_unversioned_bucket_is_invalid(fetcher: ImageFetcher, bucket: str) -> None:
    # S3 answers 400 InvalidArgument ("Invalid version id specified") here.
    error = fetch_error(fetcher, s3_source(bucket, "cat.png", "no-such-version"))
    assert (error.code, error.retryable) == ("s3.invalid_request", False)


def test_version_naming_a_delete_marker_is_not_found(
    fetcher: ImageFetcher, new_bucket: Callable[[], str], s3_client: Any
) -> None:
    name = new_bucket()
    s3_client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    s3_client.put_object(Bucket=name, Key="k", Body=b"bytes")
    marker = s3_client.delete_object(Bucket=name, Key="k")["VersionId"]
    assert fetch_error(fetcher, s3_source(name, "k")).code == "s3.not_found"
    assert fetch_error(fetcher, s3_source(name, "k", marker)).code == "s3.not_found"


def test_missing_key(fetcher: ImageFetcher, bucket: str) -> None:
    error = fetch_error(fetcher, s3_source(bucket, "dog.png"))
    assert (error.code, error.retryable) == ("s3.not_found", False)


def test_missing_bucket(fetcher: ImageFetcher, unique_id: str) -> None:
    error = fetch_error(fetcher, s3_source(f"no-such-bucket-{unique_id}", "cat.png"))
    assert (error.code, error.retryable) == ("s3.bucket_not_found", False)


def test_zero_byte_object(fetcher: ImageFetcher, bucket: str, s3_client: Any) -> None:
    s3_client.put_object(Bucket=bucket, Key="empty.png", Body=b"")
    assert fetch_error(fetcher, s3_source(bucket, "empty.png")).code == "image.empty"


def test_object_at_the_limit_is_fetched(fetcher: ImageFetcher, bucket: str, s3_client: Any) -> None:
    s3_client.put_object(Bucket=bucket, Key="exact.png", Body=b"x" * 1_000)
    assert len(fetcher.fetch(s3_source(bucket, "exact.png"))) == 1_000


def test_oversized_object_is_refused_without_downloading(
    fetcher: ImageFetcher, bucket: str, s3_client: Any
) -> None:
    s3_client.put_object(Bucket=bucket, Key="huge.png", Body=b"x" * 2_000_000)
    calls: list[str] = []
    fetcher.s3_client.meta.events.register("before-call.s3.*", lambda event_name, **_: calls.append(event_name))
    assert fetch_error(fetcher, s3_source(bucket, "huge.png")).code == "fetch.too_large"
    assert calls == ["before-call.s3.HeadObject"]


def test_object_that_grew_after_head_is_cut_off(fetcher: ImageFetcher, bucket: str, s3_client: Any) -> None:
    s3_client.put_object(Bucket=bucket, Key="grows.png", Body=b"x" * 2_000_000)

    def pretend_small(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ContentLength"] = 10

    fetcher.s3_client.meta.events.register("after-call.s3.HeadObject", pretend_small)
    assert fetch_error(fetcher, s3_source(bucket, "grows.png")).code == "fetch.too_large"


def test_bucket_outside_allowlist_is_refused_before_any_request(bucket: str) -> None:
    # The endpoint is dead: any request would fail as a connection error.
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{closed_port()}", allowed_buckets=("the-only-one",))
    fetcher = ImageFetcher(settings, FetchSettings())
    error = fetch_error(fetcher, s3_source(bucket, "cat.png"))
    assert (error.code, error.retryable) == ("s3.bucket_not_allowed", False)


def test_bucket_inside_allowlist_is_fetched(s3_server: Any, bucket: str) -> None:
    fetcher = ImageFetcher(S3Settings(endpoint_url=s3_server.endpoint_url, allowed_buckets=(bucket,)), FetchSettings())
    assert fetcher.fetch(s3_source(bucket, "cat.png")) == PAYLOAD


def test_concurrent_fetches_share_one_client(fetcher: ImageFetcher, bucket: str, s3_client: Any) -> None:
    for index in range(40):
        s3_client.put_object(Bucket=bucket, Key=f"img-{index}", Body=f"bytes {index}".encode())
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda index: fetcher.fetch(s3_source(bucket, f"img-{index}")), range(40)))
    assert got == [f"bytes {index}".encode() for index in range(40)]


# --- S3 failures moto cannot produce: a stub endpoint speaking S3's error format ---
# (moto only enforces access control with IAM auth switched on for the whole
# server, so AccessDenied comes from a stub too.)


def head_ok_then(get_route: Route) -> Route:
    """HEAD says a small object exists; GET answers with `get_route`."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        if handler.command == "HEAD":
            return reply(200, headers={"Content-Length": "10"}, sized=False)(handler)
        return get_route(handler)

    return route


def stub_s3_fetcher(server: StubServer, **s3: Any) -> ImageFetcher:
    return ImageFetcher(S3Settings(endpoint_url=server.url, **s3), FetchSettings())


@pytest.mark.parametrize(
    ("status", "code", "expected", "retryable"),
    [
        (403, "AccessDenied", "s3.access_denied", False),
        (503, "SlowDown", "s3.unavailable", True),
        (500, "InternalError", "s3.unavailable", True),
        (404, "NoSuchBucket", "s3.bucket_not_found", False),
        (404, "NoSuchKey", "s3.not_found", False),
        (400, "InvalidObjectState", "s3.error", False),
    ],
)
def test_get_object_errors_are_mapped(
    stub_server: Callable[[dict[str, Route]], StubServer], status: int, code: str, expected: str, retryable: bool
) -> None:
    server = stub_server({"/bucket/key.png": head_ok_then(s3_error(status, code))})
    error = fetch_error(stub_s3_fetcher(server), s3_source("bucket", "key.png"))
    assert (error.code, error.retryable) == (expected, retryable)
    # botocore's own retries are off: one HEAD, one GET.
    assert [method for method, _, _ in server.seen] == ["HEAD", "GET"]


@pytest.mark.parametrize(
    ("status", "expected", "retryable"),
    [(403, "s3.access_denied", False), (503, "s3.unavailable", True), (502, "s3.unavailable", True)],
)
def test_head_object_errors_are_mapped(
    stub_server: Callable[[dict[str, Route]], StubServer], status: int, expected: str, retryable: bool
) -> None:
    server = stub_server({"*": reply(status)})
    error = fetch_error(stub_s3_fetcher(server), s3_source("bucket", "key.png"))
    assert (error.code, error.retryable) == (expected, retryable)
    assert len(server.seen) == 1


def test_dead_endpoint_is_a_retryable_connection_error() -> None:
    fetcher = ImageFetcher(S3Settings(endpoint_url=f"http://127.0.0.1:{closed_port()}"), FetchSettings())
    error = fetch_error(fetcher, s3_source("bucket", "key.png"))
    assert (error.code, error.retryable) == ("s3.connection_error", True)


def test_slow_endpoint_is_a_retryable_connection_error(stub_server: Callable[[dict[str, Route]], StubServer]) -> None:
    server = stub_server({"*": stall(3.0)})
    fetcher = stub_s3_fetcher(server, read_timeout_s=0.3)
    started = time.monotonic()
    error = fetch_error(fetcher, s3_source("bucket", "key.png"))
    assert (error.code, error.retryable) == ("s3.connection_error", True)
    assert time.monotonic() - started < 2.0


# --- inline base64 -------------------------------------------------------------


def test_base64_ok() -> None:
    fetcher = ImageFetcher(S3Settings(), FetchSettings())
    assert fetcher.fetch(ImageSource(base64=base64.b64encode(PAYLOAD).decode())) == PAYLOAD


@pytest.mark.parametrize("payload", ["not base64 at all!", "QUJD\nREVG", "QUJDR", "ÀÉÎ="])
def test_base64_invalid(payload: str) -> None:
    fetcher = ImageFetcher(S3Settings(), FetchSettings())
    # model_construct skips the schema's own check, as a bypassing caller would.
    error = fetch_error(fetcher, ImageSource.model_construct(base64=payload))
    assert (error.code, error.retryable) == ("request.invalid_base64", False)


def test_base64_over_inline_cap() -> None:
    fetcher = ImageFetcher(S3Settings(), FetchSettings(max_inline_bytes=10))
    assert fetcher.fetch(ImageSource(base64=base64.b64encode(b"x" * 10).decode())) == b"x" * 10
    error = fetch_error(fetcher, ImageSource(base64=base64.b64encode(b"x" * 11).decode()))
    assert error.code == "fetch.too_large"


def test_huge_base64_is_refused_before_decoding() -> None:
    fetcher = ImageFetcher(S3Settings(), FetchSettings(max_inline_bytes=10))
    # Invalid base64 too, so a decode attempt would report that instead.
    error = fetch_error(fetcher, ImageSource.model_construct(base64="!" * 10_000))
    assert error.code == "fetch.too_large"


# --- URLs ----------------------------------------------------------------------


def url_settings(**overrides: Any) -> FetchSettings:
    return FetchSettings(**{"url_enabled": True, "url_allowed_hosts": ("127.0.0.1",), **overrides})


def url_error(url: str, settings: FetchSettings) -> FetchError:
    with pytest.raises(FetchError) as caught:
        fetch_url(url, settings)
    assert caught.value.stage == "fetch"
    return caught.value


@pytest.fixture
def web(stub_server: Callable[[dict[str, Route]], StubServer]) -> StubServer:
    return stub_server(
        {
            "/cat.png": reply(200, PAYLOAD),
            "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-file": redirect("file:///etc/passwd"),
            "/loop": redirect("/loop"),
            "/hop3": redirect("/hop2", 301),
            "/hop2": redirect("/hop1", 307),
            "/hop1": redirect("/cat.png", 308),
            "/big-declared": reply(200, b"x" * 5_000),
            "/big-unsized": reply(200, b"x" * 5_000, sized=False),
            "/empty": reply(200),
            "/missing": reply(404),
            "/overloaded": reply(503),
            "/rate-limited": reply(429),
            "/slow": stall(3.0),
        }
    )


def test_url_fetch_is_off_by_default(web: StubServer) -> None:
    fetcher = ImageFetcher(S3Settings(), FetchSettings())
    assert fetch_error(fetcher, ImageSource(url=f"{web.url}/cat.png")).code == "url.disabled"
    assert web.seen == []


def test_loopback_url_is_forbidden(web: StubServer) -> None:
    error = url_error(f"{web.url}/cat.png", FetchSettings(url_enabled=True))
    assert (error.code, error.retryable) == ("url.forbidden_address", False)
    assert web.seen == []


def test_allowed_host_is_fetched(web: StubServer) -> None:
    fetcher = ImageFetcher(S3Settings(), url_settings())
    assert fetcher.fetch(ImageSource(url=f"{web.url}/cat.png?size=large")) == PAYLOAD
    assert web.seen[0][1] == "/cat.png?size=large"


def test_redirect_to_metadata_address_is_refused(web: StubServer) -> None:
    assert url_error(f"{web.url}/to-metadata", url_settings()).code == "url.forbidden_address"


def test_allowlist_is_by_name_not_by_address(web: StubServer) -> None:
    # localhost is this very server, but only the name "127.0.0.1" was allowed.
    web.routes["/to-localhost"] = redirect(f"http://localhost:{web.server_address[1]}/cat.png")
    assert url_error(f"{web.url}/to-localhost", url_settings()).code == "url.forbidden_address"


def test_redirect_to_other_scheme_is_invalid(web: StubServer) -> None:
    assert url_error(f"{web.url}/to-file", url_settings()).code == "url.invalid"


def test_redirects_up_to_the_limit_are_followed(web: StubServer) -> None:
    assert fetch_url(f"{web.url}/hop3", url_settings(url_max_redirects=3)) == PAYLOAD
    assert url_error(f"{web.url}/hop3", url_settings(url_max_redirects=2)).code == "url.too_many_redirects"


def test_redirect_loop_is_too_many_redirects(web: StubServer) -> None:
    assert url_error(f"{web.url}/loop", url_settings()).code == "url.too_many_redirects"
    assert len(web.seen) == 4  # the first request and three redirects


@pytest.mark.parametrize("path", ["/big-declared", "/big-unsized"])
def test_body_over_max_bytes_is_too_large(web: StubServer, path: str) -> None:
    assert url_error(f"{web.url}{path}", url_settings(max_bytes=1_000)).code == "fetch.too_large"
    assert fetch_url(f"{web.url}{path}", url_settings(max_bytes=5_000)) == b"x" * 5_000


def test_empty_body_is_empty(web: StubServer) -> None:
    assert url_error(f"{web.url}/empty", url_settings()).code == "image.empty"


@pytest.mark.parametrize(
    ("path", "retryable"), [("/missing", False), ("/overloaded", True), ("/rate-limited", True)]
)
def test_http_errors(web: StubServer, path: str, retryable: bool) -> None:
    error = url_error(f"{web.url}{path}", url_settings())
    assert (error.code, error.retryable) == ("url.http_error", retryable)


def test_slow_server_times_out(web: StubServer) -> None:
    started = time.monotonic()
    error = url_error(f"{web.url}/slow", url_settings(url_timeout_s=0.3))
    assert (error.code, error.retryable) == ("url.timeout", True)
    assert time.monotonic() - started < 2.0


def test_refused_connection_is_retryable() -> None:
    error = url_error(f"http://127.0.0.1:{closed_port()}/cat.png", url_settings())
    assert (error.code, error.retryable) == ("url.connection_error", True)


def test_https_to_a_plain_http_server_is_a_tls_error(web: StubServer) -> None:
    https_url = web.url.replace("http://", "https://")
    assert url_error(f"{https_url}/cat.png", url_settings()).code == "url.tls_error"


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "http:///cat.png", "http://example.com:99999/"])
def test_malformed_or_non_http_url_is_invalid(url: str) -> None:
    assert url_error(url, url_settings()).code == "url.invalid"


# --- DNS: faked, so no network is needed -------------------------------------------


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names resolved from this table; everything else by the real resolver."""
    table: dict[str, list[str]] = {}
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in table:
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [(family_of(ip), socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port)) for ip in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def test_any_private_answer_forbids_the_host(fake_dns: dict[str, list[str]]) -> None:
    fake_dns["mixed.example"] = ["93.184.216.34", "10.0.0.7"]
    assert url_error("http://mixed.example/cat.png", FetchSettings(url_enabled=True)).code == "url.forbidden_address"


def test_connection_goes_to_the_vetted_address_with_the_original_host(
    web: StubServer, fake_dns: dict[str, list[str]]
) -> None:
    fake_dns["images.example"] = ["127.0.0.1"]
    port = web.server_address[1]
    settings = FetchSettings(url_enabled=True, url_allowed_hosts=("images.example",))
    assert fetch_url(f"http://images.example:{port}/cat.png", settings) == PAYLOAD
    assert web.seen[0][2]["Host"] == f"images.example:{port}"


def test_https_by_name_reaches_the_vetted_address(web: StubServer, fake_dns: dict[str, list[str]]) -> None:
    fake_dns["images.example"] = ["127.0.0.1"]
    settings = FetchSettings(url_enabled=True, url_allowed_hosts=("images.example",))
    error = url_error(f"https://images.example:{web.server_address[1]}/cat.png", settings)
    assert error.code == "url.tls_error"


def test_unresolvable_host_is_a_dns_error(fake_dns: dict[str, list[str]]) -> None:
    fake_dns["nowhere.example"] = []
    assert url_error("http://nowhere.example/", FetchSettings(url_enabled=True)).code == "url.dns_error"


# --- the address classifier --------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fd00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:a00:1::1",  # 6to4 wrapping 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 wrapping 169.254.169.254
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert is_forbidden_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:93.184.216.34"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not is_forbidden_address(address)
