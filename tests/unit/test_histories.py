"""KnownHistories: one guess per ask, stale entries dropped, memory bounded."""

from __future__ import annotations

from uuid import UUID, uuid4

from qna_gateway.histories import KnownHistories


def answered(histories: KnownHistories, chat: UUID, answer: str, answer_id: UUID) -> None:
    histories.answered("alice", chat, history=[], question="Q?", answer=answer, answer_id=answer_id)


def test_a_guess_is_taken_once_and_only_by_the_chats_principal() -> None:
    histories = KnownHistories(budget_chars=100)
    chat = uuid4()
    histories.created("alice", chat)
    assert histories.take("bob", chat) is None
    assert histories.take("alice", chat) == ()
    assert histories.take("alice", chat) is None  # until the answer ends
    answered(histories, chat, "A.", uuid4())
    assert histories.take("alice", chat) == (("user", "Q?"), ("assistant", "A."))


def test_an_end_elsewhere_drops_the_entry_but_its_own_end_does_not() -> None:
    histories = KnownHistories(budget_chars=100)
    chat, own = uuid4(), uuid4()
    answered(histories, chat, "A.", own)
    histories.ended_elsewhere(chat, own)
    assert chat in histories
    histories.ended_elsewhere(chat, uuid4())
    assert chat not in histories


def test_bounded_in_chats_least_recently_written_out_first() -> None:
    histories = KnownHistories(budget_chars=100, max_chats=2)
    first, second, third = uuid4(), uuid4(), uuid4()
    for chat in (first, second, third):
        histories.created("alice", chat)
    assert first not in histories
    assert second in histories
    assert third in histories


def test_bounded_in_characters() -> None:
    histories = KnownHistories(budget_chars=100, max_chars=10)
    first, second = uuid4(), uuid4()
    answered(histories, first, "1234", uuid4())  # "Q?" + 4 = 6 characters
    answered(histories, second, "1234", uuid4())  # 12 in all: the first goes
    assert first not in histories
    assert second in histories
    histories.forget(second)
    answered(histories, first, "1234", uuid4())
    assert first in histories  # the count went down with what was dropped
