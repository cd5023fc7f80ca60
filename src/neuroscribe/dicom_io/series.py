"""Series assembly: a series is COMPLETE when quiet, then the study's head CT is selected.

Completion (see docs/series.md):

* a series with no new instance for ``series.quiet_seconds`` is COMPLETE (``completion=quiet``);
* a series still receiving ``series.force_complete_seconds`` after its first instance is COMPLETE
  anyway (``completion=forced``), so a scanner that never stops cannot hold it open;
* a **late instance** (a new SOP Instance UID for a series already complete or decided) is stored
  and reopens the series as a new revision: it is RECEIVING again, completes again after its quiet
  period and is selected afresh. Decisions carry the revision they were made on, so a decision
  about the old revision is never applied to the new one. A re-sent known instance changes nothing.

Selection waits until no series of the same study is still receiving, then decides all of the
study's complete series together, so the largest head series wins even if it finished last.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from neuroscribe.config import SelectionSettings, SeriesSettings
from neuroscribe.dicom_io.selection import Rejection, SeriesSummary, check_series, choose
from neuroscribe.log import get_logger, hash_uid
from neuroscribe.store import SeriesRow, SeriesState, StateStore

LOG = get_logger(__name__)


@dataclass
class TickResult:
    """What one pass of the assembler did."""

    completed: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # series UID -> reason


class SeriesAssembler:
    """Completes quiet series and records the selection decision for each.

    Call :meth:`tick` periodically (the daemon does, every ``series.poll_seconds``).
    """

    def __init__(
        self,
        store: StateStore,
        series_settings: SeriesSettings,
        selection_settings: SelectionSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.series_settings = series_settings
        self.rules = selection_settings
        self.clock = clock

    def tick(self) -> TickResult:
        """Complete what is quiet, then decide every study whose series are all complete."""
        now = self.clock()
        result = TickResult()
        for row in self.store.complete_quiet_series(
            now, self.series_settings.quiet_seconds, self.series_settings.force_complete_seconds
        ):
            result.completed.append(row.series_instance_uid)
            LOG.info("series complete", series=hash_uid(row.series_instance_uid),
                     instances=row.instance_count, completion=row.completion, revision=row.revision,
                     receive_seconds=round(row.last_received_at - row.first_received_at, 3))
        by_study: dict[str, list[SeriesRow]] = defaultdict(list)
        for row in self.store.series_rows(state=SeriesState.COMPLETE):
            by_study[row.study_instance_uid].append(row)
        for study_uid in by_study:
            self._decide_study(study_uid, now, result)
        return result

    def _decide_study(self, study_uid: str, now: float, result: TickResult) -> None:
        siblings = self.store.study_series(study_uid)
        if any(s.state == SeriesState.RECEIVING for s in siblings):
            return  # a sibling may still turn out to be the better head series
        complete = [s for s in siblings if s.state == SeriesState.COMPLETE]
        already = [s for s in siblings if s.state == SeriesState.SELECTED]
        decisions: dict[str, Rejection | None] = {}
        eligible: list[SeriesSummary] = []
        for row in complete:
            summary = SeriesSummary(
                row.series_instance_uid, study_uid,
                tuple(self.store.instance_headers(row.series_instance_uid)),
            )
            rejection = check_series(summary, self.rules)
            decisions[row.series_instance_uid] = rejection
            if rejection is None:
                eligible.append(summary)
        chosen = choose(eligible, self.rules)
        best_earlier = max((s.instance_count for s in already), default=0)
        if chosen is not None and self.rules.prefer_largest and chosen.slice_count <= best_earlier:
            chosen = None
        for summary in eligible:
            if chosen is None or summary.series_instance_uid != chosen.series_instance_uid:
                decisions[summary.series_instance_uid] = Rejection(
                    "not_largest", "another head series of the study has more slices"
                )
        for row in complete:
            rejection = decisions[row.series_instance_uid]
            state = SeriesState.SELECTED if rejection is None else SeriesState.REJECTED
            applied = self.store.decide_series(
                row.series_instance_uid, row.revision, state, now,
                reason=rejection.reason if rejection else None,
                detail=rejection.detail if rejection else None,
            )
            if not applied:
                continue  # reopened by a late instance meanwhile; decided again later
            if rejection is None:
                result.selected.append(row.series_instance_uid)
            else:
                result.rejected[row.series_instance_uid] = rejection.reason
            LOG.info("series decided", series=hash_uid(row.series_instance_uid),
                     study=hash_uid(study_uid), decision=state.value,
                     reason=rejection.reason if rejection else None,
                     detail=rejection.detail if rejection else None,
                     instances=row.instance_count, revision=row.revision)
