"""A reward server and its client: run a reward in another process (or environment, or machine) and use it in
training exactly like a local one.

Why: the VLM rewards pin their own transformers / torch versions, and a 7B reward may deserve its own GPU
(`reference/rewards.md` §9, §10.5). ``astrolabe serve-reward --reward hpsv3 --port 8765`` serves any registered
reward; ``build_reward("remote", url="http://127.0.0.1:8765", reward="hpsv3")`` is a `Reward` like any other.

Protocol ``astrolabe-reward/1`` (language-neutral; HTTP/1.1, standard library only, no pickle anywhere):

``POST /score`` with ``Content-Type: application/msgpack`` (or ``application/json``, bytes as base64)::

    {"protocol": "astrolabe-reward/1", "reward": "hpsv3",
     "items": [{"id": "0", "prompt": "a corgi surfing", "fps": 16.0, "frames": 81, "height": 480, "width": 832,
                "encoding": "rgb24", "data": <bytes>}, ...]}

``encoding`` is ``rgb24`` (``frames × height × width × 3`` uint8, row-major ``[T, H, W, 3]``, lossless) or ``mp4``
(an H.264 file's bytes; ``frames`` must match what decodes). The answer keeps the items' order::

    {"protocol": "astrolabe-reward/1", "reward": "hpsv3", "elapsed_s": 0.8,
     "items": [{"id": "0", "status": "ok", "score": 7.12}, {"id": "1", "status": "error", "error": "..."}]}

Status codes: 200 (per-item status inside), 400 malformed (a ``Content-Length`` that is not one non-negative
integer, given once, included; a ``Transfer-Encoding``), 404 unknown path or reward, 408 request not read within the
server's ``request_timeout`` (one deadline for the whole request, however slowly its bytes trickle in; the
connection is then closed), 411 no ``Content-Length``, 413 request over the server's ``max_request_bytes`` (checked
from ``Content-Length`` before anything is read), 500 server fault, 503 the server is at its ``max_clients`` (retry;
``Retry-After`` says when). ``GET /health`` answers ``{"status": "ok"}``; ``GET /info`` lists the rewards, the limits
and versions.

Every resource is bounded. Connections: ``max_clients`` are served at once, one thread each, and the listen
backlog holds as many, so a burst is queued by the kernel rather than reset; while all are busy a new connection
gets a 503 at once (up to ``max_clients`` more; past those it is closed). Request bodies: one request holds at most
``max_request_bytes`` (twice, once parsed). Decoded frames: what an item costs decoded, float32
``frames × height × width × 3 × 4`` bytes (`video.decoded_bytes`, what is really allocated), counts against the
server's ``max_decoded_bytes`` per request before anything is decoded; each group of same-shaped items decodes
straight into the batch the reward is called on, one group at a time, and one request per reward scores at once,
so the frames held never exceed ``max_decoded_bytes`` per served reward (plus one frame in flight). An mp4's frame
count and size are checked against its container header before decoding, and decoding stops at the first frame
beyond them. An item over a limit fails alone, with a message.

The client splits a batch into requests under its own size limits (encoded and decoded bytes), retries
transport failures (connection refused, timeouts, 5xx) a bounded number of times with exponential backoff, never
retries a 4xx, and returns NaN for every item that failed (NaN marks a failed sample everywhere in the trainer, so a lost reward never becomes a
fake 0). After a transport failure it fails fast for ``cooldown_s`` so a dead server does not cost a timeout per
sample. The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import base64
import errno
import io
import json
import math
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import SHUT_WR
from typing import Any

import torch
from torch import Tensor

from astrolabe_rl.errors import UserError
from astrolabe_rl.rewards.base import Reward, check_videos, register_reward

PROTOCOL = "astrolabe-reward/1"
MSGPACK = "application/msgpack"
JSON = "application/json"


class RemoteRewardError(UserError, RuntimeError):
    """The reward server could not be reached or answered with an error for the whole request."""


# ------------------------------------------------------------------------------------------ encoding


def encode_video(frames: Tensor, encoding: str = "rgb24", fps: float = 16.0) -> bytes:
    """``[T, 3, H, W]`` float in [0, 1] -> bytes in the protocol's ``encoding`` (8-bit, rounded once)."""
    from astrolabe_rl.video import to_uint8

    if encoding == "rgb24":
        return to_uint8(frames.cpu()).numpy().tobytes()
    if encoding == "mp4":
        return _mp4_bytes(frames, fps)
    raise ValueError(f"unknown encoding {encoding!r}; use 'rgb24' or 'mp4'")


def item_shape(item: dict[str, Any]) -> tuple[int, int, int]:
    """The ``(frames, height, width)`` an item declares; raises ValueError unless all three are positive integers."""
    shape = tuple(item.get(k) for k in ("frames", "height", "width"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ValueError(f"frames, height and width must be positive integers; got {shape}")
    return shape  # type: ignore[return-value]


def decode_video(item: dict[str, Any]) -> Tensor:
    """A request item -> float frames ``[T, 3, H, W]`` in [0, 1]; raises ValueError saying what is wrong.

    Decoded frames never exceed what the item declares (``frames × height × width``): rgb24 data must be exactly
    that long, and an mp4 is checked against its header first and cut off at the first frame beyond it."""
    t, h, w = item_shape(item)
    out = torch.empty(t, 3, h, w)
    decode_item_into(item, out)
    return out


def decode_item_into(item: dict[str, Any], out: Tensor) -> None:
    """Decode a request item into ``out`` (float32 ``[T, 3, H, W]`` of the item's declared shape, e.g. a slot of
    the batch its group is scored in); raises ValueError saying what is wrong."""
    from astrolabe_rl.video import read_mp4_bounded, rgb24_into

    data = item.get("data")
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"'data' must be bytes; got {type(data).__name__}")
    encoding = item.get("encoding", "rgb24")
    if encoding == "rgb24":
        rgb24_into(data, out)
    elif encoding == "mp4":
        read_mp4_bounded(bytes(data), *item_shape(item), out=out)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use 'rgb24' or 'mp4'")


def _mp4_bytes(frames: Tensor, fps: float) -> bytes:
    import tempfile
    from pathlib import Path

    from astrolabe_rl.video import write_mp4

    with tempfile.TemporaryDirectory() as d:
        path = write_mp4(Path(d) / "v.mp4", frames.cpu(), fps=max(1, round(fps)))
        return path.read_bytes()


def pack(obj: dict[str, Any], content_type: str) -> bytes:
    """Serialise a message (msgpack, or JSON with bytes as base64 strings)."""
    if content_type == MSGPACK:
        import msgpack

        return msgpack.packb(obj, use_bin_type=True)
    return json.dumps(_b64(obj)).encode()


def unpack(body: bytes, content_type: str) -> dict[str, Any]:
    """Parse a message; raises ValueError for anything that is not a protocol object."""
    try:
        if content_type == MSGPACK:
            import msgpack

            obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
        else:
            obj = _unb64(json.loads(body))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a malformed request
        raise ValueError(f"cannot parse the {content_type} body: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError("the message must be a map")
    return obj


def _b64(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"$b64": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {k: _b64(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_b64(v) for v in obj]
    return obj


def _unb64(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"$b64"}:
            return base64.b64decode(obj["$b64"])
        return {k: _unb64(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unb64(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------ server


class RewardServer:
    """Serves rewards over HTTP (see the module docstring for the protocol).

    Args:
        rewards: ``{name: Reward}`` served at ``POST /score``.
        host: bind address; 127.0.0.1 keeps the server private to this machine.
        port: 0 picks a free port (read it back from ``url``).
        max_request_bytes: larger requests are refused with 413 before being read.
        request_timeout: the read deadline, in seconds: from the start of a request (or of the wait for one on an
            open connection) until its last byte arrives. A slower client gets 408 and the connection is closed,
            however steadily it trickles bytes. Scoring time does not count.
        max_decoded_bytes: the memory decoded frames of one request may take, counted as they are held: float32,
            ``frames × height × width × 3 × 4`` bytes per item (`video.decoded_bytes`); the items past it fail alone,
            before decoding.
        max_clients: connections served at once (one thread each; also the listen backlog). While all are busy a
            new client gets a 503 at once.
    """

    def __init__(self, rewards: dict[str, Reward], host: str = "127.0.0.1", port: int = 0,
                 max_request_bytes: int = 256 << 20, request_timeout: float = 60.0,
                 max_decoded_bytes: int = 1 << 30, max_clients: int = 64) -> None:
        if not rewards:
            raise ValueError("give the server at least one reward")
        if min(request_timeout, max_request_bytes, max_decoded_bytes, max_clients) <= 0:
            raise ValueError("request_timeout, max_request_bytes, max_decoded_bytes and max_clients must be > 0")
        self.rewards = rewards
        self.max_request_bytes = max_request_bytes
        self.max_decoded_bytes = max_decoded_bytes
        self.max_clients = max_clients
        self.request_timeout = request_timeout
        self._locks = {name: threading.Lock() for name in rewards}
        # ``timeout`` bounds each socket operation (writes included); the read deadline bounds a whole request
        handler = type("Handler", (_Handler,), {"app": self, "timeout": request_timeout})
        try:
            self.httpd = _BoundedHTTPServer((host, port), handler, max_clients)
        except OSError as e:
            said = (e.strerror or str(e))[:1].lower() + (e.strerror or str(e))[1:]
            raise OSError(e.errno, f"cannot serve on {host}:{port}: {said}"
                          + (" (another server holds the port: pick another --port, or 0 for any free one)"
                             if e.errno == errno.EADDRINUSE else "")) from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RewardServer":
        """Serve in a background thread; returns self (use ``stop`` or a ``with`` block to end it)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="reward-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def info(self) -> dict[str, Any]:
        import platform

        return {"protocol": PROTOCOL, "rewards": sorted(self.rewards), "max_request_bytes": self.max_request_bytes,
                "max_decoded_bytes": self.max_decoded_bytes, "request_timeout": self.request_timeout,
                "max_clients": self.max_clients,
                "versions": {"torch": torch.__version__, "python": platform.python_version()}}

    def score(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Handle one ``/score`` request -> (HTTP status, answer)."""
        name = request.get("reward") or (next(iter(self.rewards)) if len(self.rewards) == 1 else None)
        if request.get("protocol", PROTOCOL) != PROTOCOL:
            return 400, {"error": f"protocol {request.get('protocol')!r} is not {PROTOCOL!r}"}
        if name not in self.rewards:
            return 404, {"error": f"reward {name!r} is not served here; served: {sorted(self.rewards)}"}
        items = request.get("items")
        if not isinstance(items, list):
            return 400, {"error": "'items' must be a list"}
        start = time.perf_counter()
        with self._locks[name]:
            results = _score_items(self.rewards[name], items, self.max_decoded_bytes)
        return 200, {"protocol": PROTOCOL, "reward": name, "items": results,
                     "elapsed_s": time.perf_counter() - start}


def _score_items(reward: Reward, items: list[Any], max_decoded_bytes: int) -> list[dict[str, Any]]:
    """Check every item's cost against the request's decode budget, then, one group of same-shaped items at a time,
    decode the group straight into one batch, score it, and free it; report each item's own status."""
    from astrolabe_rl.video import decoded_bytes

    results: list[dict[str, Any]] = [{} for _ in items]
    groups: dict[tuple[int, int, int], list[tuple[int, dict[str, Any], str]]] = {}
    budget = max_decoded_bytes
    for i, item in enumerate(items):
        ident = str(item.get("id", i)) if isinstance(item, dict) else str(i)
        results[i] = {"id": ident}
        try:
            if not isinstance(item, dict):
                raise ValueError(f"an item must be a map; got {type(item).__name__}")
            shape = item_shape(item)
            need = decoded_bytes(*shape)
            if need > budget:
                raise ValueError(f"{shape[0]} frames of {shape[1]}×{shape[2]} take {need} bytes decoded (float32), "
                                 f"over what is left of this server's max_decoded_bytes={max_decoded_bytes} for the "
                                 "request (send fewer or smaller videos per request)")
            budget -= need
        except Exception as e:  # noqa: BLE001 - a bad item fails alone
            results[i].update(status="error", error=f"bad item: {type(e).__name__}: {e}")
            continue
        groups.setdefault(shape, []).append((i, item, str(item.get("prompt", ""))))
    for (t, h, w), members in groups.items():
        videos = torch.empty(len(members), t, 3, h, w)  # within the budget reserved above
        kept: list[tuple[int, str]] = []
        for i, item, prompt in members:
            try:
                decode_item_into(item, videos[len(kept)])  # a failed item's slot is reused by the next
            except Exception as e:  # noqa: BLE001 - a bad item fails alone
                results[i].update(status="error", error=f"bad item: {type(e).__name__}: {e}")
                continue
            kept.append((i, prompt))
        if kept:
            for i, score, error in _score_group(reward, videos[: len(kept)], kept):
                results[i].update({"status": "ok", "score": score} if error is None
                                  else {"status": "error", "error": error})
        del videos
    return results


def _score_group(reward: Reward, videos: Tensor, group: list[tuple[int, str]]) -> list[tuple[int, float, str | None]]:
    """One batch call on ``videos [n, T, 3, H, W]`` (``group``: each row's item index and prompt); if it raises,
    item by item, so one bad video costs one error."""
    prompts = [p for _, p in group]
    try:
        scores = reward(videos, prompts).float().cpu().tolist()
        return [(i, s, None if math.isfinite(s) else "the reward returned a non-finite score")
                for (i, _), s in zip(group, scores)]
    except Exception:  # noqa: BLE001
        pass
    out = []
    for row, (i, prompt) in enumerate(group):
        try:
            s = float(reward(videos[row : row + 1], [prompt])[0])
            out.append((i, s, None if math.isfinite(s) else "the reward returned a non-finite score"))
        except Exception as e:  # noqa: BLE001
            out.append((i, float("nan"), f"{type(e).__name__}: {e}"))
    return out


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with a fixed number of connection threads (``max_clients``) and a listen backlog as
    deep: a burst of clients waits in the kernel's queue instead of being reset, and a client that finds every
    thread busy gets a 503 at once (from one of at most ``max_clients`` short-lived answering threads; past those,
    its connection is closed)."""

    daemon_threads = True
    BUSY_DRAIN_S = 2.0  # how long a 503'd connection is read (and discarded) so closing it does not reset it

    def __init__(self, address: tuple[str, int], handler: type, max_clients: int) -> None:
        self.request_queue_size = max_clients  # read by server_activate (listen) inside __init__
        self.max_clients = max_clients
        self._serving = threading.BoundedSemaphore(max_clients)
        self._refusing = threading.BoundedSemaphore(max_clients)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._serving.acquire(blocking=False):
            threading.Thread(target=self._serve, args=(request, client_address), daemon=True).start()
        elif self._refusing.acquire(blocking=False):
            threading.Thread(target=self._busy, args=(request,), daemon=True).start()
        else:
            self.shutdown_request(request)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)  # handles, reports errors, closes
        finally:
            self._serving.release()

    def _busy(self, sock: Any) -> None:
        """Answer 503, then read what the client sends until it closes (or for ``BUSY_DRAIN_S``): closing a socket
        with unread bytes would reset the connection, and the client could lose the answer."""
        body = json.dumps({"error": f"this reward server is serving its maximum of {self.max_clients} clients at "
                                    "once (max_clients); retry in a moment"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            deadline = time.monotonic() + self.BUSY_DRAIN_S
            sock.settimeout(self.BUSY_DRAIN_S)
            sock.sendall(head + body)
            sock.shutdown(SHUT_WR)
            while time.monotonic() < deadline and sock.recv(1 << 16):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
        except OSError:
            pass  # the client left, or kept sending past the drain time: nothing more to tell it
        finally:
            self.close_request(sock)
            self._refusing.release()


class _ReadDeadline(Exception):
    """A request was not read before its deadline. Not a TimeoutError: the stdlib handler would swallow that one
    and drop the connection without an answer."""


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes where every read waits at most until one shared deadline (``time.monotonic()`` seconds).

    A per-read socket timeout alone lets a client that sends one byte per timeout hold a connection forever; this
    one bounds the whole request."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _ReadDeadline
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            raise _ReadDeadline from None


class _Handler(BaseHTTPRequestHandler):
    app: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # the trainer's logs stay readable; errors travel back in the answers

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader holds a reference that would keep the socket's descriptor open
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """One request under one read deadline; past it, answer 408 and close the connection."""
        # what a reply needs, set before the request line is parsed (it may never be)
        self.requestline, self.request_version, self.command, self.headers = "", self.protocol_version, None, None
        self._reader.deadline = time.monotonic() + self.app.request_timeout
        try:
            super().handle_one_request()
        except _ReadDeadline:
            self.close_connection = True
            try:
                self._reply(408, {"error": f"the request was not received within {self.app.request_timeout:g} s "
                                           "(this server's request_timeout)"}, self._content_type())
            except OSError:
                pass  # the client is gone; nothing to tell it

    def _content_type(self) -> str:
        ctype = self.headers.get("Content-Type", JSON) if self.headers is not None else JSON
        return MSGPACK if ctype.startswith(MSGPACK) else JSON

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/health":
            self._reply(200, {"status": "ok"}, JSON)
        elif self.path == "/info":
            self._reply(200, self.app.info(), JSON)
        else:
            self._reply(404, {"error": f"unknown path {self.path}; use POST /score, GET /health, GET /info"}, JSON)

    def do_POST(self) -> None:  # noqa: N802
        ctype = self._content_type()
        if self.path != "/score":
            self.close_connection = True  # the unread body must not be parsed as the next request
            self._reply(404, {"error": f"unknown path {self.path}; POST to /score"}, ctype)
            return
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            self._reply(400, {"error": "Transfer-Encoding is not supported; send the body with a Content-Length"},
                        ctype)
            return
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:  # which one frames the body is ambiguous (request smuggling): refuse them all
            self.close_connection = True
            self._reply(400, {"error": f"Content-Length is given {len(lengths)} times; give it once"}, ctype)
            return
        raw = lengths[0] if lengths else None
        if raw is None:
            self.close_connection = True
            self._reply(411, {"error": "Content-Length is required"}, ctype)
            return
        length = int(raw) if raw.strip().isascii() and raw.strip().isdigit() else -1
        if length < 0:
            self.close_connection = True
            self._reply(400, {"error": f"Content-Length must be a non-negative integer; got {raw[:40]!r}"}, ctype)
            return
        if length > self.app.max_request_bytes:
            self.close_connection = True
            self._reply(413, {"error": f"request is {length} bytes; this server takes at most "
                                       f"{self.app.max_request_bytes} (send fewer videos per request)"}, ctype)
            return
        body = self.rfile.read(length)  # past the read deadline: _ReadDeadline, answered with 408
        if len(body) != length:
            self.close_connection = True
            self._reply(400, {"error": f"the body ended after {len(body)} of {length} bytes"}, ctype)
            return
        try:
            status, answer = self.app.score(unpack(body, ctype))
        except ValueError as e:
            status, answer = 400, {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - report, keep serving
            status, answer = 500, {"error": f"{type(e).__name__}: {e}"}
        self._reply(status, answer, ctype)

    def _reply(self, status: int, obj: dict[str, Any], ctype: str) -> None:
        self.connection.settimeout(self.timeout)  # the reader left the remaining read time on the socket
        body = pack(obj, ctype)
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


# ------------------------------------------------------------------------------------------------ client


@dataclass
class RemoteReward:
    """A `Reward` scored by a reward server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765``.
        reward: the served reward's name (also this reward's ``name`` unless ``name`` is given).
        timeout: seconds per HTTP request (connect + score + answer).
        retries: extra attempts after a transport failure (connection refused, timeout, 5xx); 4xx is never retried.
        backoff: seconds before the first retry, doubled each time.
        cooldown_s: after a request failed all attempts, calls fail at once for this long.
        encoding: "rgb24" (lossless, large) or "mp4" (H.264 crf 18, ~50× smaller).
        fps: frame rate sent with each video.
        max_request_bytes: batches are split into requests below this size.
        max_decoded_bytes: ... and below this many bytes of decoded frames (float32, `video.decoded_bytes`), at most
            the server's own ``max_decoded_bytes`` (default 1 GiB for both).
    ``extras["errors"]`` maps the batch index of each failed item to its message after every call.
    """

    url: str
    reward: str
    name: str | None = None
    timeout: float = 120.0
    retries: int = 2
    backoff: float = 0.5
    cooldown_s: float = 30.0
    encoding: str = "rgb24"
    fps: float = 16.0
    max_request_bytes: int = 64 << 20
    max_decoded_bytes: int = 1 << 30
    content_type: str = MSGPACK
    needs: frozenset[str] = frozenset({"video", "prompts"})
    scale: tuple[float, float] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    _down_until: float = field(default=0.0, repr=False)
    _down_because: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or self.reward
        self.url = self.url.rstrip("/")

    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """``videos [B, T, 3, H, W]`` -> ``[B]`` scores, NaN where the server reported an item error.

        Raises:
            RemoteRewardError: the server could not be reached (after retries) or refused the whole request.
        """
        check_videos(videos, prompts)
        scores = torch.full((videos.shape[0],), float("nan"))
        errors: dict[int, str] = {}
        items = [self._item(i, v, p) for i, (v, p) in enumerate(zip(videos, prompts))]
        for batch in self._requests(items, errors):
            for i, res in zip([int(it["id"]) for it in batch], self._post(batch)):
                if res.get("status") == "ok":
                    scores[i] = float(res["score"])
                else:
                    errors[i] = str(res.get("error", "unknown error"))
        self.extras = {"errors": errors}
        return scores

    def _item(self, i: int, video: Tensor, prompt: str) -> dict[str, Any]:
        t, _, h, w = video.shape
        return {"id": str(i), "prompt": prompt, "fps": float(self.fps), "frames": t, "height": h, "width": w,
                "encoding": self.encoding, "data": encode_video(video, self.encoding, self.fps)}

    def _requests(self, items: list[dict[str, Any]], errors: dict[int, str]) -> list[list[dict[str, Any]]]:
        """Greedy split into requests under ``max_request_bytes`` and ``max_decoded_bytes``; an item alone over
        either is an item error."""
        from astrolabe_rl.video import decoded_bytes

        batches, current, size, decoded = [], [], 0, 0
        for it in items:
            n = len(it["data"]) + len(it["prompt"].encode()) + 256
            d = decoded_bytes(it["frames"], it["height"], it["width"])
            if n > self.max_request_bytes:
                errors[int(it["id"])] = f"video is {n} bytes encoded, over max_request_bytes={self.max_request_bytes}"
                continue
            if d > self.max_decoded_bytes:
                errors[int(it["id"])] = f"video is {d} bytes decoded, over max_decoded_bytes={self.max_decoded_bytes}"
                continue
            if current and (size + n > self.max_request_bytes or decoded + d > self.max_decoded_bytes):
                batches.append(current)
                current, size, decoded = [], 0, 0
            current.append(it)
            size += n
            decoded += d
        return batches + ([current] if current else [])

    def _post(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One request with bounded retries; returns the per-item results in order."""
        if time.monotonic() < self._down_until:  # the cause is said again: it is the first error a caller may see
            raise RemoteRewardError(f"reward server {self.url} failed recently ({self._down_because}); not retrying "
                                    f"for {self._down_until - time.monotonic():.0f} s more")
        body = pack({"protocol": PROTOCOL, "reward": self.reward, "items": items}, self.content_type)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self._send(body)
            except _Retryable as e:
                last = str(e)
                continue
            results = answer.get("items", [])
            if len(results) != len(items):
                raise RemoteRewardError(f"{self.url} answered {len(results)} items for {len(items)}")
            return results
        self._down_until = time.monotonic() + self.cooldown_s
        self._down_because = last
        raise RemoteRewardError(f"reward server {self.url} failed after {self.retries + 1} attempts: {last}")

    def _send(self, body: bytes) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/score", data=body, method="POST",
                                     headers={"Content-Type": self.content_type})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return unpack(resp.read(), self.content_type)
        except urllib.error.HTTPError as e:
            detail = _error_text(e, self.content_type)
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {detail}") from e
            raise RemoteRewardError(f"{self.url} refused the request (HTTP {e.code}): {detail}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            said = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
            raise _Retryable(said[:1].lower() + said[1:]) from e


class _Retryable(Exception):
    """A transport failure worth another attempt."""


def _error_text(e: urllib.error.HTTPError, content_type: str) -> str:
    try:
        return str(unpack(e.read(), content_type).get("error", ""))
    except Exception:  # noqa: BLE001 - the error body is best effort
        return e.reason


@register_reward("remote")
def remote_reward(url: str = "http://127.0.0.1:8765", reward: str = "hpsv3", name: str | None = None,
                  **options: Any) -> RemoteReward:
    """A reward served by ``astrolabe serve-reward`` (options: see `RemoteReward`)."""
    return RemoteReward(url, reward, name, **options)


remote_reward.options = RemoteReward  # the options it forwards, checked by `rewards.base.check_reward`


# --------------------------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``astrolabe serve-reward``."""
    p = subparsers.add_parser("serve-reward", help="serve rewards over HTTP for remote scoring",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", required=True, help="comma-separated registered rewards, e.g. hpsv3,videoalign_mq")
    p.add_argument("--reward-kwargs", default=None,
                   help="JSON object {reward: {kwarg: value}} or a path to a .json/.yaml file with one")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 = any free port)")
    p.add_argument("--max-request-mb", type=float, default=256.0, help="refuse larger requests (default 256)")
    p.add_argument("--max-decoded-mb", type=float, default=1024.0,
                   help="memory the decoded frames (float32, 12 bytes a pixel) of one request may take; items past it "
                        "fail alone (default 1024)")
    p.add_argument("--max-clients", type=int, default=64,
                   help="connections served at once (and the listen backlog); more get 503 at once (default 64)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a client has to send a whole request; slower ones get 408 (default 60)")
    p.add_argument("--device", default=None, help="device for every reward (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU)")
    p.set_defaults(func=serve_reward_command)


def serve_reward_command(args: argparse.Namespace) -> int:
    """``astrolabe serve-reward``: build the rewards, then serve until interrupted."""
    from astrolabe_rl.rewards._common import build_rewards, parse_reward_kwargs

    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    rewards = build_rewards(names, parse_reward_kwargs(args.reward_kwargs), args.device, args.dtype)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"serving on {args.host}: anyone who can reach this port can use the rewards (no auth)")
    server = RewardServer(rewards, args.host, args.port, int(args.max_request_mb * (1 << 20)),
                          request_timeout=args.request_timeout, max_decoded_bytes=int(args.max_decoded_mb * (1 << 20)),
                          max_clients=args.max_clients)
    print(json.dumps({"serving": sorted(rewards), "url": server.url}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0
