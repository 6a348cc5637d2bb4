"""Admin pages of the sharded messages and the push jobs.

The messages of 128 shard tables are shown through one registered model,
``PushMessage``: each page reads one shard, chosen by the query string.

Invariants:
* the shard of a page is ``shard_of(uid)`` for ``?uid=`` (and only that user's
  rows are listed), ``?shard=`` as given, else shard 0; a ``?q=`` noce_ack
  search without either looks in every shard (in the uid's shard alone when the
  noce_ack is derived, ``<32 hex>-<uid>``);
* rows are read only through ``message_model(shard)``, so the router picks the
  database that holds the shard;
* ``uid`` and ``shard`` never reach the changelist's lookup validation but stay
  in its links, so filters, pages, searches and actions keep the chosen shard;
* the object id of a message is ``<shard>-<id>``: ids repeat across shards;
* a malformed ``uid`` or ``shard`` shows an error message and no rows, not a
  server error;
* every page is read-only; side effects are admin actions that call services,
  and only users with the model's change permission see them.

Guarded by tests/notifications/test_admin.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import quote
from django.contrib.admin.views.main import SEARCH_VAR, ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.urls import reverse
from django.utils.html import format_html

from connections.admin import ReadOnlyAdmin
from connections.protocol import NOTIFICATION_TYPES, MsgType
from pushsite.errors import BackendUnavailable

from . import services
from .models import JobState, PushJob, PushMessage, PushMessageBase
from .sharding import SHARD_COUNT, message_model, shard_alias, shard_of, shard_table

UID_PARAM = "uid"
SHARD_PARAM = "shard"
MAX_UID = 2**63 - 1  # the column is a signed BIGINT
OBJECT_ID = re.compile(r"([0-9]{1,3})-([0-9]{1,18})")
DERIVED_NOCE_ACK = re.compile(r"[0-9a-f]{32}-([0-9]{1,19})")
NOCE_ACK_MAX = PushMessageBase._meta.get_field("noce_ack").max_length


def msg_type_name(value: int) -> str:
    try:
        return MsgType(value).name
    except ValueError:
        return str(value)


def whole_number(raw: str) -> int | None:
    # str.isdigit alone would take "²" and other non-ASCII digits.
    return int(raw) if raw.isascii() and raw.isdigit() else None


def object_id_of(row: PushMessageBase) -> str:
    return f"{row.shard}-{row.pk}"


def noce_ack_locate(noce_ack: str) -> int | None:
    """The shard that holds a noce_ack, or None: one look-up on its unique index per shard tried."""
    if not noce_ack or len(noce_ack) > NOCE_ACK_MAX:
        return None
    derived = DERIVED_NOCE_ACK.fullmatch(noce_ack)
    # A derived noce_ack is stored in its uid's shard only (PushJob.noce_ack_for).
    candidates = [shard_of(int(derived[1]))] if derived else range(SHARD_COUNT)
    for shard in candidates:
        if message_model(shard).objects.filter(noce_ack=noce_ack).exists():
            return shard
    return None


@dataclass(frozen=True)
class Scope:
    """Which shard a message page reads, and why."""

    shard: int = 0
    uid: int | None = None
    error: str = ""
    note: str = ""


def scope_parse(params: Any) -> Scope:
    """The scope named by a query string; a malformed one carries an error."""
    uid_raw = params.get(UID_PARAM, "").strip()
    shard_raw = params.get(SHARD_PARAM, "").strip()
    if uid_raw:
        uid = whole_number(uid_raw)
        if uid is None or uid > MAX_UID:
            return Scope(error=f"uid must be a whole number from 0 to {MAX_UID}, not “{uid_raw}”.")
        shard = shard_of(uid)
        if shard_raw and shard_raw != str(shard):
            return Scope(error=f"uid {uid} lives in shard {shard}, not “{shard_raw}”: give the uid or the shard.")
        return Scope(shard=shard, uid=uid, note=f"Messages to uid {uid}, shard {shard} ({_where(shard)}).")
    if shard_raw:
        shard = whole_number(shard_raw)
        if shard is None or shard >= SHARD_COUNT:
            return Scope(error=f"shard must be a whole number from 0 to {SHARD_COUNT - 1}, not “{shard_raw}”.")
        return Scope(shard=shard, note=f"Shard {shard} ({_where(shard)}).")
    search = params.get(SEARCH_VAR, "").strip()
    if search:
        found = noce_ack_locate(search)
        if found is None:
            return Scope(note=f"No shard holds noce_ack “{search}”.")
        return Scope(shard=found, note=f"noce_ack “{search}” is in shard {found} ({_where(found)}).")
    return Scope(
        note=f"Shard 0 ({_where(0)}). Choose a uid or a shard to see another; "
        "a noce_ack search without either looks in every shard."
    )


def _where(shard: int) -> str:
    return f"table {shard_table(shard)} on database {shard_alias(shard)}"


class MsgTypeFilter(admin.SimpleListFilter):
    """The stored notification types, by name."""

    title = "msg type"
    parameter_name = "msg_type"

    def lookups(self, request, model_admin):
        return [(str(int(t)), t.name) for t in sorted(NOTIFICATION_TYPES)]

    def queryset(self, request, queryset):
        value = self.value()
        if value is None:
            return queryset
        if value not in {str(int(t)) for t in NOTIFICATION_TYPES}:
            raise IncorrectLookupParameters(f"unknown msg_type {value!r}")
        return queryset.filter(msg_type=int(value))


class ShardChangeList(ChangeList):
    """A changelist that keeps the scope in its links and names rows by shard and id."""

    def get_filters_params(self, params=None):
        lookup_params = super().get_filters_params(params)
        # Not field lookups: the model admin reads them to pick the shard.
        lookup_params.pop(UID_PARAM, None)
        lookup_params.pop(SHARD_PARAM, None)
        return lookup_params

    def url_for_result(self, result):
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=(quote(object_id_of(result)),),
            current_app=self.model_admin.admin_site.name,
        )


class ActionPermissionMixin:
    """Actions have side effects: they need the change permission, which the pages never use."""

    def has_act_permission(self, request) -> bool:
        codename = get_permission_codename("change", self.opts)
        return request.user.has_perm(f"{self.opts.app_label}.{codename}")


@admin.register(PushMessage)
class PushMessageAdmin(ActionPermissionMixin, ReadOnlyAdmin):
    list_display = ("noce_ack", "to_uid_link", "from_uid", "msg_type_label", "is_sent", "is_read", "create_time")
    list_filter = (MsgTypeFilter, "is_read", "is_sent")
    search_fields = ("noce_ack",)
    search_help_text = "An exact noce_ack. Without a uid or shard chosen, every shard is searched."
    fields = (
        "shard_label",
        "noce_ack",
        "to_uid",
        "from_uid",
        "msg_type_label",
        "client_type",
        "body_json",
        "is_sent",
        "is_read",
        "create_time",
        "update_time",
    )
    readonly_fields = fields
    ordering = ("-id",)
    # COUNT(*) of a whole shard table is slow on InnoDB and says little here.
    show_full_result_count = False
    actions = ("resend_to_online",)

    def scope(self, request) -> Scope:
        # Parsed once per request: a search without a shard may look in all 128.
        scope = getattr(request, "_push_message_scope", None)
        if scope is None:
            scope = request._push_message_scope = scope_parse(request.GET)
        return scope

    def changelist_view(self, request, extra_context=None):
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        scope = self.scope(request)
        if scope.error:
            self.message_user(request, scope.error, messages.ERROR)
        context = {
            "scope_note": scope.note,
            "scope_uid": request.GET.get(UID_PARAM, ""),
            "scope_shard": request.GET.get(SHARD_PARAM, ""),
            "shard_max": SHARD_COUNT - 1,
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    def get_changelist(self, request, **kwargs):
        return ShardChangeList

    def get_queryset(self, request):
        scope = self.scope(request)
        rows = message_model(scope.shard).objects.all()
        if scope.error:
            return rows.none()
        if scope.uid is not None:
            rows = rows.filter(to_uid=scope.uid)
        return rows

    def get_search_results(self, request, queryset, search_term):
        # Exact, on the unique index; the scope already sits on the right shard.
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(noce_ack=term), False

    def get_object(self, request, object_id, from_field=None):
        match = OBJECT_ID.fullmatch(object_id or "")
        if match is None or from_field is not None or int(match[1]) >= SHARD_COUNT:
            return None
        return message_model(int(match[1])).objects.filter(pk=int(match[2])).first()

    @admin.display(description="to uid", ordering="to_uid")
    def to_uid_link(self, row: PushMessageBase) -> str:
        return format_html(
            '<a href="?{}={}" title="every message of this uid">{}</a>', UID_PARAM, row.to_uid, row.to_uid
        )

    @admin.display(description="msg type", ordering="msg_type")
    def msg_type_label(self, row: PushMessageBase) -> str:
        return msg_type_name(row.msg_type)

    @admin.display(description="shard")
    def shard_label(self, row: PushMessageBase) -> str:
        return f"{row.shard} ({_where(row.shard)})"

    @admin.display(description="body")
    def body_json(self, row: PushMessageBase) -> str:
        return format_html("<pre>{}</pre>", json.dumps(row.body, indent=2, ensure_ascii=False, sort_keys=True))

    @admin.action(description="Resend unsent messages to users online now", permissions=["act"])
    def resend_to_online(self, request, queryset):
        ids = list(queryset.values_list("id", flat=True))
        try:
            online = services.messages_resend(shard=queryset.model.shard, ids=ids)
        except BackendUnavailable as error:
            self.message_user(request, f"Nothing was resent: {error}.", messages.ERROR)
            return
        self.message_user(
            request,
            f"{online} of {len(ids)} selected messages went to users online now. Read messages are never "
            "resent; the others stay stored for their user's next login.",
            messages.SUCCESS,
        )


@admin.register(PushJob)
class PushJobAdmin(ActionPermissionMixin, ReadOnlyAdmin):
    list_display = ("id", "state", "msg_type_label", "stored", "sent", "attempts", "created_at", "finished_at")
    list_filter = ("state", MsgTypeFilter)
    readonly_fields = (
        "id",
        "state",
        "msg_type_label",
        "from_uid",
        "body",
        "uids",
        "cursor",
        "stored",
        "sent",
        "attempts",
        "error",
        "created_at",
        "updated_at",
        "finished_at",
    )
    fields = readonly_fields
    actions = ("run_again",)

    @admin.display(description="msg type", ordering="msg_type")
    def msg_type_label(self, job: PushJob) -> str:
        return msg_type_name(job.msg_type)

    @admin.action(description="Run again", permissions=["act"])
    def run_again(self, request, queryset):
        # A running job may be on a worker right now; a done one has nothing left.
        jobs = list(queryset.values_list("id", "state"))
        runnable = [job_id for job_id, state in jobs if state in (JobState.FAILED, JobState.PENDING)]
        for job_id in runnable:
            services.push_job_enqueue(job_id=job_id)
        skipped = len(jobs) - len(runnable)
        text = f"{len(runnable)} job(s) queued to run again."
        if skipped:
            text += f" {skipped} running or done job(s) left alone."
        self.message_user(request, text, messages.SUCCESS if runnable else messages.WARNING)
