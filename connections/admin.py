"""Admin pages of the uid<->connection relation and the node liveness marks.

Invariants:
* both pages are read-only: rows are written by logins, logouts, closes and the
  reaper (connections.services), never by hand, because a relation row must
  change together with its presence entry in Redis;
* a node is shown alive exactly when ``node_reap_dead`` would spare it, that is
  its liveness mark is newer than ``PUSH_NODE_DEAD_AFTER`` seconds.

Guarded by tests/connections/test_admin.py.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib import admin
from django.db.models import Q
from django.utils import timezone

from pushsite import metrics

from .models import Connection, Node


class ReadOnlyAdmin(admin.ModelAdmin):
    """View only: no add, change or delete, whoever asks."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Connection)
class ConnectionAdmin(ReadOnlyAdmin):
    list_display = ("uid", "conn_id", "node", "user_status", "client_type", "login_time", "update_time")
    list_filter = ("user_status", "client_type", "node")
    search_fields = ("uid", "conn_id")
    search_help_text = "A uid (whole number, exact) or a connection id (or its beginning)."
    ordering = ("-id",)
    show_full_result_count = False

    def get_search_results(self, request, queryset, search_term):
        # Exact on uid and a prefix on conn_id: both use their index, where
        # the stock icontains would scan the whole relation table.
        term = search_term.strip()
        if not term:
            return queryset, False
        match = Q(conn_id__startswith=term)
        if term.isascii() and term.isdigit() and int(term) < 2**63:
            match |= Q(uid=int(term))
        return queryset.filter(match), False


@admin.register(Node)
class NodeAdmin(ReadOnlyAdmin):
    list_display = ("node_id", "hostname", "pid", "started_at", "heartbeat_at", "alive")
    search_fields = ("node_id", "hostname")
    ordering = ("-heartbeat_at",)

    def changelist_view(self, request, extra_context=None):
        # The processes' own numbers, as Prometheus scrapes them (PUSH_METRICS_TARGETS).
        context = {"process_metrics": metrics.read_targets(settings.PUSH_METRICS_TARGETS), **(extra_context or {})}
        return super().changelist_view(request, context)

    @admin.display(boolean=True, description="alive")
    def alive(self, node: Node) -> bool:
        """Whether the reaper would spare this node now."""
        return node.heartbeat_at >= timezone.now() - timedelta(seconds=settings.PUSH_NODE_DEAD_AFTER)
