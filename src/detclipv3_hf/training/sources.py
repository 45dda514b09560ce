"""Endless, resumable, rank-sharded record streams mixed by the stage's sampling ratios.

Sharding happens in exactly one place: :func:`detclipv3_hf.data.load_records` with ``rank`` / ``world_size``
(``datasets.distributed.split_dataset_by_node``). The training loop never hands a dataloader to Accelerate, so
nothing shards a second time.

Resumption: every source remembers ``(epoch, position)`` where ``position`` is
:attr:`~detclipv3_hf.data.RecordStream.position` (raw rows of this rank's stream consumed). Records are pulled
synchronously by the training loop, so the state saved after an optimizer step is exactly what that step consumed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

from ..data import DetectionRecord, RecordStream, SkipStats, load_records
from .config import DataSourceConfig

logger = logging.getLogger(__name__)


class EndlessSource:
    """One data source read epoch after epoch; reshuffled each epoch with ``seed + epoch`` (same on every rank).

    Args:
        source: what to read and its kind.
        rank, world_size: this process's share (``split_dataset_by_node`` inside ``load_records``).
        seed: base shuffle seed; ``None`` keeps the file order.
        streaming, shuffle_buffer_size: passed to ``load_records``.
        epoch, position: where to resume (from :meth:`state_dict`).
    """

    def __init__(
        self,
        source: DataSourceConfig,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = 0,
        streaming: bool = True,
        shuffle_buffer_size: int = 1000,
        epoch: int = 0,
        position: int = 0,
    ) -> None:
        self.source = source
        self.rank, self.world_size = rank, world_size
        self.seed, self.streaming, self.shuffle_buffer_size = seed, streaming, shuffle_buffer_size
        self.epoch = epoch
        self.stats = SkipStats()
        self._stream: RecordStream | None = None
        self._start = position
        self._kept_this_epoch = 0

    @property
    def name(self) -> str:
        spec = self.source.spec
        return f"{self.source.kind}:{spec['path'] if isinstance(spec, Mapping) else spec}"

    @property
    def position(self) -> int:
        return self._stream.position if self._stream is not None else self._start

    def _open(self) -> RecordStream:
        return load_records(
            self.source.spec,
            streaming=self.streaming,
            rank=self.rank,
            world_size=self.world_size,
            start_index=self._start,
            shuffle_seed=None if self.seed is None else self.seed + self.epoch,
            shuffle_buffer_size=self.shuffle_buffer_size,
        )

    def next_record(self) -> DetectionRecord:
        """The next usable record, starting a new epoch when this rank's share is exhausted.

        Raises:
            ValueError: when a whole epoch of this rank's share holds no usable record.
        """
        while True:
            if self._stream is None:
                self._stream = self._open()
            try:
                record = next(self._stream)
            except StopIteration:
                self.stats.merge(self._stream.stats)
                # An epoch read from its start without one usable record would loop forever.
                empty = self._kept_this_epoch == 0 and self._start == 0
                logger.info("%s rank %d finished epoch %d", self.name, self.rank, self.epoch)
                self.epoch, self._start, self._stream, self._kept_this_epoch = self.epoch + 1, 0, None, 0
                if empty:
                    raise ValueError(
                        f"data source {self.name} has no usable record for rank {self.rank} of "
                        f"{self.world_size} ({self.stats.summary()})"
                    ) from None
                continue
            self._kept_this_epoch += 1
            return record

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def close_stats(self) -> SkipStats:
        """Skip statistics of every finished epoch plus the running one."""
        stats = SkipStats().merge(self.stats)
        return stats.merge(self._stream.stats) if self._stream is not None else stats


class MixedRecordSource:
    """Several :class:`EndlessSource` objects of different kinds, one kind drawn per batch by ratio.

    Args:
        sources: the run's data sources (several sources of one kind share that kind's ratio equally).
        data_mix: ``(kind, ratio)`` pairs of the stage; kinds without a source are dropped, the rest renormalised.
        rank, world_size, seed, streaming, shuffle_buffer_size: see :class:`EndlessSource`.
        state: a :meth:`state_dict` to resume from.

    Raises:
        ValueError: when no source matches any kind of the stage's data mix, or ``state`` names other sources.
    """

    def __init__(
        self,
        sources: Sequence[DataSourceConfig],
        data_mix: Sequence[tuple[str, float]],
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = 0,
        streaming: bool = True,
        shuffle_buffer_size: int = 1000,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        ratios = dict(data_mix)
        usable = [s for s in sources if s.kind in ratios]
        ignored = [s for s in sources if s.kind not in ratios]
        if ignored:
            logger.warning(
                "ignoring data sources of kinds %s: not in this stage's data mix %s",
                sorted({s.kind for s in ignored}),
                sorted(ratios),
            )
        if not usable:
            raise ValueError(
                f"no data source matches the stage's data kinds {sorted(ratios)}; got kinds "
                f"{sorted({s.kind for s in sources})} (write --data KIND=SPEC)"
            )
        saved = dict(state or {})
        self.sources: list[EndlessSource] = []
        for index, source in enumerate(usable):
            key = str(index)
            position = saved.get(key, {})
            self.sources.append(
                EndlessSource(
                    source,
                    rank=rank,
                    world_size=world_size,
                    seed=seed,
                    streaming=streaming,
                    shuffle_buffer_size=shuffle_buffer_size,
                    epoch=int(position.get("epoch", 0)),
                    position=int(position.get("position", 0)),
                )
            )
        if saved and set(saved) != {str(i) for i in range(len(self.sources))}:
            raise ValueError(
                f"the checkpoint's data state has sources {sorted(saved)} but this run has {len(self.sources)}; "
                "resume with the same --data list"
            )
        per_kind: dict[str, int] = {}
        for source in self.sources:
            per_kind[source.source.kind] = per_kind.get(source.source.kind, 0) + 1
        weights = [ratios[s.source.kind] / per_kind[s.source.kind] for s in self.sources]
        total = sum(weights)
        self.weights = [w / total for w in weights]

    def choose(self, rng: random.Random) -> int:
        """Index of the source the next batch comes from (``rng`` should be the same on every rank)."""
        return rng.choices(range(len(self.sources)), weights=self.weights, k=1)[0]

    def next_batch(self, source_index: int, batch_size: int) -> tuple[str, list[DetectionRecord]]:
        """``batch_size`` records of source ``source_index`` and that source's kind."""
        source = self.sources[source_index]
        return source.source.kind, [source.next_record() for _ in range(batch_size)]

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {str(i): source.state_dict() for i, source in enumerate(self.sources)}

    def stats(self) -> dict[str, SkipStats]:
        return {source.name: source.close_stats() for source in self.sources}
