"""A lean HTTP/1.1 path for the clients' requests: keep-alive sockets, no httpx on the hot path.

A loop of small calls spends most of its client-side time in httpx's request machinery (URL
merging, cookies, auth and redirect hooks, h11's state machine, the response model): ~350 µs of
CPU per tiny forward on the 2-core machine, more than the server's whole call. ``LeanHTTP``
(blocking sockets) and ``AsyncLeanHTTP`` (asyncio streams) send the same request on a kept-alive
connection and read the answer themselves (status line, headers, a ``Content-Length``, chunked or
close-delimited body): docs/api.md's client section and docs/benchmarks.md have the numbers.
Both share the request head, the parsing of the answer's head and its ending (below).

It is used only where it sends exactly what httpx would have sent: plain ``http://`` URLs
(``https`` goes through httpx and its certificate handling), no proxy in the environment (httpx
honours ``HTTP_PROXY``/``ALL_PROXY``), no custom transport, and header names and values HTTP
allows (else that request goes through httpx, which says what is wrong). Failures are raised as
the httpx exceptions the client's retry policy already knows: a connection that could not be made
is ``ConnectError``/``ConnectTimeout`` (never sent: always retried), a timeout or a broken
connection after sending is ``ReadTimeout``/``WriteTimeout``/``ReadError``/``WriteError``/
``RemoteProtocolError`` (retried only when repeating the call is safe). An idle connection the
server has closed (uvicorn closes them after 5 s) is noticed before it is used, as httpx does.
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
import threading
import urllib.request
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

READ_BYTES = 1 << 16  # what one recv asks for while reading a head or a chunked body
MAX_HEAD_BYTES = 1 << 16  # an answer's status line and headers
MAX_IDLE = 16  # kept-alive connections per client
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class LeanResponse:
    """What the client reads of an answer: its status, headers (lower-case names) and body."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes | bytearray) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content


def lean_usable(base_url: str) -> bool:
    """Whether requests to ``base_url`` can take the lean path: plain http, no proxy httpx would use."""
    if urlsplit(base_url).scheme != "http":
        return False
    proxies = urllib.request.getproxies_environment()
    return not (proxies.get("http") or proxies.get("all"))


def _header_ok(name: str, value: str) -> bool:
    return bool(_TOKEN.fullmatch(name)) and value.isascii() and not any(c in value for c in "\r\n\0")


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """An answer's status, HTTP version and headers (lower-case names; repeated ones joined), from its head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(code), version, headers


def _interim(status: int) -> bool:
    """An interim answer (100 Continue) is followed by the real one."""
    return 100 <= status < 200 and status != 101


def _framing(method: str, status: int, headers: dict[str, str]) -> int | str:
    """How the body ends: its length, ``"chunked"``, or ``"close"`` (the server closes the connection)."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return "chunked"
    if "content-length" not in headers:
        return "close"
    try:
        length = int(headers["content-length"])
    except ValueError:
        raise httpx.RemoteProtocolError(f"bad Content-Length {headers['content-length'][:40]!r}") from None
    if length < 0:
        raise httpx.RemoteProtocolError("negative Content-Length")
    return length


def _chunk_size(line: bytes) -> int:
    size_text = line.split(b";", 1)[0].strip()
    try:
        return int(size_text, 16)
    except ValueError:
        raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}") from None


def _finish(status: int, version: str, headers: dict[str, str], body: bytes | bytearray,
            framing: int | str) -> tuple[LeanResponse, bool]:
    """The answer (its body decoded), and whether the connection may carry another request."""
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        try:
            body = zlib.decompress(body, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        except zlib.error as exc:
            raise httpx.DecodingError(f"the answer's {encoding} body is corrupt: {exc}") from None
    elif encoding != "identity":
        raise httpx.DecodingError(f"unsupported Content-Encoding {encoding[:40]!r}")
    connection = headers.get("connection", "").lower()
    keep = framing != "close" and "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    return LeanResponse(status, headers, body), keep


def _request_head(base: dict[str, tuple[str, str]], prefix: str, method: str, path: str, content: Any,
                  headers: dict[str, str]) -> bytes:
    """The request line and headers: the client's, then the request's (case-insensitively), and its length."""
    merged = dict(base)
    for name, value in headers.items():
        merged[name.lower()] = (name, value)
    if content is not None and "content-length" not in merged:
        merged["content-length"] = ("Content-Length", str(_length(content)))
    elif content is None and method in _BODY_METHODS:
        merged["content-length"] = ("Content-Length", "0")
    return "".join([f"{method} {prefix}{path} HTTP/1.1\r\n",
                    *(f"{name}: {value}\r\n" for name, value in merged.values()), "\r\n"]).encode("latin-1")


def _length(content: Any) -> int:
    if isinstance(content, (bytes, bytearray, memoryview)):
        return memoryview(content).nbytes
    return sum(memoryview(part).nbytes for part in content)


def _with_request(exc: BaseException, request: Callable[[], httpx.Request]) -> None:
    """An httpx error raised without its request gets it (the client's error messages name it)."""
    if isinstance(exc, httpx.RequestError):
        try:
            exc.request  # noqa: B018 - raises while the error names no request
        except RuntimeError:
            exc.request = request()


class _Connection:
    """One kept-alive socket and the bytes read past the last answer (none, in request/answer order)."""

    def __init__(self, host: str, port: int, connect_timeout: float | None) -> None:
        self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbox = memoryview(bytearray(READ_BYTES))  # reused for every read of a head or a chunk
        self.pending = bytearray()
        self._timeout: float | None = self.sock.gettimeout()

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:  # a system call each time: only when it changes
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def closed_by_peer(self) -> bool:
        """An idle connection that is readable, or holds bytes read past its last answer, has been closed by the
        server (or sent something unasked)."""
        if self.pending:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def send(self, head: bytes, content: Any, timeout: float | None) -> None:
        self._set_timeout(timeout)
        if content is None:
            self.sock.sendall(head)
        elif isinstance(content, (bytes, bytearray, memoryview)):
            if _length(content) <= READ_BYTES:  # one packet for a small request
                self.sock.sendall(head + bytes(content))
            else:
                self.sock.sendall(head)
                self.sock.sendall(content)
        else:  # the parts of a body (views of the tensors' own memory)
            self.sock.sendall(head)
            for part in content:
                self.sock.sendall(part)

    def receive(self, method: str, timeout: float | None) -> tuple[LeanResponse, bool]:
        """The answer, and whether the connection may carry another request."""
        self._set_timeout(timeout)
        status, version, headers = _parse_head(self._head())
        while _interim(status):
            status, version, headers = _parse_head(self._head())
        framing = _framing(method, status, headers)
        if framing == "chunked":
            body: bytes | bytearray = self._chunked()
        elif framing == "close":
            body = self._until_closed()
        else:
            body = self._exactly(framing)
        return _finish(status, version, headers, body, framing)

    def _fill(self) -> None:
        count = self.sock.recv_into(self.inbox)
        if not count:
            raise httpx.RemoteProtocolError("the server closed the connection before its answer was complete")
        self.pending += self.inbox[:count]

    def _through(self, marker: bytes, what: str) -> bytes:
        """The bytes before ``marker`` (read as far as it; the marker is consumed too)."""
        while (end := self.pending.find(marker)) < 0:
            if len(self.pending) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError(f"{what} is too long")
            self._fill()
        data = bytes(self.pending[:end])
        del self.pending[:end + len(marker)]
        return data

    def _head(self) -> bytes:
        return self._through(b"\r\n\r\n", "the answer's head")

    def _line(self) -> bytes:
        return self._through(b"\r\n", "a chunk header")

    def _exactly(self, length: int) -> bytearray:
        body = bytearray(length)
        have = min(len(self.pending), length)
        body[:have] = self.pending[:have]
        del self.pending[:have]
        view = memoryview(body)
        while have < length:  # straight into the body: no chunk list, no join
            count = self.sock.recv_into(view[have:])
            if not count:
                raise httpx.RemoteProtocolError("the server closed the connection before its answer was complete")
            have += count
        return body

    def _chunked(self) -> bytearray:
        body = bytearray()
        while size := _chunk_size(self._line()):
            body += self._exactly(size)
            if self._line():
                raise httpx.RemoteProtocolError("a chunk did not end with CRLF")
        while self._line():  # trailers, up to the empty line
            pass
        return body

    def _until_closed(self) -> bytearray:
        body, self.pending = self.pending, bytearray()
        while count := self.sock.recv_into(self.inbox):
            body += self.inbox[:count]
        return body

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class LeanHTTP:
    """Requests to one ``http://`` server over kept-alive sockets; safe to share between threads."""

    def __init__(self, base_url: str, timeout: httpx.Timeout, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        netloc = parts.netloc.rpartition("@")[2]  # never a user:password in the Host header
        self.headers = {"host": ("Host", netloc), **{k.lower(): (k, v) for k, v in headers.items()}}
        self._headers_ok = all(_header_ok(k, v) for k, v in self.headers.values())
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def takes(self, path: str, headers: dict[str, str]) -> bool:
        """Whether this request goes out exactly as httpx would send it (else the caller uses httpx)."""
        return (path.startswith("/") and path.isascii() and path.isprintable() and " " not in path
                and self._headers_ok and all(_header_ok(k, v) for k, v in headers.items()))

    def request(self, method: str, path: str, content: Any, headers: dict[str, str]) -> LeanResponse:
        head = _request_head(self.headers, self.prefix, method, path, content, headers)
        connection = self._checkout(method, path)
        try:
            try:
                connection.send(head, content, self.timeout.write)
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
            except OSError as exc:
                raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from None
            try:
                response, keep = connection.receive(method, self.timeout.read)
            except TimeoutError:
                raise httpx.ReadTimeout("timed out waiting for the answer") from None
            except OSError as exc:
                raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from None
        except BaseException as exc:
            connection.close()  # half a request or half an answer: the connection is done
            _with_request(exc, lambda: self._request(method, path))
            raise
        if keep:
            self._checkin(connection)
        else:
            connection.close()
        return response

    def _checkout(self, method: str, path: str) -> _Connection:
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the client is closed")
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                break
            if not connection.closed_by_peer():
                return connection
            connection.close()  # the server closed it while it was idle: never used for a request
        try:
            return _Connection(self.host, self.port, self.timeout.connect)
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting", request=self._request(method, path)) from None
        except OSError as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=self._request(method, path)) from None

    def _checkin(self, connection: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(connection)
                return
        connection.close()

    def _request(self, method: str, path: str) -> httpx.Request:
        """The request as httpx describes it, for the errors (built only when one is raised)."""
        return httpx.Request(method, f"{self.base_url}{path}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class _AsyncConnection:
    """One kept-alive connection of the asyncio client (its stream reader does the buffering)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def closed_by_peer(self) -> bool:
        """An idle connection the server closed, or that holds bytes nobody asked for: seen by the loop already
        (its end, its buffer), or still waiting in the socket (the loop may not have run since: a caller that
        computes between calls, or drives a loop per call)."""
        if self.reader.at_eof() or self.writer.is_closing() or self.reader._buffer:  # noqa: SLF001
            return True
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    async def send(self, head: bytes, content: Any) -> None:
        if content is None:
            self.writer.write(head)
        elif isinstance(content, (bytes, bytearray, memoryview)):
            self.writer.writelines([head, content])
        else:  # the parts of a body (views of the tensors' own memory)
            self.writer.writelines([head, *content])
        await self.writer.drain()

    async def receive(self, method: str) -> tuple[LeanResponse, bool]:
        """The answer, and whether the connection may carry another request."""
        status, version, headers = _parse_head(await self._head())
        while _interim(status):
            status, version, headers = _parse_head(await self._head())
        framing = _framing(method, status, headers)
        if framing == "chunked":
            body: bytes | bytearray = bytearray()
            while size := _chunk_size(await self._line()):
                body += await self.reader.readexactly(size)
                if await self._line():
                    raise httpx.RemoteProtocolError("a chunk did not end with CRLF")
            while await self._line():  # trailers, up to the empty line
                pass
        elif framing == "close":
            body = await self.reader.read()
        else:
            body = await self.reader.readexactly(framing) if framing else b""
        return _finish(status, version, headers, body, framing)

    async def _head(self) -> bytes:
        return (await self.reader.readuntil(b"\r\n\r\n"))[:-4]

    async def _line(self) -> bytes:
        return (await self.reader.readuntil(b"\r\n"))[:-2]

    def close(self) -> None:
        self.writer.close()


class AsyncLeanHTTP:
    """``LeanHTTP`` for the asyncio client: requests to one ``http://`` server over kept-alive streams, from any
    number of tasks of one event loop."""

    def __init__(self, base_url: str, timeout: httpx.Timeout, headers: dict[str, str]) -> None:
        self._shape = LeanHTTP(base_url, timeout, headers)  # the URL, the headers and the checks, shared
        self.timeout = timeout
        self._idle: list[_AsyncConnection] = []
        self._closed = False

    def takes(self, path: str, headers: dict[str, str]) -> bool:
        """Whether this request goes out exactly as httpx would send it (else the caller uses httpx)."""
        return self._shape.takes(path, headers)

    async def request(self, method: str, path: str, content: Any, headers: dict[str, str]) -> LeanResponse:
        shape = self._shape
        head = _request_head(shape.headers, shape.prefix, method, path, content, headers)
        connection = await self._checkout(method, path)
        try:
            try:
                async with asyncio.timeout(self.timeout.write):
                    await connection.send(head, content)
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
            except OSError as exc:
                raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from None
            try:
                async with asyncio.timeout(self.timeout.read):
                    response, keep = await connection.receive(method)
            except TimeoutError:
                raise httpx.ReadTimeout("timed out waiting for the answer") from None
            except asyncio.IncompleteReadError:
                raise httpx.RemoteProtocolError("the server closed the connection before its answer was complete") \
                    from None
            except asyncio.LimitOverrunError:
                raise httpx.RemoteProtocolError("the answer's headers are too long") from None
            except OSError as exc:
                raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from None
        except BaseException as exc:  # a cancelled call too: half a request or half an answer ends the connection
            connection.close()
            _with_request(exc, lambda: shape._request(method, path))
            raise
        if keep and not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    async def _checkout(self, method: str, path: str) -> _AsyncConnection:
        if self._closed:
            raise RuntimeError("the client is closed")
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed_by_peer():
                return connection
            connection.close()  # the server closed it while it was idle: never used for a request
        shape = self._shape
        try:
            async with asyncio.timeout(self.timeout.connect):
                reader, writer = await asyncio.open_connection(shape.host, shape.port, limit=MAX_HEAD_BYTES)
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting", request=shape._request(method, path)) from None
        except OSError as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=shape._request(method, path)) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _AsyncConnection(reader, writer)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
