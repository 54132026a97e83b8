"""surgery.heap.HeapTrimmer: trims only the growth over the level a step reaches with its scratch in place."""

from surgery import heap


def test_trims_when_the_level_grew_by_more_than_the_slack_then_rebases(monkeypatch):
    levels = iter([100, 130, 171, 500, 90, 120, 160])  # resident bytes seen by successive calls
    trims = []
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(levels))
    monkeypatch.setattr(heap, "_malloc_trim", lambda: trims.append)
    trim = heap.HeapTrimmer(slack=70)
    trim(), trim()  # base 100, then 130: within the slack
    assert trims == []
    trim()  # 171 > 100 + 70: trimmed; the next call sets the new base
    assert trims == [0]
    trim(), trim(), trim()  # 500 is the new base (scratch faulted in again), 90 and 120 are below it
    assert trims == [0] and trim.base == 500

