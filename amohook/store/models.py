"""Tables. Times are Unix seconds (float) so every backend stores and compares them alike."""

from __future__ import annotations

import time

from peewee import (
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DatabaseProxy,
    DoubleField,
    IntegerField,
    Model,
    TextField,
)

database = DatabaseProxy()


class LongTextField(TextField):
    """Up to the 1 MiB webhook body: MySQL's TEXT stops at 64 KiB, so it maps to LONGTEXT there."""

    field_type = "LONGTEXT"


def now() -> float:
    return time.time()


class BaseModel(Model):
    """Tables without a key of their own declare ``id = AutoField()``: the column peewee would add
    unasked, written out so that type checkers know ``.id``."""

    class Meta:
        database = database
        legacy_table_names = False


class HoldsSecrets:
    """A row whose secrets the process holds from the moment it has them (``amohook.redact``):
    read or made, they are cut from every log line — peewee's own, when the row is written back."""

    lasting_secrets: tuple[str, ...] = ()  # kept for the life of the process
    passing_secrets: tuple[str, ...] = ()  # rotate (tokens): the newest are kept

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from amohook.redact import hold_secret

        data = self.__data__  # type: ignore[attr-defined]
        hold_secret(*(data.get(name) for name in self.lasting_secrets))
        hold_secret(*(data.get(name) for name in self.passing_secrets), lasting=False)


class SchemaVersion(BaseModel):
    version = IntegerField(primary_key=True)
    applied_at = DoubleField(default=now)


class Account(HoldsSecrets, BaseModel):
    """One connected amoCRM account and its OAuth grant. Tokens are TEXT: they exceed 255 chars."""

    lasting_secrets = ("client_secret",)
    passing_secrets = ("access_token", "refresh_token")

    id = AutoField()
    subdomain = CharField(max_length=190, unique=True)
    base_url = CharField(max_length=255)
    client_id = CharField(max_length=255, null=True)
    client_secret = TextField(null=True)
    redirect_uri = TextField(null=True)
    access_token = TextField(null=True)
    refresh_token = TextField(null=True)
    expires_at = DoubleField(null=True)
    issued_at = DoubleField(null=True)  # when the current pair was issued (refresh token age)
    long_lived = BooleanField(default=False)
    amo_account_id = BigIntegerField(null=True)
    timezone = CharField(max_length=64, null=True)
    last_refresh_error = TextField(null=True)
    # When a refresh was sent and its answer not yet stored: set before the token request, cleared
    # with the new pair or a definite refusal. Left set, it means the answer was lost (timeout,
    # kill -9) and the old refresh token may be spent; `status` says so.
    refresh_sent_at = DoubleField(null=True)
    # This host's clock minus amoCRM's at the last token answer (seconds), for `status`'s warning.
    clock_skew = DoubleField(null=True)
    created_at = DoubleField(default=now)
    updated_at = DoubleField(default=now)


class Lease(BaseModel):
    """A named lock with an expiry, claimed by one atomic UPDATE; a dead holder's lease just runs out."""

    name = CharField(max_length=190, primary_key=True)
    owner = CharField(max_length=190, null=True)
    expires_at = DoubleField(default=0)


class OAuthState(HoldsSecrets, BaseModel):
    """An authorization started by `auth-url`, waiting for amoCRM's redirect with this state."""

    lasting_secrets = ("client_secret",)
    passing_secrets = ("state",)

    state = CharField(max_length=64, primary_key=True)
    client_id = CharField(max_length=255)
    client_secret = TextField()
    redirect_uri = TextField()
    base_url = CharField(max_length=255, null=True)  # explicit override (proxies, tests)
    domain = CharField(max_length=32, null=True)
    created_at = DoubleField(default=now)
    used_at = DoubleField(null=True)

    class Meta:
        table_name = "oauth_state"


class RateWindow(BaseModel):
    """Grant times of the last requests to one account, shared by every process (7 per second)."""

    key = CharField(max_length=190, primary_key=True)
    grants = TextField(default="[]")  # JSON list of Unix times, oldest first


class Pipeline(BaseModel):
    id = AutoField()
    account = CharField(max_length=190)
    amo_id = BigIntegerField()
    name = CharField(max_length=255)
    sort = IntegerField(default=0)
    is_main = BooleanField(default=False)
    is_archive = BooleanField(default=False)

    class Meta:
        indexes = ((("account", "amo_id"), True),)


class Stage(BaseModel):
    """A pipeline status. Keyed by pipeline *and* status id: 142/143 exist in every pipeline."""

    id = AutoField()
    account = CharField(max_length=190)
    pipeline_id = BigIntegerField()
    amo_id = BigIntegerField()
    name = CharField(max_length=255)
    sort = IntegerField(default=0)
    type = IntegerField(default=0)
    color = CharField(max_length=32, null=True)

    class Meta:
        indexes = ((("account", "pipeline_id", "amo_id"), True),)


class TaskType(BaseModel):
    id = AutoField()
    account = CharField(max_length=190)
    amo_id = BigIntegerField()
    name = CharField(max_length=255)
    code = CharField(max_length=64, null=True)
    color = CharField(max_length=32, null=True)

    class Meta:
        indexes = ((("account", "amo_id"), True),)


class User(BaseModel):
    id = AutoField()
    account = CharField(max_length=190)
    amo_id = BigIntegerField()
    name = CharField(max_length=255)
    email = CharField(max_length=255, null=True)
    is_admin = BooleanField(default=False)
    is_active = BooleanField(default=True)

    class Meta:
        indexes = ((("account", "amo_id"), True),)


class CustomField(BaseModel):
    id = AutoField()
    account = CharField(max_length=190)
    entity_type = CharField(max_length=32, default="leads")
    amo_id = BigIntegerField()
    name = CharField(max_length=255)
    code = CharField(max_length=64, null=True)
    type = CharField(max_length=64, null=True)
    sort = IntegerField(default=0)
    # JSON [{"id": …, "value": "…"}, …]: the options of a select, radiobutton or multiselect field
    # as amoCRM lists them (`enums`), so `rules check` can refuse a value amoCRM would refuse.
    # None: the field has none, or they were not synced (a store from before schema version 6).
    enums = LongTextField(null=True)

    class Meta:
        indexes = ((("account", "entity_type", "amo_id"), True),)


class Delivery(BaseModel):
    """One webhook body as received; the same body again (amoCRM retries) is the same delivery."""

    id = AutoField()
    body_sha256 = CharField(max_length=64, unique=True)
    body = LongTextField()
    content_type = CharField(max_length=255, null=True)
    headers = TextField(default="{}")  # JSON of the useful headers
    remote_addr = CharField(max_length=64, null=True)
    received_at = DoubleField(default=now)
    times_received = IntegerField(default=1)


class Event(BaseModel):
    """One entity item of a delivery, queued for the worker."""

    id = AutoField()
    delivery_id = BigIntegerField(index=True)
    idx = IntegerField()
    entity = CharField(max_length=64, index=True)
    action = CharField(max_length=64)
    entity_id = CharField(max_length=64, null=True)
    account = CharField(max_length=190, null=True)  # subdomain as sent
    account_id = CharField(max_length=32, null=True)
    data = LongTextField(default="{}")
    status = CharField(max_length=16, default="pending")  # pending, running, done, dead
    attempts = IntegerField(default=0)
    next_attempt_at = DoubleField(default=0)
    lease_owner = CharField(max_length=190, null=True)
    lease_until = DoubleField(null=True)
    last_error = TextField(null=True)
    received_at = DoubleField(default=now)
    updated_at = DoubleField(default=now)
    # None: a webhook; "events_log": recovered from amoCRM's events log by reconciliation.
    source = CharField(max_length=16, null=True)

    class Meta:
        indexes = (
            (("delivery_id", "idx"), True),
            (("status", "next_attempt_at"), False),
            (("status", "updated_at"), False),  # retention: the oldest finished events first
        )


class Attempt(BaseModel):
    id = AutoField()
    event_id = BigIntegerField(index=True)
    worker = CharField(max_length=190)
    started_at = DoubleField(default=now)
    finished_at = DoubleField(null=True)
    outcome = CharField(max_length=16)  # ok, retry, dead, released
    error = TextField(null=True)


class Action(BaseModel):
    """An effect a rule asked for, keyed deterministically so it happens once (see rules/actions)."""

    id = AutoField()
    key = CharField(max_length=190, unique=True)
    account = CharField(max_length=190)
    rule = CharField(max_length=255)
    event_id = BigIntegerField(null=True)
    kind = CharField(max_length=32)  # an action kind: amohook.actions.kinds()
    payload = TextField(default="{}")
    # pending, sending, done, failed (gave up), rejected (refused by amoCRM), skipped (on purpose)
    status = CharField(max_length=16, default="pending", index=True)
    result_id = BigIntegerField(null=True)  # what it created (task, note), or the lead it changes
    attempts = IntegerField(default=0)
    lease_owner = CharField(max_length=190, null=True)
    lease_until = DoubleField(null=True)
    last_error = TextField(null=True)
    created_at = DoubleField(default=now)
    updated_at = DoubleField(default=now)

    class Meta:
        # retention: finished actions by age; whether an event still has a failed action
        indexes = ((("status", "updated_at"), False), (("event_id",), False))


class ChangeSeen(BaseModel):
    """One lead change as amohook first saw it, whichever way it came (see ``amohook.recovery.identity``).

    A change may arrive as a timed webhook (``hook_at`` = its last_modified), as a webhook without
    a time (Digital Pipeline; ``untimed_at`` = when it was received) and as an events-log entry
    (``log_at`` = its created_at). Sightings of one change from different sources are joined within
    a tolerance; ``key_at`` is the time of the first sighting and names the change in action keys.
    """

    id = AutoField()
    account = CharField(max_length=190)
    lead_id = BigIntegerField()
    kind = CharField(max_length=32)  # stage_changed, added, responsible_changed
    target = CharField(max_length=64)  # "pipeline:status", "resp:user" or "added"
    origin = CharField(max_length=64, null=True)  # the stage or user it left, when known
    key_at = BigIntegerField()
    hook_at = BigIntegerField(null=True)
    untimed_at = BigIntegerField(null=True)
    log_at = BigIntegerField(null=True)
    first_source = CharField(max_length=16)  # webhook, untimed, events_log
    created_at = DoubleField(default=now)

    class Meta:
        table_name = "change_seen"
        indexes = (
            (("account", "lead_id", "kind"), False),
            (("first_source", "created_at"), False),
            (("created_at",), False),  # retention
        )


class ReconcileState(BaseModel):
    """Per account: how far the events log has been read, and what the watchdog last found."""

    account = CharField(max_length=190, primary_key=True)
    cursor = BigIntegerField(null=True)  # events up to this amoCRM time are queued or known
    last_pass_at = DoubleField(null=True)
    last_pass_summary = TextField(null=True)  # JSON of the last pass's figures
    last_error = TextField(null=True)
    subscription_state = CharField(max_length=16, default="unknown")  # ok, re-enabled, missing, disabled, unknown
    subscription_checked_at = DoubleField(null=True)
    subscription_note = TextField(null=True)
    reenabled_count = IntegerField(default=0)

    class Meta:
        table_name = "reconcile_state"


class Subscription(BaseModel):
    """A webhook destination amohook subscribed, stored byte for byte (amoCRM matches it exactly)."""

    id = AutoField()
    account = CharField(max_length=190)
    destination = TextField()
    destination_sha256 = CharField(max_length=64)
    events = TextField(default="[]")  # JSON list of amoCRM event codes
    created_at = DoubleField(default=now)
    updated_at = DoubleField(default=now)
    # Set (before the DELETE is sent) while amohook itself has removed the destination to switch it
    # back on, cleared once it is seen again: the watchdog re-adds it instead of calling it missing.
    removed_at = DoubleField(null=True)

    class Meta:
        indexes = ((("account", "destination_sha256"), True),)


class StoreSetting(BaseModel):
    """A value the store itself must keep (it moves with the store): the webhook secret `serve`
    made up when none was configured, so the URL given to amoCRM can always be printed again."""

    name = CharField(max_length=190, primary_key=True)
    value = TextField()
    created_at = DoubleField(default=now)

    class Meta:
        table_name = "store_setting"


class StaleEntry(BaseModel):
    """When a lead entered the stage a lead.stale rule watches, as the stale check settled it.

    Kept once chosen, so one stay keeps one identity (its ``entered_at``) however the check learns
    it later: from the change registry, the events log, or the lead's creation (``how``). Rows of
    leads no longer in the stage are removed by the check (``amohook.rules.stale``).
    """

    id = AutoField()
    account = CharField(max_length=190)
    lead_id = BigIntegerField()
    pipeline_id = BigIntegerField()
    status_id = BigIntegerField()
    entered_at = BigIntegerField()  # amoCRM's time
    how = CharField(max_length=16)  # registry, events_log, created
    seen_at = DoubleField(default=now)

    class Meta:
        table_name = "stale_entry"
        indexes = ((("account", "pipeline_id", "status_id", "lead_id"), True),)


ALL_MODELS = [
    SchemaVersion,
    Account,
    Lease,
    OAuthState,
    RateWindow,
    Pipeline,
    Stage,
    TaskType,
    User,
    CustomField,
    Delivery,
    Event,
    Attempt,
    Action,
    ChangeSeen,
    ReconcileState,
    Subscription,
    StoreSetting,
    StaleEntry,
]
