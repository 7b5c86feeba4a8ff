"""The app's turns: starting them from an ask, cancelling them anywhere, draining them at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from uuid import UUID, uuid4

import psutil

from .answers import Answerer, ChatLine, EarlyCall
from .errors import Conflict, Unavailable
from .events import Ended, Reconnect, Resync, cancel_notice, end_notice
from .histories import History, KnownHistories
from .limits import Slots, TokenBudget
from .pubsub import EventHub
from .schemas import Message
from .settings import Settings
from .store import messages as store
from .store.pool import DB_ERRORS, Pool
from .tasks import cancel_and_wait
from .telemetry import Telemetry
from .text_writer import TextWriter
from .turns import Turn, TurnConfig

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
# A process whose heartbeat is older than this is dead; its streaming answers are ended.
INSTANCE_TTL_SECONDS = 20.0
CANCEL_WAIT_SECONDS = 5.0


class TurnManager:
    """Owns every turn running in this process, and this process's row in gateway_instances."""

    def __init__(
        self,
        *,
        settings: Settings,
        pool: Pool,
        answerer: Answerer,
        conninfo: str,
        telemetry: Telemetry,
    ) -> None:
        self.telemetry = telemetry
        self.instance_id = uuid4()
        self.settings = settings
        self.pool = pool
        self.answerer = answerer
        self.histories = (
            KnownHistories(budget_chars=settings.history_budget_chars)
            if settings.early_llm_start
            else None
        )
        self.hub = EventHub(
            conninfo,
            on_cancel=self._on_remote_cancel,
            on_end=self._on_end,
            on_chat_deleted=self.chat_deleted,
            on_missed=self._on_missed_notices,
        )
        self._turns: dict[UUID, Turn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self.writer = TextWriter(
            pool,
            interval=settings.batch_interval_ms / 1000,
            max_chars=settings.batch_max_chars,
            metrics=telemetry.metrics,
            tracer=telemetry.tracer,
        )
        self._config = TurnConfig(
            orphan_seconds=settings.orphan_seconds,
            log_content=settings.log_content,
        )
        self.draining = asyncio.Event()
        per_principal = settings.auth_enabled  # else everyone is one principal
        self.turn_slots = Slots(
            "answers running",
            settings.max_turns_per_principal if per_principal else settings.max_turns,
            settings.max_turns,
        )
        self.stream_slots = Slots(
            "streams",
            settings.max_streams_per_principal if per_principal else settings.max_streams,
            settings.max_streams,
        )
        self._releases: dict[UUID, Callable[[], None]] = {}
        self.tokens = TokenBudget(settings.token_limit_per_minute if per_principal else 0)
        self._principals: dict[UUID, str] = {}
        # Each running answer's history as read and its question, for the next guess.
        self._exchanges: dict[UUID, tuple[History, str]] = {}

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO gateway_instances (id, hostname, pid) VALUES (%s, %s, %s)",
                (self.instance_id, socket.gethostname(), os.getpid()),
            )
        await self.recover_abandoned()
        await self.hub.start()
        self.writer.start()
        self._heartbeat = asyncio.create_task(self._beat(), name="qna-heartbeat")

    async def stop(self) -> None:
        """After drain: stop writing and listening, forget this instance."""
        await self.writer.stop()
        await cancel_and_wait(self._heartbeat)
        await self.hub.stop()
        with contextlib.suppress(*DB_ERRORS):
            async with self.pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM gateway_instances WHERE id = %s", (self.instance_id,)
                )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(
                        "UPDATE gateway_instances SET heartbeat_at = now() WHERE id = %s",
                        (self.instance_id,),
                    )
                await self.recover_abandoned()
            except DB_ERRORS as exc:
                log.warning("heartbeat failed: %s", exc)

    async def recover_abandoned(self) -> int:
        """End `interrupted` (`crash`) the answers whose owning process is gone.

        Gone means a heartbeat older than INSTANCE_TTL_SECONDS, or, on this host, a process id
        that is no longer running (or is this process, which is new): a restart on the same
        machine or pod recovers at once instead of after the TTL.
        """
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, pid, extract(epoch FROM started_at) FROM gateway_instances"
                " WHERE hostname = %s AND id <> %s",
                (socket.gethostname(), self.instance_id),
            )
            dead = [row[0] for row in await cur.fetchall() if not _running(row[1], row[2])]
            await conn.execute(
                "DELETE FROM gateway_instances"
                " WHERE heartbeat_at < now() - make_interval(secs => %s) OR id = ANY(%s)",
                (INSTANCE_TTL_SECONDS * 3, dead),
            )
            cur = await conn.execute(
                "UPDATE messages SET status = 'interrupted', finish_reason = 'crash',"
                " error = 'The gateway process generating this answer stopped unexpectedly.',"
                " completed_at = now()"
                " WHERE status = 'streaming' AND (owner_id IS NULL OR owner_id NOT IN ("
                "   SELECT id FROM gateway_instances"
                "   WHERE heartbeat_at > now() - make_interval(secs => %s)))"
                " RETURNING id",
                (INSTANCE_TTL_SECONDS,),
            )
            recovered = [row[0] for row in await cur.fetchall()]
            for message_id in recovered:
                await store.notify(conn, payload=end_notice(message_id, "interrupted"))
        if recovered:
            log.warning("ended %d answers left behind by a stopped process", len(recovered))
        return len(recovered)

    # -- asking ------------------------------------------------------------------------------

    async def start_turn(
        self, *, principal: str, chat_id: UUID, content: str
    ) -> tuple[Message, Message, Turn]:
        if self.draining.is_set():
            raise Unavailable(
                "This gateway is shutting down; retry shortly.", headers={"Retry-After": "2"}
            )
        self.tokens.check(principal)
        release = self.turn_slots.acquire(principal)
        early = self._start_early(principal, chat_id, content)
        try:
            if early is not None:
                await asyncio.sleep(0)  # the call's task sends its request before the statement
            question, answer, history = await self._store_question(
                principal=principal, chat_id=chat_id, content=content
            )
        except BaseException:
            release()
            self._abandon(early)
            raise
        self._releases[answer.id] = release
        self._principals[answer.id] = principal
        self._exchanges[answer.id] = (tuple(history), question.content)
        if self.settings.log_content:
            log.info("question %s: %s", question.id, content, extra={"content": content})
        self.telemetry.metrics.messages.labels("user").inc()
        self.telemetry.metrics.messages.labels("assistant").inc()
        conversation = self._conversation(history, content)
        if early is not None and list(early.conversation) != conversation:
            self._abandon(early)
            early = None
        turn = Turn(
            message=answer,
            conversation=conversation,
            answerer=self.answerer,
            pool=self.pool,
            writer=self.writer,
            config=self._config,
            telemetry=self.telemetry,
            on_done=self._forget,
            early=early,
        )
        self._turns[answer.id] = turn
        task = asyncio.create_task(turn.run(), name=f"turn-{answer.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return question, answer, turn

    def _conversation(self, history: Sequence[tuple[str, str]], question: str) -> list[ChatLine]:
        conversation = [ChatLine("system", self.settings.system_prompt)]
        conversation += [
            ChatLine("assistant" if role == "assistant" else "user", text) for role, text in history
        ]
        conversation.append(ChatLine("user", question))
        return conversation

    def _start_early(self, principal: str, chat_id: UUID, question: str) -> EarlyCall | None:
        """The LLM call for the history this process expects, sent now: the ask's statement
        (a round trip, a lock, a commit: 1-3 ms) then runs while the LLM works, instead of
        before it. `start_turn` keeps it only if the history read is the one expected."""
        guess = self.histories.take(principal, chat_id) if self.histories is not None else None
        if guess is None:
            return None
        return self.answerer.start_early(self._conversation(guess, question))

    def _abandon(self, early: EarlyCall | None) -> None:
        if early is not None:
            early.abandon()

    def chat_created(self, principal: str, chat_id: UUID) -> None:
        if self.histories is not None:
            self.histories.created(principal, chat_id)

    def chat_deleted(self, chat_id: UUID) -> None:
        """Deleted here or, by its notice, elsewhere: its history must not go out again."""
        if self.histories is not None:
            self.histories.forget(chat_id)

    def _on_missed_notices(self) -> None:
        # The listener was away: a chat may have been deleted or answered elsewhere meanwhile.
        if self.histories is not None:
            self.histories.clear()

    def _on_end(self, chat_id: UUID, message_id: UUID) -> None:
        if self.histories is not None:
            self.histories.ended_elsewhere(chat_id, message_id)

    async def _store_question(
        self, *, principal: str, chat_id: UUID, content: str
    ) -> tuple[Message, Message, list[tuple[str, str]]]:
        async with self.pool.connection() as conn:
            return await store.insert_exchange(
                conn,
                principal=principal,
                chat_id=chat_id,
                content=content,
                model=self.answerer.model,
                owner_id=self.instance_id,
                history_chars=self.settings.history_budget_chars,
            )

    def local(self, message_id: UUID) -> Turn | None:
        return self._turns.get(message_id)

    def _forget(self, turn: Turn) -> None:
        self._turns.pop(turn.id, None)
        principal = self._principals.pop(turn.id, None)
        exchange = self._exchanges.pop(turn.id, None)
        if (
            self.histories is not None
            and principal is not None
            and exchange is not None
            and turn.final_stored
            and turn.final is not None
        ):
            history, question = exchange
            self.histories.answered(
                principal,
                turn.message.chat_id,
                history=history,
                question=question,
                answer=turn.final.content,
                answer_id=turn.id,
            )
        if principal is not None and turn.final is not None:
            usage = turn.final.usage
            # The model's count when it gives one, else about four characters a token.
            spent = usage.output_tokens if usage else len(turn.final.content) // 4
            self.tokens.spend(principal, spent)
        release = self._releases.pop(turn.id, None)
        if release is not None:
            release()

    @property
    def running(self) -> int:
        return len(self._turns)

    # -- cancelling --------------------------------------------------------------------------

    async def cancel(self, message: Message) -> Message:
        """Stop a running answer wherever it runs, and return it as ended."""
        if message.is_terminal:
            if message.status == "cancelled":
                return message
            raise Conflict(f"Message {message.id} already ended with status {message.status}.")
        turn = self._turns.get(message.id)
        if turn is not None:
            turn.stop("cancelled", "cancelled")
            await turn.done.wait()
            assert turn.final is not None
            return turn.final
        return await self._cancel_remote(message)

    async def _cancel_remote(self, message: Message) -> Message:
        queue = await self.hub.subscribe(message.id)
        try:
            async with self.pool.connection() as conn:
                await store.notify(conn, payload=cancel_notice(message.id))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                    while True:
                        event = await queue.get()
                        if isinstance(event, Resync | Ended):
                            async with self.pool.connection() as conn:
                                now = await store.read_message(conn, message_id=message.id)
                            if now is None or now.is_terminal:
                                break
        finally:
            self.hub.unsubscribe(message.id, queue)
        async with self.pool.connection() as conn:
            # The owner did not answer in time (or is gone): end it here; its own final write
            # will then find the message ended and leave it.
            ended = await store.finish_message(
                conn,
                message_id=message.id,
                text=(await store.read_message(conn, message_id=message.id) or message).content,
                status="cancelled",
                finish_reason="cancelled",
                error=None,
                usage=None,
                sources=None,
                notify=end_notice(message.id, "cancelled"),
            )
            final = ended or await store.read_message(conn, message_id=message.id)
        return final or message

    def _on_remote_cancel(self, message_id: UUID) -> None:
        turn = self._turns.get(message_id)
        if turn is not None:
            turn.stop("cancelled", "cancelled")

    # -- drain -------------------------------------------------------------------------------

    async def drain(self, seconds: float) -> None:
        """Refuse new asks, send remote watchers away, let local answers finish or cut them."""
        self.draining.set()
        self.hub.broadcast(Reconnect())
        turns = list(self._turns.values())
        if turns:
            log.info("draining: %d answers running, waiting up to %.0fs", len(turns), seconds)
            await asyncio.wait(
                [asyncio.ensure_future(t.done.wait()) for t in turns], timeout=seconds
            )
        for turn in list(self._turns.values()):
            turn.stop("interrupted", "shutdown")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._config.final_write_seconds)


def _running(pid: int, started_at: float) -> bool:
    """Whether the process that registered with this id (and start time) still runs here."""
    try:
        process = psutil.Process(pid)
        # A process id is reused (a restarted container's pid 1 is always 1): the process
        # must have been running before the row was written.
        return process.create_time() <= float(started_at) + 1
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # it exists, under another user
        return True
