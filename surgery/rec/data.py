"""Sequential-recommendation data: MovieLens-format interactions -> 5-core, time-ordered, leave-one-out splits.

Input: a directory holding `ratings.csv` (or a CSV file itself) with the columns user, item, rating, timestamp
(MovieLens' `userId,movieId,rating,timestamp`; a header with other usual names such as `user_id`, `item_id`,
`asin`, `overall`, `unixReviewTime` is recognised, and a file without a header is read in that column order, so
Amazon-review exports work unchanged). An optional `movies.csv` (movieId, title, genres) gives item titles.

Processing, in order (every step deterministic, so the same file gives the same split and fingerprint):
1. keep ratings > `min_rating` (default 3) as positive feedback;
2. k-core filter (default 5): drop users and items with fewer than k interactions, repeated until nothing changes
   (on MovieLens latest-small: 602 users, 2,412 items, 53,371 interactions);
3. order each user's items by timestamp (ties keep the file order: a stable sort);
4. number users and items by their original id (items 1..N, 0 is padding);
5. leave-one-out: the last item of each user is the test target, the second-to-last the validation target, the rest
   is training data; every model sees at most the last `max_len` items (default 50) as history.

On disk (`save_rec_data` / `load_rec_data`), no pickles:

    OUT/sequences.safetensors   items (total,) int64 1..N in time order per user; offsets (users + 1,) int64;
                                timestamps (total,) int64
    OUT/data.json               version, fingerprint, counts, parameters, source file hashes, user/item ids, titles
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.errors import UserError

DATA_VERSION = 1
SEQUENCES = "sequences.safetensors"
META = "data.json"
_USER = ("userid", "user_id", "user", "reviewerid", "uid")
_ITEM = ("movieid", "itemid", "item_id", "item", "asin", "parent_asin", "iid", "productid")
_RATING = ("rating", "overall", "score", "stars")
_TIME = ("timestamp", "unixreviewtime", "time", "ts", "date")


@dataclass
class RecData:
    """Interaction sequences of every kept user, time-ordered, items numbered 1..num_items (0 = padding).

    Attributes:
        items: (total,) int64, user u's sequence is items[offsets[u]:offsets[u + 1]].
        offsets: (num_users + 1,) int64.
        timestamps: (total,) int64, aligned with `items`.
        num_items: Items kept (ids 1..num_items).
        max_len: History cap used by every model and by the evaluation examples.
        user_ids, item_ids: Original ids (strings); item_ids[i - 1] is item i.
        titles: Item titles (from movies.csv), "" where unknown; same order as item_ids.
        params: min_rating, core, max_len.
        source: Input file names and their sha256.
        fingerprint: "sha256:..." of the sequences and the parameters.
    """

    items: torch.Tensor
    offsets: torch.Tensor
    timestamps: torch.Tensor
    num_items: int
    max_len: int
    user_ids: list[str]
    item_ids: list[str]
    titles: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def num_users(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def num_interactions(self) -> int:
        return int(self.items.numel())

    def sequence(self, user: int) -> torch.Tensor:
        """(n,) the user's whole time-ordered sequence."""
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def describe(self) -> dict:
        """What every result made on this data records (counts, parameters, fingerprint)."""
        return {"users": self.num_users, "items": self.num_items, "interactions": self.num_interactions,
                "fingerprint": self.fingerprint, **self.params}

    def train_examples(self, users: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item training pairs at every position, from each user's training part (all but the last two).

        The last max_len + 1 training items give inputs s[:-1] and targets s[1:], left-aligned and right-padded with
        0 (right padding keeps causal models from ever attending to padding, and positions start at 0).

        Returns:
            inputs (U, max_len) int64, targets (U, max_len) int64 (0 = no target).
        """
        users = range(self.num_users) if users is None else users
        inputs = torch.zeros(len(users), self.max_len, dtype=torch.long)
        targets = torch.zeros_like(inputs)
        for row, u in enumerate(users):
            seq = self.sequence(u)[:-2][-(self.max_len + 1) :]  # training part, capped
            n = seq.numel() - 1
            inputs[row, :n] = seq[:-1]
            targets[row, :n] = seq[1:]
        return inputs, targets

    def eval_examples(self, split: str = "test", users: list[int] | None = None):
        """Leave-one-out examples: the history before the held-out item, and the item.

        Args:
            split: "test" (last item; history includes the validation item) or "valid" (second-to-last item).
            users: Rows to build (default: every user).

        Returns:
            histories (U, max_len) int64 right-padded with 0, lengths (U,) int64, targets (U,) int64.
        """
        if split not in ("test", "valid"):
            raise UserError(f"unknown split {split!r}: use 'test' or 'valid'")
        cut = 1 if split == "test" else 2
        users = range(self.num_users) if users is None else users
        histories = torch.zeros(len(users), self.max_len, dtype=torch.long)
        lengths = torch.zeros(len(users), dtype=torch.long)
        targets = torch.zeros(len(users), dtype=torch.long)
        for row, u in enumerate(users):
            seq = self.sequence(u)
            hist = seq[:-cut][-self.max_len :]
            histories[row, : hist.numel()] = hist
            lengths[row] = hist.numel()
            targets[row] = seq[-cut]
        return histories, lengths, targets


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _pick(header: list[str], names: tuple[str, ...], what: str, path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise UserError(f"{path}: no {what} column in the header {header} (expected one of {', '.join(names)})")


def read_interactions(path: Path) -> list[tuple[str, str, float, float]]:
    """(user, item, rating, timestamp) rows of a 4-column ratings CSV, in file order.

    Raises:
        UserError: Missing file, too few columns, a rating or timestamp that is not a number.
    """
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None:
            raise UserError(f"{path} is empty: expected user, item, rating, timestamp rows")
        try:
            float(first[2]), float(first[3])
            cols, rows_in = (0, 1, 2, 3), [first]  # no header: user, item, rating, timestamp
        except (ValueError, IndexError):
            if len(first) < 4:
                raise UserError(f"{path}: expected 4 columns (user, item, rating, timestamp), got {first}") from None
            cols = (_pick(first, _USER, "user", path), _pick(first, _ITEM, "item", path),
                    _pick(first, _RATING, "rating", path), _pick(first, _TIME, "timestamp", path))
            rows_in = []
        rows = []
        for line_no, row in enumerate([*rows_in, *reader], start=1 if rows_in else 2):
            if not row:
                continue
            try:
                rows.append((row[cols[0]], row[cols[1]], float(row[cols[2]]), float(row[cols[3]])))
            except (ValueError, IndexError):
                raise UserError(f"{path}:{line_no}: expected user, item, rating, timestamp, got {row}") from None
    return rows


def k_core(pairs: list[tuple[str, str, float]], k: int) -> list[tuple[str, str, float]]:
    """Keep (user, item, time) rows whose user and item both have >= k rows, repeated until stable."""
    while True:
        users = Counter(u for u, _, _ in pairs)
        items = Counter(i for _, i, _ in pairs)
        kept = [p for p in pairs if users[p[0]] >= k and items[p[1]] >= k]
        if len(kept) == len(pairs):
            return kept
        pairs = kept


def _id_key(ids: set[str]):
    """Numeric order when every id is an integer (MovieLens), else string order (Amazon ASINs)."""
    if all(s.lstrip("-").isdigit() for s in ids):
        return lambda s: (int(s), s)
    return lambda s: (0, s)


def _titles(directory: Path, item_ids: list[str]) -> list[str]:
    movies = directory / "movies.csv"
    if not movies.is_file():
        return [""] * len(item_ids)
    with open(movies, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        names = {row[0]: row[1] for row in reader if len(row) >= 2}
    return [names.get(i, "") for i in item_ids]


def prepare(source: str | Path, *, min_rating: float = 3.0, core: int = 5, max_len: int = 50,
            progress=None) -> RecData:
    """Build the leave-one-out sequences from a ratings CSV (see the module docstring for every step).

    Args:
        source: A directory holding ratings.csv (and optionally movies.csv), or a ratings CSV file.
        min_rating: Ratings strictly above this are positive feedback.
        core: k of the iterative k-core filter (at least 3: leave-one-out needs a training item).
        max_len: History cap.
        progress: Called with one-line status messages.

    Raises:
        UserError: Missing or malformed input, bad parameters, or nothing left after filtering.
    """
    say = progress or (lambda _m: None)
    if core < 3:
        raise UserError(f"--core must be at least 3 so every user keeps a training item (got {core})")
    if max_len < 1:
        raise UserError(f"--max-len must be at least 1 (got {max_len})")
    src = Path(source).expanduser()
    ratings = src / "ratings.csv" if src.is_dir() else src
    if not ratings.is_file():
        raise UserError(f"no ratings file at {ratings}: give a MovieLens directory or a user,item,rating,timestamp CSV")
    say(f"reading {ratings}")
    rows = read_interactions(ratings)
    positive = [(u, i, t) for u, i, r, t in rows if r > min_rating]
    say(f"{len(positive):,} of {len(rows):,} ratings > {min_rating}; {core}-core filtering")
    kept = k_core(positive, core)
    if not kept:
        raise UserError(f"nothing is left after keeping ratings > {min_rating} and {core}-core filtering {ratings}")
    user_set, item_set = {u for u, _, _ in kept}, {i for _, i, _ in kept}
    user_ids = sorted(user_set, key=_id_key(user_set))
    item_ids = sorted(item_set, key=_id_key(item_set))
    item_index = {iid: n + 1 for n, iid in enumerate(item_ids)}
    per_user: dict[str, list[tuple[float, int]]] = {u: [] for u in user_ids}
    for u, i, t in kept:  # file order, then a stable sort by time: ties keep the file order
        per_user[u].append((t, item_index[i]))
    items, times, offsets = [], [], [0]
    for u in user_ids:
        seq = sorted(per_user[u], key=lambda x: x[0])
        items.extend(i for _, i in seq)
        times.extend(int(t) for t, _ in seq)
        offsets.append(len(items))
    data = RecData(
        items=torch.tensor(items, dtype=torch.long), offsets=torch.tensor(offsets, dtype=torch.long),
        timestamps=torch.tensor(times, dtype=torch.long), num_items=len(item_ids), max_len=max_len,
        user_ids=user_ids, item_ids=item_ids,
        titles=_titles(ratings.parent, item_ids),
        params={"min_rating": min_rating, "core": core, "max_len": max_len},
        source={"ratings": {"name": ratings.name, "sha256": _sha256_file(ratings)}},
    )
    data.fingerprint = fingerprint(data)
    return data


def fingerprint(data: RecData) -> str:
    """sha256 of the sequences, the item ids and the parameters: equal fingerprints mean the same split."""
    h = hashlib.sha256()
    h.update(data.items.numpy().tobytes())
    h.update(data.offsets.numpy().tobytes())
    h.update(json.dumps({"items": data.item_ids, "params": data.params}, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def save_rec_data(data: RecData, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `data` to directory `out` atomically (a temp sibling renamed into place); returns `out`."""
    from safetensors.torch import save_file

    from surgery.export import atomic_dir

    meta = {"version": DATA_VERSION, "kind": "rec-data", "fingerprint": data.fingerprint,
            "users": data.num_users, "items": data.num_items, "interactions": data.num_interactions,
            "params": data.params, "source": data.source, "user_ids": data.user_ids, "item_ids": data.item_ids,
            "titles": data.titles}
    with atomic_dir(out, overwrite) as tmp:
        save_file({"items": data.items, "offsets": data.offsets, "timestamps": data.timestamps},
                  str(tmp / SEQUENCES), metadata={"format": "pt", "fingerprint": data.fingerprint})
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def load_rec_data(path: str | Path) -> RecData:
    """Read a directory written by `save_rec_data`; the fingerprint is recomputed and checked.

    Raises:
        UserError: Not a prepared directory, a newer version, or files that do not match their fingerprint.
    """
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        tensors = load_file(str(path / SEQUENCES))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a prepared rec data directory ({exc}): run `workbench rec prepare` "
                        "first") from None
    if not isinstance(meta, dict) or meta.get("kind") != "rec-data":
        raise UserError(f"{path / META} is not a rec data file")
    if meta.get("version", 0) > DATA_VERSION:
        raise UserError(f"{path} is rec data version {meta['version']}, newer than this workbench reads")
    data = RecData(items=tensors["items"], offsets=tensors["offsets"], timestamps=tensors["timestamps"],
                   num_items=int(meta["items"]), max_len=int(meta["params"]["max_len"]),
                   user_ids=meta["user_ids"], item_ids=meta["item_ids"], titles=meta.get("titles", []),
                   params=meta["params"], source=meta.get("source", {}))
    data.fingerprint = fingerprint(data)
    if data.fingerprint != meta.get("fingerprint"):
        raise UserError(f"{path}: the sequences do not match the recorded fingerprint (files changed or "
                        "corrupt): prepare the data again")
    return data
