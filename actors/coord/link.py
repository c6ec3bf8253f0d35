"""The coord actor's connection to NATS: nats-py's asyncio client in a thread of its own, so the
actor's loop stays the one every actor runs. The two sides meet only through `Event`s (appended
here, taken by the actor when the eventfd wakes it) and the write requests the actor hands over.

The watch covers the whole bucket. It starts at each key's latest entry, and after any break
(a reconnect, a server lost, a watch that went quiet) it starts again just after the last
revision delivered, so nothing is missed; what the new watch repeats, the view drops as replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import nats
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from meshsup.actors.settings.coordination import CoordinationSettings

RETRY_MIN, RETRY_MAX = 0.2, 2.0  # between attempts at a connection or a watch
REQUEST_TIMEOUT = 2.0  # a JetStream request, a stalled server's answer included


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes | None  # None: deleted or purged
    revision: int
    age: float  # seconds since the server stored it


@dataclass(frozen=True, slots=True)
class Up:
    """The watch delivered everything the bucket held when it began."""


@dataclass(frozen=True, slots=True)
class Down:
    reason: str


@dataclass(frozen=True, slots=True)
class Problem:
    """An error the client reported that did not end the connection (counted and logged)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Written:
    key: str
    ok: bool
    revision: int  # the entry's, when ok
    error: str  # "wrong_revision": a compare-and-set lost


Event = Entry | Up | Down | Problem | Written


class Link:
    def __init__(self, settings: CoordinationSettings, client_name: str) -> None:
        self.settings = settings
        self.client_name = client_name
        self.events: deque[Event] = deque()
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.revision = 0  # the last delivered: a new watch starts after it
        self.loop = asyncio.new_event_loop()
        self._kv: Any = None
        self._js: Any = None
        self._nc: Any = None
        self._sub: Any = None
        self._rewatch = asyncio.Event()
        self._up = False
        self._stop = False
        self._main_task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._run, name="nats", daemon=True)

    # --- the actor's side -------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def take(self) -> list[Event]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake)
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out

    def put(self, key: str, value: bytes) -> None:
        self._submit(self._write(key, value, None))

    def take_over(self, key: str, value: bytes, revision: int) -> None:
        """Compare-and-set: create `key` (revision 0) or update it at `revision`."""
        self._submit(self._write(key, value, revision))

    def delete(self, key: str, timeout: float) -> None:
        """Delete `key` and wait for it at most `timeout` (a node stopping takes its record away)."""
        future = self._submit(self._delete(key))
        with contextlib.suppress(Exception):
            future.result(timeout)

    def rewatch(self) -> None:
        """Start the watch again after the last revision (the actor saw it go quiet)."""
        self.loop.call_soon_threadsafe(self._rewatch.set)

    def close(self) -> None:
        """Stop the thread (whatever it waits for: a connection, a server's answer) and close."""
        self._stop = True
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._cancel)
            self.thread.join(3.0)
        with contextlib.suppress(OSError):
            os.close(self.wake)

    def _submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def _emit(self, event: Event) -> None:
        if self._stop:
            return  # the actor no longer reads them (and the eventfd may be closed)
        self.events.append(event)
        os.eventfd_write(self.wake, 1)

    # --- the thread ---------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._main_task = self.loop.create_task(self._main())
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._main_task)
        self.loop.run_until_complete(self._shutdown())
        self.loop.close()

    def _cancel(self) -> None:
        if self._main_task is not None:
            self._main_task.cancel()

    async def _main(self) -> None:
        delay = RETRY_MIN
        while not self._stop:
            try:
                await self._session()
                delay = RETRY_MIN
            except Exception as err:  # a server's garbage, a timeout, a refusal: try again
                self._down(f"{type(err).__name__}: {err}"[:200])
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _shutdown(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sub.unsubscribe(), 0.5)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 1.0)
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def _down(self, reason: str) -> None:
        self._up = False  # the next watch's catch-up says Up again
        self._emit(Down(reason))

    async def _session(self) -> None:
        """Connect (nats-py reconnects by itself after this), find or make the bucket, and keep a
        watch going until the connection is given up."""
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(**self._options())
            self._js = self._nc.jetstream(timeout=REQUEST_TIMEOUT)
        try:
            self._kv = await self._js.key_value(self.settings.bucket)
        except BucketNotFoundError:
            self._kv = await self._js.create_key_value(
                api.KeyValueConfig(bucket=self.settings.bucket, history=1, replicas=self.settings.replicas)
            )
        while not self._stop:
            await self._watch()
            self._rewatch.clear()
            await self._rewatch.wait()
            if self._nc.is_closed:
                raise ConnectionError("connection closed")

    async def _watch(self) -> None:
        """A watch from just after the last revision delivered (the first: each key's latest)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        config = api.ConsumerConfig()
        if self.revision:
            config.deliver_policy, config.opt_start_seq = api.DeliverPolicy.BY_START_SEQUENCE, self.revision + 1
        else:
            config.deliver_policy = api.DeliverPolicy.LAST_PER_SUBJECT
        self._sub = await self._js.subscribe(
            f"$KV.{self.settings.bucket}.>",
            stream=f"KV_{self.settings.bucket}",
            cb=self._on_msg,
            ordered_consumer=True,
            idle_heartbeat=1.0,
            config=config,
            inactive_threshold=30.0,
        )
        info = await self._sub.consumer_info()
        if info.num_pending == 0 and self._sub.delivered == 0:
            self._caught_up()

    def _caught_up(self) -> None:
        if not self._up:
            self._up = True
            self._emit(Up())

    async def _on_msg(self, msg: Any) -> None:
        meta = msg.metadata
        if meta.sequence.stream <= self.revision:
            return
        self.revision = meta.sequence.stream
        op = msg.header.get(KV_OP) if msg.header else None
        key = msg.subject[len(f"$KV.{self.settings.bucket}.") :]
        age = max(0.0, time.time() - meta.timestamp.timestamp()) if meta.timestamp else 0.0
        self._emit(Entry(key, None if op in (KV_DEL, KV_PURGE) else bytes(msg.data), self.revision, age))
        if meta.num_pending == 0:
            self._caught_up()

    async def _write(self, key: str, value: bytes, revision: int | None) -> None:
        try:
            if self._kv is None:
                raise ConnectionError("no bucket yet")
            if revision is None:
                rev = await self._kv.put(key, value)
            elif revision == 0:
                rev = await self._kv.create(key, value)
            else:
                rev = await self._kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            self._emit(Written(key, False, 0, "wrong_revision"))
        except Exception as err:
            # create() of a key that exists says so in the server's words, not with its own error
            wrong = "wrong last sequence" in str(err) or "key exists" in str(err)
            self._emit(Written(key, False, 0, "wrong_revision" if wrong else f"{type(err).__name__}: {err}"[:200]))
        else:
            self._emit(Written(key, True, rev, ""))

    async def _delete(self, key: str) -> None:
        if self._kv is not None:
            await asyncio.wait_for(self._kv.delete(key), REQUEST_TIMEOUT)

    def _options(self) -> dict[str, Any]:
        s = self.settings

        async def disconnected() -> None:
            self._down("disconnected")

        async def reconnected() -> None:
            self.loop.call_soon(self._rewatch.set)

        async def error(err: Exception) -> None:
            self._emit(Problem(f"{type(err).__name__}: {err}"[:200]))

        options: dict[str, Any] = {
            "servers": list(s.servers),
            "name": self.client_name,
            "connect_timeout": REQUEST_TIMEOUT,
            "reconnect_time_wait": 0.5,
            "max_reconnect_attempts": -1,
            "ping_interval": 2,
            "max_outstanding_pings": 2,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
        }
        if s.user:
            options["user"] = s.user
            if s.password_file is not None:
                options["password"] = s.password_file.read_text().strip()
        if s.creds_file is not None:
            options["user_credentials"] = str(s.creds_file)
        if s.ca_file is not None or s.cert_file is not None:
            tls = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if s.cert_file is not None and s.key_file is not None:
                tls.load_cert_chain(str(s.cert_file), str(s.key_file))
            options["tls"] = tls
        return options
