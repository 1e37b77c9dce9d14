"""A bound on the decoded size of a QPACK field section, computed before decoding.

pylsqpack decodes a header block in one call and has no limit on what it
produces: a 60 KB block that refers 60,000 times to one 3.9 KB dynamic-table
entry decodes to 234 MB (a "QPACK bomb"), seconds of the event loop and
hundreds of MiB, before anything can look at the result. HTTP/3 limits the
decoded size instead (SETTINGS_MAX_FIELD_SECTION_SIZE, RFC 9114 section 4.2.2;
RFC 9204 section 7.3 asks decoders to enforce it while decoding).

:class:`FieldSectionBound` reads the wire format only: it follows the peer's
encoder stream to know an upper bound of every dynamic-table entry's name and
value length, and walks a header block's field-line prefixes (RFC 9204 sections
4.3 and 4.5) to add up an upper bound of its decoded size, in the RFC 9114 sense
(name + value + 32 bytes per field), without decoding a string. A Huffman-coded
string of ``n`` bytes decodes to at most ``8n/5`` bytes (the shortest code is 5
bits); an entry the bound has lost track of counts as the whole table capacity
(no entry can be larger). The bound is therefore never below the decoded size,
and is exact for strings sent without Huffman coding. pylsqpack still does the
decoding, and remains the judge of what is malformed.
"""

from __future__ import annotations

from collections import deque

FIELD_OVERHEAD = 32
"""Bytes added per field to its name and value (RFC 9114 section 4.2.2, RFC 9204 3.2.1)."""

MAX_STATIC_NAME = 64
"""Longer than any name in the QPACK static table (RFC 9204 appendix A)."""

MAX_STATIC_FIELD = 128
"""Longer than any name plus value in the QPACK static table."""

FOLLOWED_ENCODER_BYTES = 64 * 1024
"""Encoder-stream bytes a bound follows instruction by instruction, plus
:data:`FOLLOWED_ENCODER_BYTES_PER_SECTION` for each header section it bounded: past
them it stops following (every dynamic entry counts as large as the table then, as for
an encoder stream it cannot parse). Following costs a Python step per instruction, and
an instruction can be one byte (Duplicate): a peer sending a megabyte of them a second
held a core (pylsqpack itself, in C, takes 2 % of that time). A legitimate encoder
inserts at most a header section's worth of entries for each section, a few hundred
bytes for a CONNECT."""

FOLLOWED_ENCODER_BYTES_PER_SECTION = 1024


class QpackFormatError(ValueError):
    """The bytes are not a well-formed QPACK instruction or field line."""


def _integer(data: bytes | bytearray, pos: int, prefix: int) -> tuple[int, int]:
    """Decode a prefix integer (RFC 7541 5.1) whose prefix is the low ``prefix`` bits
    of ``data[pos]``; return (value, next position). IndexError when incomplete.

    Continuation bytes that add nothing (``0x80``) are read as pylsqpack reads them
    (it takes up to 8 of them before the last byte): a bound that refused such an
    integer would leave the section to pylsqpack unbounded."""
    mask = (1 << prefix) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise QpackFormatError("integer longer than 64 bits")


def _string(data: bytes | bytearray, pos: int, prefix: int) -> tuple[int, int]:
    """Skip a string literal whose H bit sits just above its ``prefix``-bit length;
    return (upper bound of its decoded length, next position)."""
    huffman = data[pos] & (1 << prefix)
    length, pos = _integer(data, pos, prefix)
    end = pos + length
    if end > len(data):
        raise IndexError("string literal incomplete")
    return (length * 8 // 5 if huffman else length), end


class FieldSectionBound:
    """Upper bounds of decoded field-section sizes on one HTTP/3 connection.

    :param max_table_capacity: the SETTINGS_QPACK_MAX_TABLE_CAPACITY this decoder
        announced (needed to decode the Required Insert Count).

    Feed it what the peer's encoder stream carries (:meth:`feed_encoder`), in
    order, before the header blocks that depend on it; ask :meth:`section_size`
    for each header block.
    """

    def __init__(self, max_table_capacity: int) -> None:
        self.max_table_capacity = max_table_capacity
        self.capacity = 0
        """The dynamic table capacity the encoder set last."""
        self._entries: deque[tuple[int, int]] = deque()
        """(name, value) length bounds of the entries still in the table, oldest first."""
        self._used = 0
        self._inserted = 0
        """Entries inserted since the start (the absolute index of the next one)."""
        self._pending = bytearray()
        self.broken = False
        """The encoder stream could not be parsed, or is no longer followed (past
        :data:`FOLLOWED_ENCODER_BYTES`): every entry counts as the capacity."""
        self._followed = 0
        """Encoder-stream bytes fed so far."""
        self._sections = 0
        """Header sections bounded so far."""

    # -- encoder stream ------------------------------------------------------------

    def feed_encoder(self, data: bytes) -> None:
        """Follow encoder instructions (RFC 9204 section 4.3); a partial one waits."""
        self._followed += len(data)
        if self.broken:
            return
        if self._followed > self.encoder_allowance(1):
            self._give_up()
            return
        self._pending += data
        buf = self._pending
        pos = 0
        try:
            while pos < len(buf):
                pos = self._instruction(buf, pos)
        except IndexError:
            pass  # the rest of the instruction has not arrived yet
        except QpackFormatError:
            # pylsqpack will refuse the stream too; from now on assume the worst.
            self._give_up()
            return
        del buf[:pos]

    @property
    def encoder_bytes(self) -> int:
        """Encoder-stream bytes fed so far."""
        return self._followed

    def encoder_allowance(self, times: int) -> int:
        """``times`` the encoder-stream bytes followed for the sections bounded so far
        (:data:`FOLLOWED_ENCODER_BYTES`)."""
        return times * (
            FOLLOWED_ENCODER_BYTES + FOLLOWED_ENCODER_BYTES_PER_SECTION * self._sections
        )

    def _give_up(self) -> None:
        """Stop following the encoder stream: from now on assume the worst."""
        self.broken = True
        self._entries.clear()
        self._pending.clear()

    def _instruction(self, buf: bytearray, pos: int) -> int:
        first = buf[pos]
        if first & 0x80:  # Insert with Name Reference: 1 T index(6) value
            static = bool(first & 0x40)
            index, pos = _integer(buf, pos, 6)
            name = MAX_STATIC_NAME if static else self._relative(index)[0]
            value, pos = _string(buf, pos, 7)
            self._insert(name, value)
        elif first & 0x40:  # Insert with Literal Name: 01 H length(5) name value
            name, pos = _string(buf, pos, 5)
            value, pos = _string(buf, pos, 7)
            self._insert(name, value)
        elif first & 0x20:  # Set Dynamic Table Capacity: 001 capacity(5)
            capacity, pos = _integer(buf, pos, 5)
            if capacity > self.max_table_capacity:
                raise QpackFormatError("table capacity above the announced maximum")
            self.capacity = capacity
            self._evict(0)
        else:  # Duplicate: 000 index(5)
            index, pos = _integer(buf, pos, 5)
            self._insert(*self._relative(index))
        return pos

    def _relative(self, index: int) -> tuple[int, int]:
        """The entry ``index`` places before the newest (encoder-stream relative)."""
        return self._absolute(self._inserted - 1 - index)

    def _absolute(self, index: int) -> tuple[int, int]:
        first = self._inserted - len(self._entries)
        if first <= index < self._inserted and not self.broken:
            return self._entries[index - first]
        # Evicted by our (pessimistic) sizes but maybe not by the real table: no
        # entry is larger than the capacity now. Not inserted yet, or no longer
        # followed: the encoder may raise the capacity to the announced maximum
        # first (a bound of the capacity last seen, 0, let a table of 4 KiB entries
        # through once the stream was no longer followed).
        if self.broken or index >= self._inserted:
            bound = self.max_table_capacity
        else:
            bound = max(self.capacity, 0)
        return bound, bound

    def _insert(self, name: int, value: int) -> None:
        size = name + value + FIELD_OVERHEAD
        if size > self.capacity:
            # A real entry that large is an encoder stream error; a bound that large
            # only means Huffman coding made us pessimistic.
            name = min(name, self.capacity)
            value = min(value, self.capacity)
            size = self.capacity
        self._evict(size)
        self._entries.append((name, value))
        self._used += min(name + value + FIELD_OVERHEAD, self.capacity)
        self._inserted += 1

    def _evict(self, room: int) -> None:
        while self._entries and self._used + room > self.capacity:
            name, value = self._entries.popleft()
            self._used -= min(name + value + FIELD_OVERHEAD, self.capacity)
        if not self._entries:
            self._used = 0

    # -- header blocks ---------------------------------------------------------------

    def length_bound(self, block_length: int) -> int:
        """An upper bound of the decoded size of any header block of ``block_length``
        bytes, from its length alone (a block the walk of :meth:`section_size` cannot
        read, or one too short to need it): the shortest field line is one byte and
        refers to at most a table entry (no larger than the capacity announced,
        overhead included) or a static one (``MAX_STATIC_FIELD``, plus the overhead);
        every other line takes more bytes for less (a literal decodes to at most 8/5
        of its length)."""
        per_byte = max(self.max_table_capacity, MAX_STATIC_FIELD + FIELD_OVERHEAD)
        return block_length * per_byte

    def section_size(self, block: bytes, stop_above: int | None = None) -> int:
        """An upper bound of the decoded size of one header block (RFC 9204 4.5).

        :param stop_above: return as soon as the bound passes this many bytes (a
            bomb is refused after a few field lines, not after walking 60 KB).

        Raises :class:`QpackFormatError` if the block cannot be parsed.
        """
        self._sections += 1
        try:
            return self._section_size(block, stop_above)
        except IndexError:
            raise QpackFormatError("header block ends inside a field line") from None

    def _section_size(self, block: bytes, stop_above: int | None) -> int:
        encoded_insert_count, pos = _integer(block, 0, 8)
        required = self._required_insert_count(encoded_insert_count)
        negative = block[pos] & 0x80
        delta, pos = _integer(block, pos, 7)
        base = required - delta - 1 if negative else required + delta
        total = 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:  # Indexed Field Line: 1 T index(6)
                static = bool(first & 0x40)
                index, pos = _integer(block, pos, 6)
                size = MAX_STATIC_FIELD if static else sum(self._absolute(base - 1 - index))
            elif first & 0x40:  # Literal with Name Reference: 01 N T index(4) value
                static = bool(first & 0x10)
                index, pos = _integer(block, pos, 4)
                name = MAX_STATIC_NAME if static else self._absolute(base - 1 - index)[0]
                value, pos = _string(block, pos, 7)
                size = name + value
            elif first & 0x20:  # Literal with Literal Name: 001 N H length(3) name value
                name, pos = _string(block, pos, 3)
                value, pos = _string(block, pos, 7)
                size = name + value
            elif first & 0x10:  # Indexed Field Line with Post-Base Index: 0001 index(4)
                index, pos = _integer(block, pos, 4)
                size = sum(self._absolute(base + index))
            else:  # Literal with Post-Base Name Reference: 0000 N index(3) value
                index, pos = _integer(block, pos, 3)
                name = self._absolute(base + index)[0]
                value, pos = _string(block, pos, 7)
                size = name + value
            total += size + FIELD_OVERHEAD
            if stop_above is not None and total > stop_above:
                return total
        return total

    def _required_insert_count(self, encoded: int) -> int:
        """RFC 9204 section 4.5.1.1."""
        if encoded == 0:
            return 0
        if self.broken:
            # Inserts are no longer counted, so the count cannot be checked (a valid
            # block failed it, and its length alone then bounded it); every dynamic
            # reference counts as the whole table anyway.
            return encoded
        max_entries = self.max_table_capacity // 32
        full_range = 2 * max_entries
        if full_range == 0 or encoded > full_range:
            raise QpackFormatError("invalid Required Insert Count")
        max_value = self._inserted + max_entries
        max_wrapped = (max_value // full_range) * full_range
        required = max_wrapped + encoded - 1
        if required > max_value:
            if required <= full_range:
                raise QpackFormatError("invalid Required Insert Count")
            required -= full_range
        if required == 0:
            raise QpackFormatError("invalid Required Insert Count")
        return required
