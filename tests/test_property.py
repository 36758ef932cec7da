"""Generated request heads and bodies: the front end responds or closes, never crashes or hangs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rawhttp
from support import SyncProxy, add_user

# Every example must end within this: the longest wait is the request head timeout (1 s) or
# the client idle timeout (1 s), plus the drain after an early answer.
ANSWER_WITHIN = 12.0

METHODS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"PRI", b"CONNECT"])
TOKENS = st.binary(min_size=1, max_size=12)
PATHS = st.sampled_from([b"/", b"/sync/meta", b"/sync/upload", b"/msync/begin",
                         b"/_syncproxy/health", b"/health", b"*", b"/sync/../x"])
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 "])
HEADER_NAMES = st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Upgrade",
                                b"Connection", b"Expect", b"anki-sync", b"X-Forwarded-For"])
HEADER_VALUES = st.one_of(
    st.sampled_from([b"h", b"0", b"5", b"-1", b"chunked", b"h2c", b"close", b"keep-alive",
                     b"100-continue", b"{\"v\":11,\"k\":\"x\"}", b"99999999999"]),
    st.binary(max_size=40),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.one_of(METHODS, TOKENS))
    path = draw(st.one_of(PATHS, st.binary(min_size=1, max_size=30)))
    version = draw(VERSIONS)
    line = method + b" " + path + b" " + version
    headers = draw(st.lists(st.tuples(st.one_of(HEADER_NAMES, TOKENS), HEADER_VALUES),
                            max_size=8))
    separator = draw(st.sampled_from([b": ", b":", b" : ", b"\t"]))
    head = b"\r\n".join([line] + [name + separator + value for name, value in headers])
    body = draw(st.binary(max_size=4096))
    if draw(st.booleans()):
        body = rawhttp.chunked(body, draw(st.integers(min_value=1, max_value=1024)))
    ending = draw(st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\n", b""]))
    return head + ending + body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncProxy]:
    data_dir = tmp_path_factory.mktemp("property") / "data"
    add_user(data_dir, "property-user", "property-password")
    with SyncProxy(data_dir, "--max-body-mb", "1", "--request-head-timeout", "1",
                   "--client-idle-timeout", "1", "--keep-alive-timeout", "1") as proxy:
        yield proxy


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=requests(), tls=st.booleans())
def test_generated_requests(server: SyncProxy, data: bytes, tls: bool) -> None:
    started = time.monotonic()
    reply = rawhttp.exchange(server.port, tls, data, timeout=ANSWER_WITHIN)
    elapsed = time.monotonic() - started

    assert elapsed < ANSWER_WITHIN
    if reply.status is not None:
        assert 100 <= reply.status <= 599
    assert server.process is not None and server.process.poll() is None


def test_server_healthy_after_generated_requests(server: SyncProxy, tmp_path: Path) -> None:
    reply = rawhttp.exchange(server.port, True,
                             b"GET /_syncproxy/health HTTP/1.1\r\nHost: h\r\n\r\n")
    assert reply.status == 200
    assert "Error in ASGI" not in server.log()
    assert "Traceback" not in server.log().replace("core: Traceback", "")
