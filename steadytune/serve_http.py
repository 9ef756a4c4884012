"""The connection layer of `steadytune serve`: how bytes get from a client to a request handler,
so that no client can hold the server by being slow or by being many.

Request heads (request line and headers) are read by one thread for every connection (Heads),
against a total deadline: a client that sends a byte a second (slowloris) holds a socket, never a
thread, and is dropped at the deadline though never silent. A request gets a thread once its head
has arrived, at most `cap` at once (server_class); beyond that it gets 503 at once. Bodies are read
against a total deadline too (DeadlineReader). A refused connection is closed by one thread
(Closer) after reading what its client still sends, so that the client gets the answer rather
than a connection reset. serve.py puts mlx-lm's request handler on top.
"""

from __future__ import annotations

import io
import json
import selectors
import socket
import sys
import threading
import time

MAX_BODY_BYTES = 4 << 20  # a chat request is text; anything bigger is a mistake or an attack
# Connections the OS queues before accept(): more than the documented concurrency, so that a burst
# of clients waits for the head reader (and gets an answer or a 503) instead of a connection reset.
LISTEN_BACKLOG = 256
CLIENT_TIMEOUT_S = 30  # a client silent this long mid-request is dropped (it would hold a thread)
# A request's head must arrive within HEAD_TIMEOUT_S of the connection, its body within
# REQUEST_TIMEOUT_S after: totals, not idle timeouts (a byte a second never idles).
HEAD_TIMEOUT_S, REQUEST_TIMEOUT_S = 10, 30
MAX_HEAD_BYTES = 64 << 10  # a request line and headers; http.server alone would take 100 x 64 KiB
MAX_WAITING_HEADS = 1024  # connections still sending their head (each a socket, no thread)
# A refused connection is read (and the reading discarded) for up to LINGER_S and LINGER_BYTES
# before it is closed, at most MAX_LINGERING at a time (Closer).
LINGER_S, LINGER_BYTES, MAX_LINGERING = 1.0, MAX_BODY_BYTES, 512


class DeadlineReader(io.RawIOBase):
    """A socket's reads, after `prefix` (what was read before), against a total deadline: the
    socket's own timeout measures silence only, and a client sending one byte a second is never
    silent."""

    def __init__(self, sock, prefix: bytes, deadline: float | None):
        self.sock, self.prefix, self.deadline = sock, memoryview(prefix), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.prefix:
            n = min(len(buffer), len(self.prefix))
            buffer[:n], self.prefix = self.prefix[:n], self.prefix[n:]
            return n
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request did not arrive in time")
            self.sock.settimeout(min(left, CLIENT_TIMEOUT_S))
        return self.sock.recv_into(buffer)


def connection_cap(concurrency: int) -> int:
    """Requests with a thread at once: those being answered, as many again having their body read
    or being refused, and room for a burst of small ones (/health, refusals)."""
    return 2 * concurrency + 64


def heads_cap() -> int:
    """Connections whose head is still arriving, at most: each holds a socket (and at most
    MAX_HEAD_BYTES), so a quarter of the process's file descriptors, up to MAX_WAITING_HEADS."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_WAITING_HEADS
    return max(16, min(MAX_WAITING_HEADS, soft // 4))


def _canned(code: int, reason: str, message: str, headers: str = "") -> bytes:
    body = json.dumps({"error": {"message": message, "code": code}})
    return (f"HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\n{headers}"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()


BUSY = _canned(503, "Service Unavailable", "busy: too many connections; retry shortly", "Retry-After: 1\r\n")
HEAD_TOO_LARGE = _canned(431, "Request Header Fields Too Large",
                         f"the request line and headers are over {MAX_HEAD_BYTES} bytes")


def _answer_now(sock, answer: bytes) -> None:
    """Answer without blocking the calling thread (the answer fits an empty send buffer)."""
    try:
        sock.setblocking(False)
        _drain(sock)
        sock.send(answer)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _drain(sock) -> int:
    """Read and discard what has arrived on a non-blocking socket: the bytes read, or -1 once the
    peer is done."""
    read = 0
    try:
        for _ in range(16):
            data = sock.recv(65536)
            if not data:
                return -1
            read += len(data)
    except BlockingIOError:
        pass
    except OSError:
        return -1
    return read


class Closer:
    """Closes refused connections in one thread, after reading what their clients still send (up
    to LINGER_S and LINGER_BYTES): a socket closed with unread data (the rest of a request) resets
    the connection, and the client then fails sending its body, or loses the answer before it
    reads it."""

    def __init__(self):
        self.selector, self.lock = selectors.DefaultSelector(), threading.Lock()
        self.pending = {}  # socket -> [when to close it anyway, bytes it may still send]
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="steadytune-closer", daemon=True)
        self.thread.start()

    def add(self, sock) -> None:
        with self.lock:
            if self.stopped or len(self.pending) >= MAX_LINGERING:
                sock.close()
                return
            sock.setblocking(False)
            self.pending[sock] = [time.monotonic() + LINGER_S, LINGER_BYTES]
            self.selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        while not self.stopped:
            ready = [key.fileobj for key, _ in self.selector.select(timeout=0.1)]
            now = time.monotonic()
            with self.lock:
                done = {s for s, (at, _) in self.pending.items() if at < now}
                for s in ready:
                    if s in self.pending:
                        read = _drain(s)
                        self.pending[s][1] -= read
                        if read < 0 or self.pending[s][1] < 0:
                            done.add(s)
                for s in done:
                    self._close(s)

    def _close(self, sock) -> None:
        del self.pending[sock]
        self.selector.unregister(sock)
        sock.close()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for s in list(self.pending):
                self._close(s)
        self.thread.join()


class Heads:
    """The request heads (request line and headers) of new connections, read in one thread: a
    client that sends its head slowly (a byte a second: slowloris) costs a socket and a buffer,
    never a thread, and nothing is decided on a head before it is complete. A complete head goes
    to `dispatch(sock, address, head)`; one not complete within `timeout` seconds is dropped, and
    so is the oldest waiting one when `most` are waiting: a slow sender loses its place, a prompt
    client never waits for it."""

    def __init__(self, dispatch, timeout: float, most: int, closer: Closer):
        self.dispatch, self.timeout, self.most, self.closer = dispatch, timeout, most, closer
        self.selector, self.lock = selectors.DefaultSelector(), threading.Lock()
        self.waiting = {}  # socket -> [client address, bytes so far, deadline]: oldest first
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="steadytune-heads", daemon=True)
        self.thread.start()

    def add(self, sock, address) -> None:
        sock.setblocking(False)
        with self.lock:
            if self.stopped:
                sock.close()
                return
            if len(self.waiting) >= self.most:
                self._drop(next(iter(self.waiting)))
            self.waiting[sock] = [address, bytearray(), time.monotonic() + self.timeout]
            self.selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        while not self.stopped:
            ready = [key.fileobj for key, _ in self.selector.select(timeout=0.05)]
            with self.lock:
                complete = [c for c in map(self._read, ready) if c]
                now = time.monotonic()
                while self.waiting:  # one timeout for all: the oldest expire first
                    sock, (_, _, deadline) = next(iter(self.waiting.items()))
                    if deadline > now:
                        break
                    self._drop(sock)
            for sock, address, head in complete:  # outside the lock: dispatch may start a thread
                self.dispatch(sock, address, head)

    def _read(self, sock):
        """Read what arrived on `sock`: (sock, address, head) once its head is complete."""
        entry = self.waiting.get(sock)
        if entry is None:
            return None
        address, head, _ = entry
        seen = len(head)
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return None
        head += data
        start = max(0, seen - 3)
        if head.find(b"\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0:
            self._forget(sock)
            sock.setblocking(True)
            return sock, address, bytes(head)
        if len(head) > MAX_HEAD_BYTES:
            self._forget(sock)
            _answer_now(sock, HEAD_TOO_LARGE)
            self.closer.add(sock)
        return None

    def _forget(self, sock) -> None:
        del self.waiting[sock]
        self.selector.unregister(sock)

    def _drop(self, sock) -> None:
        self._forget(sock)
        sock.close()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for s in list(self.waiting):
                self._drop(s)
        self.thread.join()


def server_class(family: int):
    from http.server import ThreadingHTTPServer

    class HTTPServer(ThreadingHTTPServer):
        """A request gets a thread once its head has arrived (Heads), at most `cap` at once; beyond
        that it gets 503 at once, without a thread (Closer)."""

        address_family = family
        daemon_threads, block_on_close = False, True  # server_close() joins the request threads
        request_queue_size = LISTEN_BACKLOG

        def __init__(self, address, handler, cap: int, head_timeout: float, heads: int):
            self.cap, self.lock = cap, threading.Lock()
            self.thread_ids, self.clients = set(), set()  # native ids; sockets with a thread
            self.head_of = {}  # socket -> its head (and what followed it), for the handler
            self.lingering = set()  # sockets to close through the Closer
            super().__init__(address, handler)
            self.closer = Closer()
            self.heads = Heads(self._dispatch, head_timeout, heads, self.closer)

        def process_request(self, request, client_address):
            self.heads.add(request, client_address)  # accept thread: no reading, no thread

        def _dispatch(self, sock, address, head: bytes) -> None:
            with self.lock:
                admitted = len(self.clients) < self.cap
                if admitted:
                    self.clients.add(sock)
                    self.head_of[sock] = head
            if not admitted:
                _answer_now(sock, BUSY)
                self.closer.add(sock)
                return
            try:
                super().process_request(sock, address)  # a thread: process_request_thread
            except BaseException:
                self.forget(sock)
                sock.close()
                raise

        def linger(self, sock) -> None:
            """Close `sock`, when its request is done, through the Closer."""
            with self.lock:
                self.lingering.add(sock)

        def shutdown_request(self, request):
            with self.lock:
                linger = request in self.lingering
                self.lingering.discard(request)
            if not linger:
                super().shutdown_request(request)
                return
            try:
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.closer.add(request)

        def take_head(self, sock) -> bytes:
            with self.lock:
                return self.head_of.pop(sock, b"")

        def forget(self, sock) -> None:
            with self.lock:
                self.clients.discard(sock)
                self.head_of.pop(sock, None)

        def process_request_thread(self, request, client_address):
            self.thread_ids.add(threading.get_native_id())
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.forget(request)

        def handle_error(self, request, client_address):
            if isinstance(sys.exc_info()[1], OSError):  # a client gone, or too slow
                return
            super().handle_error(request, client_address)

        def hang_up(self) -> None:
            """Shut the sockets of the requests still open (reads return, writes fail)."""
            for sock in list(self.clients):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def server_close(self):
            self.heads.stop()
            super().server_close()
            self.closer.stop()

    return HTTPServer
