"""The contract every action kind honours, run for each kind ``amohook.actions.kinds()`` lists.

(a) A lost answer is recognised: amoCRM (for notify, the receiver) carried the effect out and
    the answer never came; the retry recognises it and the effect is not repeated.
(b) A crash between sending and recording does not repeat the effect: the sender dies after the
    answer came and before any outcome is written; a fresh sender, once the lease has run out,
    recognises what was done.
(c) A 400 naming some items of a batch fails only those items: they are ``rejected``, the rest
    are carried out once.

Each kind has a ``Contract`` here (how to plan a good and a bad action, how to lose an answer,
how many times the effect happened); a kind without one fails the suite. Notify has nothing to
look up: it recognises by sending again under the same ``Idempotency-Key``, so its effect is
counted as the receiver that honours the key sees it (one message per key), and its batch is
one message (a refused message fails only itself).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest

from amohook.actions import ActionSender, kinds, record_planned
from amohook.actions.base import PlannedAction
from amohook.amocrm.client import client_for
from amohook.settings import LEASE_SECONDS
from amohook.store.models import Action
from tests.conftest import ROOT, cli_env
from tests.helpers.actions import (
    CRASHING_SENDER,
    Clock,
    Receiver,
    make_sales,
    move,
    notify,
    planned,
    planned_note,
    set_field,
)

N = 3  # actions per trial: one batch for the kinds that batch


class Contract:
    """How the suite drives one kind; ``setup`` runs first, against a fresh fake and receiver."""

    kind = ""
    path = ""  # where amoCRM takes the effect
    method = ""
    by_key = False  # recognised by sending again under the same key (nothing to look up)

    def setup(self, fake, receiver: Receiver) -> None:
        self.fake, self.receiver, self.sales = fake, receiver, make_sales(fake)

    def action(self, i: int, *, bad: bool = False) -> PlannedAction:
        """The i-th action (0 ≤ i < N) on its own lead; ``bad``: one amoCRM refuses with a 400."""
        raise NotImplementedError

    def lose_answer(self) -> None:
        """The next request (notify: each message's first) is carried out, and its connection
        dropped before the answer."""
        self.fake.fail(self.path, drop=True, after_effect=True, method=self.method)

    def hang(self) -> None:
        """Requests are carried out and never answered (the sender waits until it is killed)."""
        self.fake.fail(self.path, hang=True, after_effect=True, method=self.method, times=None)

    def answer_again(self) -> None:
        self.fake.clear_faults()

    def effects(self) -> int:
        """How many times the effect happened, as a person looking at amoCRM would count."""
        raise NotImplementedError

    def requests(self) -> int:
        return len(self.fake.requests_to(self.path, self.method))


class TaskContract(Contract):
    kind, path, method = "create_task", "/api/v4/tasks", "POST"

    def action(self, i, *, bad=False):
        return planned(self.sales["leads"][i], task_type=987654 if bad else 1)

    def effects(self):
        return len(self.fake.tasks)


class NoteContract(Contract):
    kind, path, method = "add_note", "/api/v4/leads/notes", "POST"

    def action(self, i, *, bad=False):
        p = planned_note(self.sales["leads"][i])
        return dataclasses.replace(p, payload={**p.payload, "note_type": "no_such_type"}) if bad else p

    def effects(self):
        return len(self.fake.notes)


class MoveContract(Contract):
    kind, path, method = "move_lead", "/api/v4/leads", "PATCH"

    def action(self, i, *, bad=False):
        p = move(self.sales, self.sales["leads"][i])
        if bad:  # the unsorted stage: amoCRM refuses it (NotSupportedChoice)
            p = dataclasses.replace(p, payload={**p.payload, "patch": {**p.payload["patch"], "status_id": 1}})
        return p

    def effects(self):
        return sum(1 for what, _ in self.fake.patched_hooks if what == "status")


class FieldContract(Contract):
    kind, path, method = "set_field", "/api/v4/leads", "PATCH"

    def setup(self, fake, receiver):
        super().setup(fake, receiver)
        self.field = fake.add_custom_field("Source", "select", enums=["Phone", "Website"])["id"]

    def action(self, i, *, bad=False):
        return set_field(self.sales["leads"][i], field_id=self.field, value="Fax" if bad else "Phone", tag="called")

    def effects(self):
        return sum(1 for what, _ in self.fake.patched_hooks if what == "update")


class NotifyContract(Contract):
    kind = "notify"
    by_key = True

    def action(self, i, *, bad=False):
        text = f"Won: lead {i}" + (" (refused)" if bad else "")
        if bad:
            self.receiver.refuse.add(text)
        return notify(self.sales["leads"][i], text=text)

    def lose_answer(self):
        self.receiver.lose_first = True  # each message's first answer (a receiver then rests a while)

    def hang(self):
        self.receiver.hang_first = True

    def answer_again(self):
        self.receiver.hang_first = False

    def effects(self):
        return len(self.receiver.messages)  # one per Idempotency-Key: the receiver honours it

    def requests(self):
        return len(self.receiver.keys)


CONTRACTS: dict[str, type[Contract]] = {
    c.kind: c for c in (TaskContract, NoteContract, MoveContract, FieldContract, NotifyContract)
}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(params=sorted(kinds()))
def contract(request, fake, account, receiver) -> Contract:
    """Every registered kind's contract; a kind added without one fails here."""
    cls = CONTRACTS.get(request.param)
    if cls is None:
        pytest.fail(f"action kind {request.param!r} has no Contract in tests/actions/test_action_contract.py")
    c = cls()
    c.setup(fake, receiver)
    return c


def new_sender(store, contract: Contract, clock=None, cls=ActionSender) -> ActionSender:
    return cls(
        store,
        lambda sub: client_for(store, sub, sleep=lambda s: None, max_attempts=1),
        env={"CHAT_URL": contract.receiver.url},
        **({"clock": clock} if clock else {}),
    )


def statuses() -> list[str]:
    return [a.status for a in Action.select().order_by(Action.id)]


def test_every_contract_is_of_a_registered_kind():
    assert set(CONTRACTS) == set(kinds())


def test_a_lost_answer_is_recognised_and_not_repeated(store, contract):
    clock = Clock()
    record_planned(store, [contract.action(i) for i in range(N)], event_id=1)
    contract.lose_answer()
    s = new_sender(store, contract, clock)
    s.drain()
    assert contract.effects() >= 1  # carried out; we never heard
    assert "done" not in statuses()  # may have happened: recognised before anything is sent again
    for _ in range(2 * N):  # notify: one message per round (a receiver that gave no answer rests)
        clock.advance(3600 * 2)
        s.drain()
    assert statuses() == ["done"] * N
    assert contract.effects() == N
    if contract.by_key:  # each sent again under the key it had: the receiver sees N messages
        assert contract.requests() == 2 * N and len(set(contract.receiver.keys)) == N
    else:
        assert contract.requests() == 1 and s.stats.adopted == N


class Crash(BaseException):
    """The process dies: nothing after this point runs, no outcome is written."""


class CrashingSender(ActionSender):
    """Dies when it would record the first outcome: after the request, before the record."""

    def done(self, *args, **kw):
        raise Crash

    def fail(self, *args, **kw):
        raise Crash

    def later(self, *args, **kw):
        raise Crash


def test_a_crash_between_send_and_record_does_not_repeat_the_effect(store, contract):
    clock = Clock()
    record_planned(store, [contract.action(i) for i in range(N)], event_id=1)
    with pytest.raises(Crash):
        new_sender(store, contract, clock, cls=CrashingSender).drain()
    carried_out = contract.effects()
    assert carried_out == (1 if contract.by_key else N)  # notify: one message per batch
    assert "done" not in statuses()
    clock.advance(LEASE_SECONDS + 1)  # the dead sender's lease runs out
    fresh = new_sender(store, contract, clock)
    fresh.drain()
    assert statuses() == ["done"] * N
    assert contract.effects() == N
    if contract.by_key:
        assert contract.requests() == N + 1 and len(set(contract.receiver.keys)) == N
    else:
        assert contract.requests() == 1 and fresh.stats.adopted == N


def test_a_400_naming_some_items_fails_only_those(store, contract):
    good = [contract.action(0), contract.action(2)]
    bad = contract.action(1, bad=True)
    record_planned(store, [good[0], bad, good[1]], event_id=1)
    new_sender(store, contract).drain()  # the real clock: a batch's rest is sent again at once
    assert statuses() == ["done", "rejected", "done"]
    rejected = Action.get(Action.key == bad.key)
    assert rejected.last_error  # says what amoCRM refused
    assert contract.effects() == 2


@pytest.mark.slow
def test_a_sender_killed_between_send_and_record_does_not_repeat_the_effect(store, contract):
    """As above, with a real process killed while it waits for the answer."""
    record_planned(store, [contract.action(i) for i in range(N)], event_id=1)
    contract.hang()
    env = cli_env(store.url, CHAT_URL=contract.receiver.url)
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SENDER, store.url], env=env, cwd=str(ROOT))
    try:
        deadline = time.time() + 30
        while contract.effects() < 1 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # what else it would do, it does now: it is still waiting for its answer
    finally:
        proc.kill()
        proc.wait()
    carried_out = contract.effects()
    assert carried_out == (1 if contract.by_key else N)
    assert "done" not in statuses()
    contract.answer_again()
    clock = Clock()
    clock.advance(LEASE_SECONDS + 1)  # the dead sender's lease runs out
    fresh = new_sender(store, contract, clock)
    fresh.drain()
    assert statuses() == ["done"] * N
    assert contract.effects() == N
    if contract.by_key:
        assert contract.requests() == N + 1 and len(set(contract.receiver.keys)) == N
    else:
        assert contract.requests() == 1 and fresh.stats.adopted == N
