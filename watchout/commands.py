"""What each client message does: authentication, permissions, stream bookkeeping, then the hub."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Coroutine
from typing import Any

from watchout.alerts import AlertIntake
from watchout.auth import Principal, TokenVerifier, can_watch, check_produce, check_watch
from watchout.cluster import ClusterSink, initial_state
from watchout.errors import Forbidden, InvalidMessage, NotFound, StoreUnavailable, Unauthenticated
from watchout.hub import Hub, Peer, StreamState, Subscription, close_replaced
from watchout.protocol import (Alert, Auth, Register, StreamStatus, Subscribe, Unsubscribe, VideoFrame,
                               authenticated_message, error_message, registered_message, subscribed_message,
                               unsubscribed_message)
from watchout.sequencer import Sequencer
from watchout.store import Store

log = logging.getLogger("watchout.relay")


class Commands:
    """The core operations behind the WebSocket protocol, one method per client message."""

    def __init__(self, store: Store, hub: Hub, verifier: TokenVerifier, intake: AlertIntake, sink: ClusterSink,
                 sequencer: Sequencer) -> None:
        self.sequencer = sequencer
        self.store = store
        self.hub = hub
        self.sink = sink
        self.verifier = verifier
        self.intake = intake
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ identity
    def authenticate(self, peer: Peer, token: str | None) -> Principal:
        """Verify a token for this connection; a later token must name the same user."""
        if token is None:
            if peer.principal is None:
                raise Unauthenticated("the first message must carry a token", code="token-missing")
            return peer.principal
        principal = self.verifier.verify(token)
        previous = peer.principal
        if previous is not None and principal.sub != previous.sub:
            raise Unauthenticated("a connection's token cannot change user", code="token-user-changed")
        peer.principal = principal
        if previous is not None and (previous.role, previous.streams) != (principal.role, principal.streams):
            self._recheck(peer, principal)
        return principal

    def _recheck(self, peer: Peer, principal: Principal) -> None:
        """A refreshed token with another role or scope keeps only what it still allows."""
        for stream_id in list(peer.watching):
            state = self.hub.streams.get(stream_id)
            if state is not None and not can_watch(principal, stream_id, state.owner_id):
                self.hub.remove_watcher(state, peer)
                peer.send(error_message("not-found", f"stream {stream_id} not found; unsubscribed",
                                        stream_id=stream_id))
        if peer.producing is not None:
            state = self.hub.streams.get(peer.producing)
            if state is not None:
                check_produce(principal, peer.producing, state.owner_id)  # Forbidden closes 4403

    def auth(self, peer: Peer, msg: Auth) -> Principal:
        principal = self.authenticate(peer, msg.token)
        peer.send(authenticated_message(principal.sub, principal.role, principal.expires_at, msg.ref))
        return principal

    async def _lookup(self, stream_id: str) -> tuple[str | None, dict[str, Any] | None]:
        """(owner, the stored stream when it was read): the hub answers for a stream live here."""
        state = self.hub.streams.get(stream_id)
        if state is not None:
            return state.owner_id, None
        doc = await self.store.get_stream(stream_id)
        return (None, None) if doc is None else (str(doc["ownerId"]), doc)

    def _follow(self, stream_id: str, owner: str, doc: dict[str, Any] | None) -> StreamState:
        """The stream's live state here; one this node did not follow yet starts from the store's view."""
        fresh = stream_id not in self.hub.streams
        state = self.hub.state(stream_id, owner)
        if fresh:
            initial_state(state, doc, status=self.hub.broker.is_shared)
            if doc is not None:
                self.sequencer.follow(state, int(doc.get("lastSeq", 0)))
        return state

    # ------------------------------------------------------------------ producers
    async def register(self, peer: Peer, msg: Register) -> None:
        principal = self.authenticate(peer, msg.token)
        if peer.watching:
            raise InvalidMessage("a consuming connection cannot also register as producer",
                                 code="invalid-client-type")
        if peer.producing is not None and peer.producing != msg.stream_id:
            raise InvalidMessage("this connection already produces another stream", code="invalid-client-type")
        owner, doc = await self._lookup(msg.stream_id)
        check_produce(principal, msg.stream_id, owner)
        created = False
        if owner is None:
            doc = await self.store.create_stream(msg.stream_id, principal.sub, status=StreamStatus.ONLINE)
            assert doc is not None  # not exclusive: an existing stream is returned
            owner = str(doc["ownerId"])
            created = owner == principal.sub and doc["status"] == StreamStatus.ONLINE
            check_produce(principal, msg.stream_id, owner)  # another node may have created it first
        state = self._follow(msg.stream_id, owner, doc)
        previous = self.hub.set_producer(state, peer, wants_alerts="alert" in msg.consumes)
        self.hub.broker.claim_producer(msg.stream_id, peer.id)  # a producer of it on another node closes
        peer.client_type = "mobile"
        if previous is not None:
            close_replaced(previous)
        peer.send(registered_message(msg.stream_id, peer.id, msg.ref))
        self.hub.publish_status(state, StreamStatus.ONLINE, skip=peer)
        if not created:
            self._in_background(self.store.set_stream_status(msg.stream_id, StreamStatus.ONLINE), msg.stream_id)
        log.info("producer registered", extra={"conn": peer.id, "user": principal.sub, "stream": msg.stream_id})

    def frame(self, peer: Peer, msg: VideoFrame) -> None:
        """Commands a frame from the stream's producer (the session has already turned away unauthenticated peers)."""
        frame = msg.frame
        state = self.hub.streams.get(frame.stream_id)
        if state is None or state.producer is not peer:
            raise Forbidden(f"register as producer of {frame.stream_id} before sending frames",
                            code="not-producer")
        if state.status != StreamStatus.STREAMING:
            self.hub.publish_status(state, StreamStatus.STREAMING)
            self._in_background(self.store.set_stream_status(
                frame.stream_id, StreamStatus.STREAMING, frame_at=dt.datetime.now(dt.timezone.utc)), frame.stream_id)
        self.hub.publish_frame(state, frame)

    # ------------------------------------------------------------------ consumers
    async def subscribe(self, peer: Peer, msg: Subscribe) -> None:
        principal = self.authenticate(peer, msg.token)
        if peer.producing is not None:
            raise InvalidMessage("a producing connection cannot also subscribe", code="invalid-client-type")
        owner, doc = await self._lookup(msg.stream_id)
        check_watch(principal, msg.stream_id, owner)
        assert owner is not None
        state = self._follow(msg.stream_id, owner, doc)
        sub = Subscription(msg.client_type, "video-frame" in msg.consumes, "alert" in msg.consumes, msg.binary)
        peer.client_type = msg.client_type
        replay = msg.since_seq is not None and sub.alerts
        self.hub.add_watcher(state, peer, sub, live_alerts=not replay)
        if replay:
            self.sequencer.hold(state, peer)
        history, reset = None, False
        if replay:
            history = await self._history(msg.stream_id)
            reset = _from_another_history(msg, history)
        await self.hub.broker.ready(msg.stream_id)  # with several nodes: until Redis confirms the subscription
        epoch = state.epoch if state.epoch is not None else (history or {}).get("epoch")
        # `reset` comes before the replay: the watcher starts its list again
        peer.send(subscribed_message(msg.stream_id, peer.id, state.status, binary=msg.binary, epoch=epoch,
                                     last_seq=self.sequencer.delivered(state), reset=reset, ref=msg.ref))
        if replay:
            assert msg.since_seq is not None
            # not awaited: the subscriber's reads (pongs included) must go on during a long replay
            self._in_background(self.sequencer.replay(peer, state, 0 if reset else msg.since_seq, history, reset),
                                msg.stream_id, peer, "alert replay")
        log.info("consumer subscribed", extra={"conn": peer.id, "user": principal.sub, "stream": msg.stream_id})

    async def _history(self, stream_id: str) -> dict[str, Any] | None:
        """The stream's history as stored now (epoch, lastSeq, prunedSeq); None when the store cannot say."""
        try:
            return await self.store.get_stream(stream_id)
        except StoreUnavailable:
            return None  # the replay's reads will fail and say so

    def unsubscribe(self, peer: Peer, msg: Unsubscribe) -> None:
        state = self.hub.streams.get(msg.stream_id)
        if state is None or msg.stream_id not in peer.watching:
            raise NotFound(f"not subscribed to {msg.stream_id}", code="not-subscribed")
        self.hub.remove_watcher(state, peer)
        peer.send(unsubscribed_message(msg.stream_id, msg.ref))

    def alert(self, peer: Peer, msg: Alert) -> Coroutine[Any, Any, None] | None:
        """Check the sender may alert on the stream and hand the alert to the intake.

        Returns a coroutine only when the stream must first be read from the store; the common case
        (a live stream) finishes here, so the sender's read loop never waits for the database.
        """
        principal = self.authenticate(peer, None)
        state = self.hub.streams.get(msg.stream_id)
        if state is None:
            return self._alert_unknown_stream(peer, principal, msg)
        self._submit_alert(peer, principal, state, msg)
        return None

    async def _alert_unknown_stream(self, peer: Peer, principal: Principal, msg: Alert) -> None:
        owner, doc = await self._lookup(msg.stream_id)
        # nobody watches it on this node: a detached state stores the alert and fans out to no one
        state = self.hub.streams.get(msg.stream_id)
        if state is None and owner is not None:
            state = StreamState(msg.stream_id, owner)
            initial_state(state, doc, status=False)  # its history's epoch: the intake's id memory needs it
        self._submit_alert(peer, principal, state, msg)

    def _submit_alert(self, peer: Peer, principal: Principal, state: StreamState | None, msg: Alert) -> None:
        if state is None or not can_watch(principal, msg.stream_id, state.owner_id):
            raise NotFound(f"stream {msg.stream_id} not found", code="not-found")
        self.intake.submit(peer, state, msg, principal.sub)

    def close_stream(self, stream_id: str, code: int, reason: str) -> None:
        """Close every connection of a stream (its producer and watchers) on every node, e.g. when it is deleted."""
        self.hub.broker.close_stream(stream_id, code, reason)
        self.sink.on_close(stream_id, code, reason)

    def release_producer(self, state: StreamState) -> Peer | None:
        """Detach the stream's producer (it stopped answering) and say `status: offline` on every node."""
        peer = self.hub.release_producer(state)
        if peer is not None:
            self.hub.broker.release_producer(state.stream_id, peer.id)
        return peer

    # ------------------------------------------------------------------ lifecycle
    def disconnect(self, peer: Peer) -> None:
        orphaned = self.hub.remove_peer(peer)
        if orphaned is not None:
            self.hub.broker.release_producer(orphaned.stream_id, peer.id)
            self.hub.publish_status(orphaned, StreamStatus.OFFLINE)
            self._in_background(self.store.set_stream_status(orphaned.stream_id, StreamStatus.OFFLINE),
                                orphaned.stream_id)

    def _in_background(self, work: Coroutine[Any, Any, None], stream_id: str, peer: Peer | None = None,
                       what: str = "stream status update") -> None:
        """Run work without awaiting it; a failure is logged as `what failed`, with the stream (and peer)."""
        context = {"stream": stream_id}
        if peer is not None:
            context["conn"] = peer.id
            if peer.principal is not None:
                context["user"] = peer.principal.sub
        task = asyncio.create_task(_logged(work, what, context))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def is_idle(self) -> bool:
        """No alert write, fill or background store call is pending."""
        return self.intake.is_idle and not self._background

    async def drain(self) -> None:
        """Finish pending alert writes and status updates (graceful shutdown)."""
        await self.intake.drain()
        await self.sequencer.drain()
        await self.sink.drain()
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


async def _logged(work: Coroutine[Any, Any, None], what: str, context: dict[str, str]) -> None:
    try:
        await work
    except StoreUnavailable as exc:
        log.error("%s failed: %s", what, exc.message, extra=context)
    except Exception:
        log.exception("%s failed", what, extra=context)


def _from_another_history(msg: Subscribe, history: dict[str, Any] | None) -> bool:
    """Whether a subscriber's (epoch, sinceSeq) is a position in a history other than the stored one: another
    epoch (the stream was created again, or the database is new), or a seq the history never reached (a
    restored backup). Without an epoch the subscriber cannot say: its sinceSeq is taken as it is."""
    if msg.epoch is None or msg.since_seq is None or history is None:
        return False
    return msg.epoch != history.get("epoch") or msg.since_seq > int(history.get("lastSeq", 0))
