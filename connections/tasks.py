"""Celery entry points of the connections app."""

from celery import shared_task

from .services import node_reap_dead


@shared_task(name="connections.reap_dead_nodes")
def reap_dead_nodes() -> int:
    """Clear the relation rows of nodes that stopped marking themselves alive."""
    return node_reap_dead()
