"""The HTTP front of ``sat-serve``: a small streaming proxy before ``tritonserver``'s own HTTP endpoint.

Why it exists (issue 16, measured on Triton 2.51): the server's JSON parser allocates every input by its
*declared* shape before it counts the values. A 376-byte request declaring ``IMAGE_INT16 [500, 1000, 1000]``
with 3 values in ``"data"`` raises the server's peak RSS by about 1 GB; 2000^3 took 15 GB. gRPC and binary
HTTP bodies refuse the same lie at once, and newer Triton has a limit for it (server PR #8174). So the front
reads only the JSON part of each infer request (the whole body, or the ``Inference-Header-Content-Length``
leading bytes of a binary one) and refuses, with 400 and one line, a JSON part over :data:`MAX_JSON_BYTES`,
malformed JSON (Triton answers 500) and any input whose ``"data"`` holds another number of values than its
shape declares. A gzip or deflate body is inflated here first and refused past :data:`MAX_BODY_BYTES`, since
Triton inflates it whole before any check. Everything else goes through unchanged and streamed, headers
included (the admin key too).

It also answers the health and readiness endpoints with 503 once ``failure()`` names a reason (a dead
python-backend stub, which Triton itself never reports).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import ClientError, ClientSession, ClientTimeout, StreamReader, TCPConnector, web
from multidict import CIMultiDict, CIMultiDictProxy

from satseg.errors import one_line, quoted

MAX_JSON_BYTES = 8 << 20
"""The largest JSON part of an infer request passed on. Volumes travel as binary data (tritonclient.http's
default); JSON tensors hold a tiny volume at most (64 x 64 x 32 INT16 voxels are under 1 MB of JSON)."""
HEADER_LENGTH = "Inference-Header-Content-Length"
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
HEALTH_PATH = re.compile(r"^/v2/(health/(live|ready)|models/[^/]+(/versions/[^/]+)?/ready)$")
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Expect",  # answered here (100-continue); passing it on would make the server send a second one
    )
)
MAX_BODY_BYTES = 64 << 20
"""Triton's default ``--http-max-input-size``: the largest body, and here also the largest a compressed body
may inflate to (Triton limits only the compressed size)."""
COMPRESSED = frozenset({"gzip", "deflate"})
"""Request encodings Triton inflates (others it refuses itself)."""
AUTO_INFLATE = 32 + zlib.MAX_WBITS  # zlib: accept both gzip and zlib headers
INFLATE_STEP = 1 << 20
"""Inflated bytes per step: what a highly compressed chunk may grow to in memory at once."""
CONNECT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class Refused(Exception):
    """A request the front answers itself with 400 and this one-line reason."""


def element_count(data: Any) -> int:
    """The number of values in a JSON ``"data"`` element, flat or nested (Triton accepts both)."""
    count, pending = 0, [data]
    while pending:  # iterative: a deeply nested list must not exhaust the stack
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        else:
            count += 1
    return count


def declared_elements(name: str, shape: Any) -> int:
    """The element count a JSON input's ``"shape"`` declares."""
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise Refused(f"input {name}: shape must be a list of non-negative integers, got {quoted(str(shape))}")
    product = 1
    for size in shape:
        product *= size
    return product


def check_infer_json(text: bytes) -> None:
    """Refuse a malformed infer header, or one whose JSON ``"data"`` disagrees with its declared shape.

    Raises:
        Refused: one line saying what is wrong.
    """
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: absurd nesting
        raise Refused(f"the request is not valid JSON ({one_line(str(error))})") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs", []), list):
        raise Refused('the request must be a JSON object with an "inputs" list')
    for tensor in header.get("inputs", []):
        if not isinstance(tensor, dict):
            raise Refused('each element of "inputs" must be a JSON object')
        name = quoted(str(tensor.get("name", "?")))
        if "data" not in tensor:
            continue  # binary data or shared memory: the server checks their sizes against the shape itself
        declared, found = declared_elements(name, tensor.get("shape")), element_count(tensor["data"])
        if declared != found:
            raise Refused(f"input {name}: shape {tensor['shape']} declares {declared} values but data holds {found}")


def header_length(headers: CIMultiDictProxy[str]) -> int | None:
    """``Inference-Header-Content-Length`` (the JSON part of a binary request), or ``None`` for a JSON body."""
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise Refused(f"{HEADER_LENGTH} must be a non-negative integer, got {quoted(value)}")
    length = int(value)
    if length > MAX_JSON_BYTES:
        raise Refused(json_too_large(length))
    return length


def json_too_large(size: int) -> str:
    return (
        f"the JSON part of an infer request is limited to {MAX_JSON_BYTES >> 20} MiB, got {size} bytes or more; "
        "send tensors as binary data (tritonclient.http's default) or over gRPC"
    )


def wanted_bytes(length: int | None) -> int:
    """Leading body bytes that hold the JSON part (one more than allowed for a JSON body, to see it is too big)."""
    return MAX_JSON_BYTES + 1 if length is None else length


def json_part(head: bytes, length: int | None) -> bytes:
    """The JSON part of an infer body from its first :func:`wanted_bytes` (inflated) bytes."""
    if length is None:
        if len(head) > MAX_JSON_BYTES:
            raise Refused(json_too_large(len(head)))
        return head
    if len(head) < length:
        raise Refused(f"the body holds {len(head)} bytes, fewer than {HEADER_LENGTH} {length}")
    return head[:length]


async def read_plain(content: StreamReader, wanted: int) -> bytes:
    """At least ``wanted`` leading bytes of an uncompressed body (fewer if it is shorter); the rest stays unread."""
    head = bytearray()
    while len(head) < wanted:
        chunk = await content.readany()
        if not chunk:
            break
        head += chunk
    return bytes(head)


async def read_compressed(content: StreamReader, encoding: str, wanted: int) -> tuple[bytes, bytes]:
    """A whole gzip or deflate body and its first ``wanted`` inflated bytes.

    Triton 2.51 inflates a compressed body whole before any check: 0.56 MiB of gzip that inflate to 572 MiB
    raised its peak RSS by 1 GB. So the front inflates it first, in bounded steps and keeping only the head,
    and refuses a body that inflates past :data:`MAX_BODY_BYTES`.

    Returns:
        The compressed body (passed on as it came) and the inflated head.
    """
    inflate = zlib.decompressobj(AUTO_INFLATE)
    raw, head, inflated = bytearray(), bytearray(), 0
    try:
        async for chunk in content.iter_any():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise Refused(body_too_large(f"holds {len(raw)} compressed bytes or more"))
            data = chunk
            while data:
                plain = inflate.decompress(data, INFLATE_STEP)
                inflated += len(plain)
                if inflated > MAX_BODY_BYTES:
                    raise Refused(body_too_large(f"inflates to {inflated} bytes or more"))
                head += plain[: max(0, wanted - len(head))]
                data = inflate.unconsumed_tail
    except zlib.error as error:
        raise Refused(f"the request body is not valid {encoding} data ({error})") from None
    return bytes(raw), bytes(head)


def body_too_large(found: str) -> str:
    return f"the request body is limited to {MAX_BODY_BYTES >> 20} MiB; this one {found}"


def forwarded_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Every end-to-end header, repeated ones included (hop-by-hop ones belong to each connection)."""
    return CIMultiDict((key, value) for key, value in headers.items() if key.lower() not in HOP_BY_HOP)


def refusal(status: int, reason: str) -> web.Response:
    """Triton's own error shape: one JSON object with an ``error`` line."""
    return web.json_response({"error": reason}, status=status)


async def body_stream(prefix: bytes, content: StreamReader) -> AsyncIterator[bytes]:
    """The bytes already read, then the rest of the request body as it arrives."""
    if prefix:
        yield prefix
    async for chunk in content.iter_any():
        yield chunk


async def relay(
    session: ClientSession,
    request: web.Request,
    url: str,
    headers: CIMultiDict[str],
    prefix: bytes,
    unreachable: Callable[[str], web.StreamResponse],
) -> web.StreamResponse:
    """``request`` sent on to ``url`` (``prefix``, the body bytes already read, first) and the upstream's answer
    streamed back, headers included; ``unreachable(reason)`` answers when the upstream cannot be reached."""
    body = body_stream(prefix, request.content) if request.body_exists else None
    response: web.StreamResponse | None = None
    try:
        async with session.request(request.method, url, headers=headers, data=body, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(forwarded_headers(upstream.headers))
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (ClientError, ConnectionError, asyncio.TimeoutError) as error:
        if response is not None and response.prepared:
            # The answer has begun (or the client left): only a closed connection can tell the client.
            if request.transport is not None:
                request.transport.close()
            return response
        return unreachable(one_line(str(error)) or type(error).__name__)


Server = TypeVar("Server", bound="ProxyServer")


class ProxyServer:
    """An aiohttp application on an already bound socket, run by its own event loop in a daemon thread, with
    one client session to its upstream (compressed bodies pass through both ways as they were sent).
    Subclasses add their routes in :meth:`routes`.

    Args:
        listening: the bound public socket (bound by the caller, so a busy port fails before anything starts).
        name: the thread's name.
    """

    def __init__(self, listening: socket.socket, name: str) -> None:
        self.listening = listening
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(self.listening.getsockname()[1])

    @property
    def session(self) -> ClientSession:
        assert self._session is not None, "not started"
        return self._session

    def routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def start(self: Server) -> Server:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result(STOP_TIMEOUT_S)
        return self

    def stop(self) -> None:
        """Close the listener and the upstream connections, then end the thread."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._cleanup(), self._loop).result(STOP_TIMEOUT_S * 2)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_TIMEOUT_S)
        self.listening.close()

    async def _setup(self) -> None:
        self._session = ClientSession(
            connector=TCPConnector(limit=0),
            timeout=ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )
        app = web.Application()
        self.routes(app.router)
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None, shutdown_timeout=STOP_TIMEOUT_S)
        await self._runner.setup()
        await web.SockSite(self._runner, self.listening).start()

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


class HttpFront(ProxyServer):
    """The front of ``sat-serve``.

    Args:
        listening: the bound public socket.
        upstream: ``http://127.0.0.1:PORT`` of tritonserver's private HTTP endpoint.
        failure: why the server can no longer answer, or ``None``; health endpoints answer 503 with it.
    """

    def __init__(self, listening: socket.socket, upstream: str, failure: Callable[[], str | None]) -> None:
        super().__init__(listening, "sat-http-front")
        self.upstream = upstream.rstrip("/")
        self.failure = failure

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if HEALTH_PATH.match(request.path):
            failure = self.failure()
            if failure is not None:
                return refusal(503, failure)
        try:
            prefix = await self._inspect(request)
        except Refused as refused:
            return refusal(400, str(refused))
        return await self._forward(request, prefix)

    async def _inspect(self, request: web.Request) -> bytes:
        """Check what Triton would trust (an infer request's JSON part, a compressed body's inflated size).

        Returns:
            The body bytes read for that, passed on before the rest.

        Raises:
            Refused: the request must not reach the server.
        """
        infer = request.method == "POST" and INFER_PATH.match(request.path) is not None
        length = header_length(request.headers) if infer else None
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        compressed = request.body_exists and encoding in COMPRESSED
        if infer and length is None and not compressed and (request.content_length or 0) > MAX_JSON_BYTES:
            raise Refused(json_too_large(request.content_length or 0))  # known from the headers: read nothing
        if compressed:
            prefix, head = await read_compressed(request.content, encoding, wanted_bytes(length) if infer else 0)
        elif infer:
            prefix = head = await read_plain(request.content, wanted_bytes(length))
        else:
            return b""
        if infer:
            check_infer_json(json_part(head, length))
        return prefix

    async def _forward(self, request: web.Request, prefix: bytes) -> web.StreamResponse:
        return await relay(
            self.session,
            request,
            f"{self.upstream}{request.rel_url}",
            forwarded_headers(request.headers),
            prefix,
            lambda reason: refusal(503, f"tritonserver is not answering ({reason})"),
        )
