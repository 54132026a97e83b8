"""Index lists of a plan held compactly: int64 arrays that compare, print and serialise like lists.

A plan that names 5,734 of 28,672 neurons in each of a 70B model's 80 layers holds 458,720 indices. As Python lists
of ints that is ~40 bytes an index (an int object and a list slot), ~18 MB before anything is checked, and the
decoded JSON plus pydantic's copy plus the resolver's sets made `plan validate` and `apply --dry-run` on a 70B header
set 100-130 MB. `Indices` holds 8 bytes an index, and `compact_plan_lists` converts a step's index list while the
JSON is decoded, so at most one step's Python ints exist at a time.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

_INT64_MAX = 2**63 - 1
# the index field of each op, as the plan file spells it (surgery.plan); only these are converted
INDEX_FIELDS = {"prune_heads": "heads", "prune_kv_groups": "groups", "prune_neurons": "neurons",
                "drop_layers": "layers", "prune_hidden": "channels", "prune_experts": "experts",
                "reconstruct": "layers"}  # fmt: skip


class Indices(array):
    """Non-negative indices as an int64 array that behaves like the list it replaces where plans are used: equal
    to a list or tuple with the same items, printed as a list, sliced and copied as Indices."""

    def __new__(cls, values: Iterable[int] = ()) -> Indices:
        return super().__new__(cls, "q", values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, array):
            return array.__eq__(self, other)
        if isinstance(other, list | tuple):
            return len(self) == len(other) and self.tolist() == list(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # mutable, like the list it stands for

    def __repr__(self) -> str:
        return repr(self.tolist())

    __str__ = __repr__

    def __getitem__(self, index):
        item = array.__getitem__(self, index)
        return Indices(item) if isinstance(index, slice) else item

    def __copy__(self) -> Indices:
        return Indices(self)

    def __deepcopy__(self, memo: dict) -> Indices:
        return Indices(self)

    def __reduce__(self):
        return Indices, (self.tolist(),)


def as_indices(values: list) -> Indices | None:
    """`values` as Indices when every item is a plain int in 0 .. 2**63 - 1 and there is at least one; else None
    (bools, strings, negatives, huge values and empty lists stay lists, so the schema reports them as before)."""
    if not values or not all(type(v) is int for v in values):
        return None
    try:
        out = Indices(values)
    except OverflowError:
        return None
    return out if min(out) >= 0 else None


def compact_plan_lists(pairs: list[tuple[str, Any]]) -> dict:
    """`json.loads(..., object_pairs_hook=...)` for plan files: a step object's index list becomes Indices as soon
    as the object is decoded. Same dict as the default decoding otherwise (the last of repeated keys wins)."""
    obj = dict(pairs)
    op = obj.get("op")
    key = INDEX_FIELDS.get(op) if isinstance(op, str) else None
    if key is not None and isinstance(obj.get(key), list):
        compact = as_indices(obj[key])
        if compact is not None:
            obj[key] = compact
    return obj


def restore_lists(data: Any) -> Any:
    """Undo `compact_plan_lists` everywhere but in the plan's steps (an object shaped like a step inside
    `provenance` stays the plain JSON it was). Changes `data` in place and returns it."""
    steps = data.get("steps") if isinstance(data, dict) else None
    keep = {id(s) for s in steps} if isinstance(steps, list) else set()
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            children = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        for k, v in children:
            if isinstance(v, Indices) and id(item) not in keep:
                item[k] = v.tolist()  # replacing a value while iterating is allowed (no key is added)
            elif isinstance(v, dict | list):
                stack.append(v)
    return data
