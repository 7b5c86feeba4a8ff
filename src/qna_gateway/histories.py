"""The histories this process expects its chats' next asks to read, so an ask can call the LLM
before the database has answered (an early start; see `TurnManager.start_turn`).

A guess only: the ask's statement still reads the history, and a guess that differs from it
is thrown away with the call it started. So an entry must never be trusted for anything but
that head start, and a wrong one costs one abandoned LLM request, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

# (role, content) pairs, oldest first: what `store.insert_exchange` returns as the history.
History = tuple[tuple[str, str], ...]

MAX_CHATS = 10_000
MAX_CHARS = 16_000_000  # all entries together; about 16-64 MB of text at most


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: str
    history: History
    chars: int
    # The answer whose end made this entry: its own end notice must not drop it.
    answer_id: UUID | None


class KnownHistories:
    """Least recently used first out, bounded in chats and in characters."""

    def __init__(
        self, *, budget_chars: int, max_chats: int = MAX_CHATS, max_chars: int = MAX_CHARS
    ) -> None:
        self._budget = budget_chars
        self._max_chats = max_chats
        self._max_chars = max_chars
        self._entries: OrderedDict[UUID, _Entry] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, chat_id: object) -> bool:
        return chat_id in self._entries

    def created(self, principal: str, chat_id: UUID) -> None:
        """A chat this process just created: its first ask reads an empty history."""
        self._put(chat_id, _Entry(principal, (), 0, None))

    def take(self, principal: str, chat_id: UUID) -> History | None:
        """The guess for an ask on `chat_id`, removed: one guess per ask. The entry comes back
        when the answer ends (`answered`), so a second ask while one runs (a 409) starts no
        LLM call, and a failed ask leaves the chat to the next ask's statement."""
        entry = self._entries.get(chat_id)
        if entry is None or entry.principal != principal:
            return None
        self._drop(chat_id)
        return entry.history

    def answered(
        self,
        principal: str,
        chat_id: UUID,
        *,
        history: Sequence[tuple[str, str]],
        question: str,
        answer: str,
        answer_id: UUID,
    ) -> None:
        """An exchange ended and was stored: the history read for it, its question and the
        answer as stored make the next one, cut to the budget as the statement cuts it (the
        newest messages whose lengths add up to at most the budget; empty ones left out)."""
        lines = [*history, ("user", question)]
        if answer:
            lines.append(("assistant", answer))
        kept: list[tuple[str, str]] = []
        used = 0
        for role, content in reversed(lines):
            if used + len(content) > self._budget:
                break
            used += len(content)
            if content:
                kept.append((role, content))
        kept.reverse()
        self._put(chat_id, _Entry(principal, tuple(kept), used, answer_id))

    def ended_elsewhere(self, chat_id: UUID, answer_id: UUID) -> None:
        """An answer on `chat_id` ended somewhere: unless it is the one this entry was made
        from, another process added to the chat and the entry is stale."""
        entry = self._entries.get(chat_id)
        if entry is not None and entry.answer_id != answer_id:
            self._drop(chat_id)

    def forget(self, chat_id: UUID) -> None:
        self._drop(chat_id)

    def clear(self) -> None:
        self._entries.clear()
        self._chars = 0

    def _put(self, chat_id: UUID, entry: _Entry) -> None:
        self._drop(chat_id)
        self._entries[chat_id] = entry
        self._chars += entry.chars
        while self._entries and (
            len(self._entries) > self._max_chats or self._chars > self._max_chars
        ):
            _, oldest = self._entries.popitem(last=False)
            self._chars -= oldest.chars

    def _drop(self, chat_id: UUID) -> None:
        entry = self._entries.pop(chat_id, None)
        if entry is not None:
            self._chars -= entry.chars
