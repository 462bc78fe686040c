"""Qdrant -> Qdrant's swap: the alias readers search moves to the new collection in ONE
`update_collection_aliases` request (`qdrant.swap_alias`: delete + create in one request, so a reader
sees the old or the new collection, never none), and moves back the same way. The alias state
(which collection it named before, and now) is recorded in the book first, so an interrupted
cutover or rollback knows where the alias belongs. The old collection is kept until `finish`.
"""
from __future__ import annotations

from typing import Any

from . import qdrant
from .qdrant_book import Book


def cut_over(c, book: Book, alias: str, new: str, run_id: str) -> dict[str, Any]:
    """Point `alias` at `new`; returns {previous, current}. Repeating it is a no-op."""
    previous = qdrant.alias_target(c, alias)
    state = book.get("alias")
    if previous == new and state and state.get("current") == new:
        return {"previous": state.get("previous"), "current": new}
    book.put("alias", alias=alias, previous=previous, current=new, run_id=run_id, state="cutting_over")
    qdrant.swap_alias(c, alias, new)
    book.put("alias", alias=alias, previous=previous, current=new, run_id=run_id, state="cut_over")
    return {"previous": previous, "current": new}


def roll_back(c, book: Book, alias: str) -> dict[str, Any]:
    """Point `alias` back at the collection it named before the cutover (delete it when it named none)."""
    from qdrant_client import models as m

    state = book.get("alias")
    if not state or state.get("state") in ("rolled_back", "finished"):
        return {"alias": alias, "state": (state or {}).get("state", "never cut over")}
    previous = state.get("previous")
    if previous is None:
        c.update_collection_aliases(change_aliases_operations=[
            m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=alias))])
    else:
        qdrant.swap_alias(c, alias, previous)
    book.put("alias", **{**state, "state": "rolled_back"})
    return {"alias": alias, "current": previous, "state": "rolled_back"}


def finish(c, book: Book, alias: str) -> dict[str, Any]:
    """After the rollback window: drop the collection the alias named before (rollback no longer offered)."""
    state = book.get("alias")
    if not state or state.get("state") != "cut_over":
        return {"alias": alias, "state": (state or {}).get("state", "never cut over"), "dropped": None}
    if qdrant.alias_target(c, alias) != state["current"]:
        raise RuntimeError(f"alias {alias!r} names {qdrant.alias_target(c, alias)!r}, not {state['current']!r}: "
                           "not finishing (the old collection is kept)")
    old = state.get("previous")
    if old and c.collection_exists(old):
        c.delete_collection(old)
    book.put("alias", **{**state, "state": "finished"})
    return {"alias": alias, "dropped": old, "state": "finished"}
