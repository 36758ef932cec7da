"""Raw HTTP/1.1 over TLS or plain TCP, for sending bytes no well-behaved client would send."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time
from collections.abc import Iterable

CLOSED = "close"


@dataclasses.dataclass
class Reply:
    """What came back on one connection: the first response, or nothing before the close."""

    status: int | None
    headers: dict[bytes, bytes]
    body: bytes
    raw: bytes
    elapsed: float

    @property
    def outcome(self) -> int | str:
        return self.status if self.status is not None else CLOSED


def insecure_context(alpn: Iterable[str] = ("http/1.1",)) -> ssl.SSLContext:
    # The corpus tests the HTTP layer; certificate checks are covered by the sync tests.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(list(alpn))
    return context


def connect(port: int, tls: bool, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        sock = insecure_context().wrap_socket(sock, server_hostname="localhost")
    return sock


def send_all(sock: socket.socket, data: bytes) -> bool:
    """Send `data`; return False if the server closed or reset the connection first."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        return False


# Bytes read past the end of a response, kept for the next read_response on the same socket.
_leftover: dict[int, bytes] = {}


def read_response(sock: socket.socket, timeout: float = 10.0) -> Reply:
    """Read one response (status line, headers, Content-Length or chunked body) or the close."""
    started = time.monotonic()
    sock.settimeout(timeout)
    buffer = _leftover.pop(id(sock), b"")

    def more() -> bool:
        nonlocal buffer
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, OSError):
            return False
        buffer += data
        return bool(data)

    while b"\r\n\r\n" not in buffer:
        if not more():
            return Reply(None, {}, b"", buffer, time.monotonic() - started)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    buffer = rest
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(buffer) < length and more():
            pass
        body = buffer[:length]
        if buffer[length:]:
            _leftover[id(sock)] = buffer[length:]
    elif headers.get(b"transfer-encoding") == b"chunked":
        while not buffer.endswith(b"0\r\n\r\n") and more():
            pass
        body = buffer
    else:
        while more():
            pass
        body = buffer
    return Reply(status, headers, body, head + b"\r\n\r\n" + body, time.monotonic() - started)


def exchange(port: int, tls: bool, data: bytes, timeout: float = 10.0) -> Reply:
    """Open a connection, send `data`, and return the first response or the close."""
    with connect(port, tls, timeout) as sock:
        send_all(sock, data)
        return read_response(sock, timeout)


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """Return True if the server closes the connection within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True


def chunked(body: bytes, chunk_size: int = 65536) -> bytes:
    """Encode `body` with chunked transfer coding."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + chunk_size]), body[i:i + chunk_size])
             for i in range(0, len(body), chunk_size)]
    return b"".join(parts) + b"0\r\n\r\n"


def vm_rss_kib(pid: int) -> int:
    """Return the resident set size of a process in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS line for pid {pid}")
