"""The timeline picture (SVG, or HTML around it): one band per connection, two lanes per channel (front-end to
back-end above, back-end to front-end below), one mark per message, request-to-reply arrows with response
times, events as vertical lines, messages with findings in red.

Time runs left to right and only forwards, but idle gaps are compressed (log scale): a vhost-user session is
bursts of microseconds separated by seconds of guest boot, and a linear axis would stack each burst on one pixel.
The ruler gives the real time of the marks.

A capture too long to draw message by message (more than DETAIL_LIMIT records) is drawn by time instead: each lane
is a histogram of COLUMNS time buckets (a bar per bucket, its height the log of its message count, red for the
findings raised in it), so the picture and the memory behind it stay bounded however long the capture.

Ring samples (`--rings`) get a lane of their own under each connection's channels: per ring, the used index
(solid) and the avail index (dashed), unwrapped, over the same time axis; a sample with a ring finding is a red dot.
Bucketed, the lane keeps per ring and bucket the indexes of its last sample and the findings raised in it.
"""
from __future__ import annotations

import math
from html import escape

from ..analysis.analyzer import Analyzer, direction_for
from ..analysis.expert import Finding
from ..dataplane.sample import RingSample, SampleError, unpack_sample
from ..model import Channel, Direction, EventKind, Record, RecordKind
from ..protocol.grammar import Message
from ..protocol.replies import Expect

DETAIL_LIMIT = 20_000   # records drawn one by one; beyond, the timeline buckets by time
COLUMNS = 800           # time buckets across the picture when bucketed
COLUMN_WIDTH = 2
BUCKET_LANE = 60        # a bucketed lane needs no room for rotated names

LEFT = 190              # room for lane names
TOP = 54
LANE = 150              # height of one lane: room for the rotated names
EVENT_STRIP = 20        # event notes, above the lanes
BAND_GAP = 70
COLOURS = {Channel.MAIN: "#1f6fb2", Channel.BACKEND: "#b26b1f", Channel.GPU: "#5a8f29",
           Channel.DEVICE_STATE: "#7b4fa8"}
PROBLEM = "#d62728"
RING_LANE = 110         # height of a connection's ring lane
_MESSAGE = RecordKind.MESSAGE
RING_COLOURS = ("#2a9d8f", "#e76f51", "#264653", "#e9c46a", "#8d5fd3", "#6a994e")


def _x_positions(seen) -> dict[int, float]:
    """x of every record, in time order: a minimum step plus a log-compressed share of the gap."""
    many = len(seen) > 400
    minimum, scale = (3.0, 3.0) if many else (16.0, 9.0)
    xs: dict[int, float] = {}
    x = LEFT + 20.0
    previous = None
    for number, record, _message in sorted(seen, key=lambda item: (item[1].timestamp_ns, item[0])):
        if previous is not None:
            gap_us = max(0, record.timestamp_ns - previous) / 1e3
            x += minimum + scale * math.log10(1 + gap_us)
        xs[number] = x
        previous = record.timestamp_ns
    return xs


def _time_text(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def render_svg(seen: list[tuple[int, Record, Message | None]], analyzer: Analyzer, title: str = "") -> str:
    """The SVG text; `seen` is (record number, record, decoded message or None) in capture order."""
    xs = _x_positions(seen)
    first_ns = min((r.timestamp_ns for _n, r, _m in seen), default=0)
    width = int(max(xs.values(), default=LEFT) + 440)
    labels = len(seen) <= 400
    flagged = analyzer.findings_by_number()
    parts: list[str] = []
    y = TOP
    lane_y: dict[tuple[int, Channel, Direction], float] = {}
    for connection in sorted({r.connection for _n, r, _m in seen}):
        items = [item for item in seen if item[1].connection == connection]
        channels = sorted({r.channel for _n, r, _m in items if r.kind == RecordKind.MESSAGE} | {Channel.MAIN})
        state = analyzer.state(connection)
        band_top = y
        parts.append(_band_heading(y, connection, state))
        y += EVENT_STRIP
        for channel in channels:
            for direction in (Direction.FRONTEND_TO_BACKEND, Direction.BACKEND_TO_FRONTEND):
                lane_y[(connection, channel, direction)] = y
                shade = "#f4f7fb" if direction == Direction.FRONTEND_TO_BACKEND else "#fbf8f2"
                parts.append(f'<rect x="0" y="{y}" width="{width}" height="{LANE}" fill="{shade}"/>')
                parts.append(f'<text x="8" y="{y + LANE / 2 + 4}" class="lane">{channel.name.lower()} '
                             f'{direction.arrow}</text>')
                y += LANE
        samples = _ring_samples(items)
        if samples:
            parts += _ring_lane(samples, xs, y, width, flagged)
            y += RING_LANE
        band_bottom = y
        parts += _events(items, xs, band_top, band_bottom, first_ns)
        parts += _arrows(analyzer, connection, xs, lane_y)
        parts += _marks(items, xs, lane_y, flagged, first_ns, labels)
        y += BAND_GAP
    parts += _ruler(seen, xs, y - BAND_GAP + 40, first_ns)
    height = int(y + 40)
    header = escape(title) if title else "vhusniff timeline"
    return _svg_document(width, height, header, parts, arrows=True)


def _mark_y(lane_top: float, direction: Direction) -> float:
    # Marks sit on the edge the two lanes of a channel share, so request-to-reply arrows stay short.
    return lane_top + LANE - 12 if direction == Direction.FRONTEND_TO_BACKEND else lane_top + 12


def _marks(items, xs, lane_y, flagged, first_ns, labels) -> list[str]:
    parts = []
    for number, record, message in items:
        if record.kind != RecordKind.MESSAGE:
            continue
        x = xs[number]
        y = _mark_y(lane_y[(record.connection, record.channel, record.direction)], record.direction)
        findings = flagged.get(number, [])
        colour = COLOURS.get(record.channel, "#444")
        stroke = PROBLEM if findings or (message is not None and message.problems) else colour
        name = message.name + (" reply" if message.is_reply else "") if message is not None else "?"
        tip = f"#{number} {_time_text((record.timestamp_ns - first_ns) / 1e9)} {record.direction.arrow} " \
              f"{message.summary() if message is not None else ''}"
        tip += "".join(f"\n[{f.severity}] {f.check}: {f.text}" for f in findings)
        if message is not None and message.is_reply:
            shape = f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="white" stroke="{stroke}" ' \
                    f'stroke-width="2"/>'
        else:
            shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}" stroke="{stroke}" ' \
                    f'stroke-width="2"/>'
        parts.append(f'<g class="msg" data-number="{number}"><title>{escape(tip)}</title>{shape}</g>')
        if labels:
            angle, dy, anchor = (-65, -9, "start") if record.direction == Direction.FRONTEND_TO_BACKEND \
                else (65, 12, "start")
            fill = f' style="fill:{PROBLEM}"' if findings else ""
            parts.append(f'<text x="{x + 2:.1f}" y="{y + dy:.1f}" class="name"{fill} text-anchor="{anchor}" '
                         f'transform="rotate({angle} {x + 2:.1f} {y + dy:.1f})">#{number} {escape(name)}</text>')
    return parts


def _arrows(analyzer: Analyzer, connection: int, xs, lane_y) -> list[str]:
    parts = []
    for t in analyzer.transactions:
        if t.connection != connection or t.expect == Expect.NOTHING or t.request_number not in xs:
            continue
        request_direction, reply_direction = direction_for(t.channel, False), direction_for(t.channel, True)
        x1 = xs[t.request_number]
        y1 = _mark_y(lane_y[(connection, t.channel, request_direction)], request_direction)
        y2 = _mark_y(lane_y[(connection, t.channel, reply_direction)], reply_direction)
        if t.reply_number is not None and t.reply_number in xs:
            x2 = xs[t.reply_number]
            seconds = t.response_seconds
            assert seconds is not None          # the analyzer sets reply_number and reply_ns together
            parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2 - 3:.1f}" y2="{y2 - 5 if y2 > y1 else y2 + 5:.1f}"'
                         f' stroke="#777" stroke-width="1.2" marker-end="url(#arrow)"/>')
            parts.append(f'<text x="{(x1 + x2) / 2 + 4:.1f}" y="{(y1 + y2) / 2 + 3:.1f}" class="rt">'
                         f'{_time_text(seconds)}</text>')
        elif t.expect != Expect.MAYBE:
            parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x1 + 18:.1f}" y2="{(y1 + y2) / 2:.1f}" '
                         f'stroke="{PROBLEM}" stroke-width="1.5" stroke-dasharray="3,2"/>')
            parts.append(f'<text x="{x1 + 20:.1f}" y="{(y1 + y2) / 2 + 3:.1f}" class="rt" style="fill:{PROBLEM}">'
                         f'<title>#{t.request_number} {escape(t.name)}: {escape(t.outcome)}</title>'
                         f'no {t.expect}</text>')
    return parts


def _ring_samples(items) -> dict[int, list[tuple[int, RingSample]]]:
    """ring -> [(record number, sample)] of the readable, mapped samples among `items`."""
    rings: dict[int, list[tuple[int, RingSample]]] = {}
    for number, record, _message in items:
        if record.kind != RecordKind.EVENT or record.event != EventKind.RING:
            continue
        try:
            sample = unpack_sample(record.data)
        except SampleError:
            continue
        if sample.mapped:
            rings.setdefault(sample.ring, []).append((number, sample))
    return rings


def _unwrapped(values: list[int]) -> list[int]:
    """Free-running 16-bit indexes as counts that only grow (a ring restarted at a lower index starts over)."""
    out, total, previous = [], 0, None
    for value in values:
        if previous is not None:
            total += (value - previous) & 0xFFFF
        out.append(total)
        previous = value
    return out


def _ring_lane(rings: dict[int, list[tuple[int, RingSample]]], xs, top: float, width: int, flagged) -> list[str]:
    parts = [f'<rect x="0" y="{top}" width="{width}" height="{RING_LANE}" fill="#f3faf7"/>',
             f'<text x="8" y="{top + RING_LANE / 2 + 4}" class="lane">rings (used, avail)</text>']
    series = {ring: (_unwrapped([s.used_idx for _n, s in samples]), _unwrapped([s.avail_idx for _n, s in samples]))
              for ring, samples in rings.items()}
    peak = max((max(avail, default=0) for _used, avail in series.values()), default=0) or 1
    bottom = top + RING_LANE - 8

    def y_of(count: int) -> float:
        return bottom - (RING_LANE - 20) * count / peak

    for position, (ring, samples) in enumerate(sorted(rings.items())):
        colour = RING_COLOURS[position % len(RING_COLOURS)]
        used, avail = series[ring]
        last = samples[-1][1]
        tip = f"ring {ring}: {used[-1]} used, {avail[-1]} made available, {last.kicks} kicks, {last.calls} calls"
        for counts, dash in ((used, ""), (avail, ' stroke-dasharray="4,3"')):
            points = " ".join(f"{xs[number]:.1f},{y_of(count):.1f}" for (number, _s), count in zip(samples, counts,
                                                                                                  strict=True))
            parts.append(f'<polyline class="ring" data-ring="{ring}" points="{points}" fill="none" '
                         f'stroke="{colour}" stroke-width="1.6"{dash}><title>{escape(tip)}</title></polyline>')
        parts.append(f'<text x="{max(xs[samples[-1][0]], LEFT) + 6:.1f}" y="{y_of(used[-1]) + 4:.1f}" class="name" '
                     f'style="fill:{colour}">ring {ring}</text>')
        for (number, _sample), count in zip(samples, used, strict=True):
            for finding in flagged.get(number, []):
                parts.append(f'<circle cx="{xs[number]:.1f}" cy="{y_of(count):.1f}" r="4" fill="{PROBLEM}">'
                             f'<title>#{number} [{finding.severity}] {finding.check}: {escape(finding.text)}'
                             f'</title></circle>')
    return parts


def _events(items, xs, top, bottom, first_ns) -> list[str]:
    parts = []
    # Ring samples are drawn in the ring lane, not as event lines.
    events = [(number, record) for number, record, _message in items if record.kind == RecordKind.EVENT
              and record.event != EventKind.RING]
    for position, (number, record) in enumerate(events):
        x = xs[number]
        # A note gets the room up to the next event (about 6 px a character), the whole text stays in the tooltip.
        room = (xs[events[position + 1][0]] - x) / 6 - 6 if position + 1 < len(events) else 70
        limit = max(4, min(70, int(room)))
        note = record.note if len(record.note) <= limit else record.note[:limit - 1] + "…"
        parts.append(f'<g class="event" data-number="{number}"><title>#{number} '
                     f'{_time_text((record.timestamp_ns - first_ns) / 1e9)} {escape(record.note)}</title>'
                     f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{bottom}" stroke="#7a1f7a" '
                     f'stroke-width="1.5" stroke-dasharray="5,3"/>'
                     f'<text x="{x + 3:.1f}" y="{top + 14}" class="note">#{number} {escape(note)}</text></g>')
    return parts


def _ruler(seen, xs, y, first_ns) -> list[str]:
    parts = [f'<line x1="{LEFT}" y1="{y}" x2="{max(xs.values(), default=LEFT) + 20:.1f}" y2="{y}" stroke="#999"/>']
    last_x = -1e9
    final = seen[-1][0] if seen else None
    for number, record, _message in seen:
        x = xs[number]
        # Events and the last record always get their time; other ticks keep their labels apart.
        if x - last_x < 70 and not (record.kind == RecordKind.EVENT or number == final) or x - last_x < 40:
            continue
        last_x = x
        parts.append(f'<line x1="{x:.1f}" y1="{y - 4}" x2="{x:.1f}" y2="{y + 4}" stroke="#999"/>'
                     f'<text x="{x:.1f}" y="{y + 16}" class="tick" text-anchor="middle">'
                     f'{_time_text((record.timestamp_ns - first_ns) / 1e9)}</text>')
    return parts


class Timeline:
    """Collects what the picture needs while the capture is read: the records themselves up to DETAIL_LIMIT, then
    per-lane time buckets (messages and findings per bucket, events per connection) whose number stays bounded:
    when a record falls beyond the last column, the bucket width doubles and neighbouring buckets merge."""

    __slots__ = ("only", "detail_limit", "columns", "seen", "origin_ns", "width_ns", "lanes",
                 "events", "raised", "rings", "_ring_counts", "_index", "_start_ns", "_end_ns",
                 "_entries")

    def __init__(self, only: int | None = None, detail_limit: int = DETAIL_LIMIT, columns: int = COLUMNS):
        self.only = only
        self.detail_limit = detail_limit
        self.columns = columns
        self.seen: list[tuple[int, Record, Message | None]] | None = []
        self.origin_ns = 0
        self.width_ns = 1
        # (connection, channel, direction) -> bucket -> [messages, findings raised]
        self.lanes: dict[tuple[int, Channel, Direction], dict[int, list]] = {}
        # connection -> bucket -> [events, first note]
        self.events: dict[int, dict[int, list]] = {}
        self.raised: dict[int, int] = {}    # while detailed: record number -> findings raised as it was fed
        # (connection, ring) -> bucket -> [used, avail (unwrapped, as of the bucket's last sample), findings, kicks,
        # calls]; and the unwrapping's state: (connection, ring) -> [last used_idx, last avail_idx, used, avail]
        self.rings: dict[tuple[int, int], dict[int, list]] = {}
        self._ring_counts: dict[tuple[int, int], list[int]] = {}
        # add's last bucket: its index, and the times it holds (none until add meets a message bucketed)
        self._index = self._start_ns = self._end_ns = 0
        self._entries: dict[tuple[int, Channel, Direction], list] = {}     # lane -> [messages, findings] of that bucket

    @property
    def detailed(self) -> bool:
        return self.seen is not None

    @property
    def messages(self) -> int:
        """The messages added (of the connection shown): those kept, or those counted in the lanes' buckets."""
        if self.seen is not None:
            return sum(record.kind is _MESSAGE for _number, record, _message in self.seen)
        return sum(entry[0] for lane in self.lanes.values() for entry in lane.values())

    def add(self, number: int, record: Record, message: Message | None, found: list[Finding]) -> bool:
        """One record (and the findings feeding it raised); False once the timeline buckets by time."""
        if self.seen is None and record.kind is _MESSAGE and (self.only is None or record.connection == self.only):
            # bucketed, a message: _count's steps inline (the common case)
            timestamp = record.timestamp_ns
            if not self._start_ns <= timestamp < self._end_ns:     # not in the bucket of the message before
                self._index = self._bucket(timestamp)
                self._entries = {}
                if timestamp >= self.origin_ns:
                    self._start_ns = self.origin_ns + self._index * self.width_ns
                    self._end_ns = self._start_ns + self.width_ns
            key = (record.connection, record.channel, record.direction)
            entry = self._entries.get(key)
            if entry is None:
                lane = self.lanes.get(key)
                if lane is None:
                    lane = self.lanes[key] = {}
                entry = lane.get(self._index)
                if entry is None:
                    entry = lane[self._index] = [0, 0]
                self._entries[key] = entry
            entry[0] += 1
            if found or message is not None and message.problems:
                entry[1] += len(found) + bool(message is not None and message.problems)
            return False
        if self.only is not None and record.connection != self.only:
            return self.seen is not None
        if self.seen is not None:
            self.seen.append((number, record, message))
            if found:
                self.raised[number] = len(found)
            if len(self.seen) <= self.detail_limit:
                return True
            self._to_buckets()
            return False
        self._count(record, message, len(found))
        return False

    def _to_buckets(self) -> None:
        seen, self.seen = self.seen or [], None
        times = [r.timestamp_ns for _n, r, _m in seen]
        self.origin_ns = min(times)
        self.width_ns = max(1, -(-(max(times) - self.origin_ns + 1) // self.columns))
        for number, record, message in seen:
            self._count(record, message, self.raised.get(number, 0))
        self.raised = {}

    def _bucket(self, timestamp_ns: int) -> int:
        index = max(0, timestamp_ns - self.origin_ns) // self.width_ns
        while index >= self.columns:
            self._start_ns = self._end_ns = 0        # add's bucket of the message before is no longer one
            self.width_ns *= 2
            index //= 2
            for buckets in (*self.lanes.values(), *self.events.values()):
                merged: dict[int, list] = {}
                for old, entry in buckets.items():
                    into = merged.get(old // 2)
                    if into is None:
                        merged[old // 2] = entry
                    else:
                        into[0] += entry[0]
                        if isinstance(into[1], int):
                            into[1] += entry[1]
                buckets.clear()
                buckets.update(merged)
            for buckets in self.rings.values():
                kept: dict[int, list] = {}
                for old, entry in sorted(buckets.items()):
                    into = kept.get(old // 2)
                    if into is not None:        # the later bucket's indexes stand, the findings add up
                        entry[2] += into[2]
                    kept[old // 2] = entry
                buckets.clear()
                buckets.update(kept)
        return index

    def _count(self, record: Record, message: Message | None, findings: int) -> None:
        index = self._bucket(record.timestamp_ns)
        if record.kind != RecordKind.MESSAGE:
            if record.event == EventKind.RING:       # samples are not event lines (the ring lane draws them)
                self._count_ring(record, index, findings)
            else:
                self.events.setdefault(record.connection, {}).setdefault(index, [0, record.note])[0] += 1
            return
        lane = self.lanes.setdefault((record.connection, record.channel, record.direction), {})
        entry = lane.get(index)
        if entry is None:
            entry = lane[index] = [0, 0]
        entry[0] += 1
        entry[1] += findings + bool(message is not None and message.problems)

    def _count_ring(self, record: Record, index: int, findings: int) -> None:
        try:
            sample = unpack_sample(record.data)
        except SampleError:
            return
        if not sample.mapped:
            return
        key = (record.connection, sample.ring)
        counts = self._ring_counts.get(key)
        if counts is None:
            counts = self._ring_counts[key] = [sample.used_idx, sample.avail_idx, 0, 0]
        # As _unwrapped: free-running 16-bit indexes as counts that only grow.
        counts[2] += (sample.used_idx - counts[0]) & 0xFFFF
        counts[3] += (sample.avail_idx - counts[1]) & 0xFFFF
        counts[0], counts[1] = sample.used_idx, sample.avail_idx
        buckets = self.rings.setdefault(key, {})
        raised = buckets[index][2] if index in buckets else 0
        buckets[index] = [counts[2], counts[3], raised + findings, sample.kicks, sample.calls]

    def render(self, analyzer: Analyzer, title: str = "") -> str:
        if self.seen is not None:
            return render_svg(self.seen, analyzer, title)
        return _render_buckets(self, analyzer, title)


def _render_buckets(timeline: Timeline, analyzer: Analyzer, title: str) -> str:
    """The bucketed picture: per connection a band, per channel two lanes of bars over a linear time axis."""
    width = LEFT + 20 + timeline.columns * COLUMN_WIDTH + 60
    peak = max((entry[0] for lane in timeline.lanes.values() for entry in lane.values()), default=1)
    scale = (BUCKET_LANE - 8) / math.log10(1 + peak)
    parts: list[str] = []
    y = TOP
    connections = sorted({key[0] for key in timeline.lanes} | set(timeline.events) | {key[0] for key in timeline.rings})
    for connection in connections:
        state = analyzer.state(connection)
        channels = sorted({key[1] for key in timeline.lanes if key[0] == connection} | {Channel.MAIN})
        band_top = y
        parts.append(_band_heading(y, connection, state))
        y += EVENT_STRIP
        for channel in channels:
            for direction in (Direction.FRONTEND_TO_BACKEND, Direction.BACKEND_TO_FRONTEND):
                shade = "#f4f7fb" if direction == Direction.FRONTEND_TO_BACKEND else "#fbf8f2"
                parts.append(f'<rect x="0" y="{y}" width="{width}" height="{BUCKET_LANE}" fill="{shade}"/>')
                parts.append(f'<text x="8" y="{y + BUCKET_LANE / 2 + 4}" class="lane">{channel.name.lower()} '
                             f'{direction.arrow}</text>')
                lane = timeline.lanes.get((connection, channel, direction), {})
                parts += _bars(timeline, lane, y, scale, COLOURS.get(channel, "#444"))
                y += BUCKET_LANE
        rings = {ring: buckets for (owner, ring), buckets in timeline.rings.items() if owner == connection}
        if rings:
            parts += _bucketed_ring_lane(timeline, rings, y, width)
            y += RING_LANE
        for index, (count, note) in sorted(timeline.events.get(connection, {}).items()):
            x = LEFT + 20 + index * COLUMN_WIDTH
            text = escape(note if count == 1 else f"{note} (and {count - 1} more event(s))")
            parts.append(f'<g class="event"><title>{_bucket_time(timeline, index)}: {text}</title>'
                         f'<line x1="{x:.1f}" y1="{band_top - 4}" x2="{x:.1f}" y2="{y}" stroke="#7a1f7a" '
                         f'stroke-width="1" stroke-dasharray="5,3"/></g>')
        y += BAND_GAP
    ruler_y = y - BAND_GAP + 40
    parts.append(f'<line x1="{LEFT + 20}" y1="{ruler_y}" x2="{LEFT + 20 + timeline.columns * COLUMN_WIDTH}" '
                 f'y2="{ruler_y}" stroke="#999"/>')
    for index in range(0, timeline.columns + 1, 100):
        x = LEFT + 20 + index * COLUMN_WIDTH
        seconds = index * timeline.width_ns / 1e9
        parts.append(f'<line x1="{x}" y1="{ruler_y - 4}" x2="{x}" y2="{ruler_y + 4}" stroke="#999"/>'
                     f'<text x="{x}" y="{ruler_y + 16}" class="tick" text-anchor="middle">'
                     f'{_time_text(seconds)}</text>')
    height = int(y + 40)
    header = escape(title) if title else "vhusniff timeline"
    header += f" ({timeline.messages:,} messages, by time: {_time_text(timeline.width_ns / 1e9)} a bar)"
    return _svg_document(width, height, header, parts)


def _bucket_time(timeline: Timeline, index: int) -> str:
    start = index * timeline.width_ns / 1e9
    return f"{_time_text(start)} to {_time_text(start + timeline.width_ns / 1e9)}"


def _bars(timeline: Timeline, lane: dict[int, list], top: float, scale: float, colour: str) -> list[str]:
    parts = []
    bottom = top + BUCKET_LANE - 4
    for index, (count, flagged) in sorted(lane.items()):
        x = LEFT + 20 + index * COLUMN_WIDTH
        height = max(1.0, math.log10(1 + count) * scale)
        tip = f"{_bucket_time(timeline, index)}: {count} messages" + (f", {flagged} finding(s)" if flagged else "")
        parts.append(f'<g class="bucket"><title>{tip}</title><rect x="{x}" y="{bottom - height:.1f}" '
                     f'width="{COLUMN_WIDTH}" height="{height:.1f}" fill="{colour}"/>'
                     + (f'<rect x="{x}" y="{bottom - height:.1f}" width="{COLUMN_WIDTH}" height="3" '
                        f'fill="{PROBLEM}"/>' if flagged else "") + "</g>")
    return parts


def _bucketed_ring_lane(timeline: Timeline, rings: dict[int, dict[int, list]], top: float, width: int) -> list[str]:
    """The ring lane by time: per ring the used (solid) and avail (dashed) counts at each bucket's last sample,
    a red dot where a bucket's samples raised a finding."""
    parts = [f'<rect x="0" y="{top}" width="{width}" height="{RING_LANE}" fill="#f3faf7"/>',
             f'<text x="8" y="{top + RING_LANE / 2 + 4}" class="lane">rings (used, avail)</text>']
    peak = max((entry[1] for buckets in rings.values() for entry in buckets.values()), default=0) or 1
    bottom = top + RING_LANE - 8

    def y_of(count: int) -> float:
        return bottom - (RING_LANE - 20) * count / peak

    for position, (ring, buckets) in enumerate(sorted(rings.items())):
        colour = RING_COLOURS[position % len(RING_COLOURS)]
        columns = sorted(buckets.items())
        used, avail, _found, kicks, calls = columns[-1][1]
        tip = f"ring {ring}: {used} used, {avail} made available, {kicks} kicks, {calls} calls"
        for field, dash in ((0, ""), (1, ' stroke-dasharray="4,3"')):
            points = " ".join(f"{LEFT + 20 + index * COLUMN_WIDTH + 1},{y_of(entry[field]):.1f}"
                              for index, entry in columns)
            parts.append(f'<polyline class="ring" data-ring="{ring}" points="{points}" fill="none" '
                         f'stroke="{colour}" stroke-width="1.6"{dash}><title>{escape(tip)}</title></polyline>')
        parts.append(f'<text x="{LEFT + 20 + columns[-1][0] * COLUMN_WIDTH + 6}" y="{y_of(used) + 4:.1f}" '
                     f'class="name" style="fill:{colour}">ring {ring}</text>')
        for index, entry in columns:
            if entry[2]:
                parts.append(f'<circle cx="{LEFT + 20 + index * COLUMN_WIDTH + 1}" cy="{y_of(entry[0]):.1f}" r="4" '
                             f'fill="{PROBLEM}"><title>{_bucket_time(timeline, index)}: ring {ring}, '
                             f'{entry[2]} finding(s)</title></circle>')
    return parts


def _band_heading(y: float, connection: int, state) -> str:
    return (f'<text x="8" y="{y - 10}" class="band">connection {connection} '
            f'({escape(state.device_type or "unknown device")}), {state.messages} messages</text>')


def _svg_document(width: int, height: float, header: str, parts: list[str], arrows: bool = False) -> str:
    """The SVG around a picture's parts: its styles, the arrow head message arrows use, a white page, the title."""
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif">',
        "<style>.band{font-size:13px;font-weight:bold}.lane{font-size:12px;fill:#333}"
        ".name{font-size:10px;fill:#222}.rt{font-size:9px;fill:#555}.tick{font-size:9px;fill:#555}"
        ".note{font-size:10px;fill:#7a1f7a}</style>",
        *(['<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
           'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker></defs>'] if arrows else []),
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="8" y="16" class="band">{header}</text>',
        *parts,
        "</svg>",
    ])


def render_html(svg: str, title: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>vhusniff timeline {escape(title)}</title>"
            f"</head><body style='margin:0'>\n{svg}\n</body></html>\n")
