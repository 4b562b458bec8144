package cdc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
)

// LSN is a position in the write-ahead log.
type LSN = pglogrepl.LSN

// Value is one column of a decoded row, in Postgres text format.
type Value struct {
	// Kind is 'n' for NULL, 'u' for an unchanged TOASTed value (not sent:
	// the old value still holds), 't' for a text-format value in Data.
	Kind byte
	// Data is the text-format value when Kind is 't'. It points into memory
	// owned by the Txn and stays valid as long as the Txn is referenced.
	Data []byte
}

// IsNull reports whether the value is SQL NULL.
func (v Value) IsNull() bool { return v.Kind == 'n' }

// Column describes one published column of a relation.
type Column struct {
	Name    string
	TypeOID uint32
	Key     bool // part of the replica identity (the primary key by default)
}

// Relation describes a published table as pgoutput announced it. A Relation
// is immutable once decoded: a schema change produces a new *Relation, so
// Changes decoded earlier keep the columns they were decoded with.
type Relation struct {
	ID        uint32
	Namespace string
	Name      string
	Columns   []Column
}

// ColumnIndex returns the position of the named column in Columns and in
// every Value slice of a Change on this relation, or -1 if absent.
func (r *Relation) ColumnIndex(name string) int {
	for i := range r.Columns {
		if r.Columns[i].Name == name {
			return i
		}
	}
	return -1
}

// Op is the kind of row change.
type Op uint8

// Row change kinds.
const (
	Insert Op = iota + 1
	Update
	Delete
)

func (o Op) String() string {
	switch o {
	case Insert:
		return "insert"
	case Update:
		return "update"
	case Delete:
		return "delete"
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// Change is one row change inside a transaction.
type Change struct {
	Rel *Relation
	Op  Op
	// New is the new row for Insert and Update, one Value per Rel.Columns.
	New []Value
	// Old is the old row for Delete (key columns only, others 'n', unless
	// the table has REPLICA IDENTITY FULL), and for Update the old key when
	// the key changed (or the full old row under REPLICA IDENTITY FULL);
	// nil otherwise.
	Old []Value
}

// Txn is one committed transaction with its changes to published tables.
type Txn struct {
	XID        uint32
	CommitLSN  LSN       // start of the commit record
	EndLSN     LSN       // end of the commit record: confirming EndLSN means this txn is never sent again
	CommitTime time.Time // commit timestamp as recorded by Postgres
	Changes    []Change  // in WAL order
	// More marks a part of a transaction too large to hold whole (see
	// Config.MaxBatchBytes): later Txns with the same XID and CommitLSN
	// carry the rest of its changes, in order, and the last of them, with
	// More false, its EndLSN. A part's EndLSN is zero. pgoutput sends a
	// transaction only once it has committed, so a part is committed.
	More bool
	// first is the index in the whole transaction of Changes[0].
	first int
	// Truncated lists the relations truncated in this transaction (TRUNCATE
	// is published only if the publication includes it; ours does not).
	Truncated []*Relation
}

// ErrMalformed is wrapped by every error Decode returns for input that is
// not a valid pgoutput protocol version 1 message.
var ErrMalformed = errors.New("malformed pgoutput message")

// Decoder turns pgoutput (protocol version 1) messages into transactions.
// It is pure: bytes in, transactions out, no I/O. It keeps the relation
// cache between transactions, so one Decoder must see every message of one
// replication stream in order. A Decoder is not safe for concurrent use.
type Decoder struct {
	rels map[uint32]*Relation
	txn  *Txn // open transaction, nil between Commit and Begin

	// Per-transaction arenas: tuple bytes and Value slots are carved out of
	// chunks owned by the open Txn instead of one allocation per column.
	// A chunk is never written again once a later chunk replaces it, so
	// slices handed out earlier stay valid.
	bytes  []byte
	values []Value
}

// NewDecoder returns a Decoder with an empty relation cache.
func NewDecoder() *Decoder {
	return &Decoder{rels: make(map[uint32]*Relation)}
}

// Relation returns the cached relation with the given ID, or nil.
func (d *Decoder) Relation(id uint32) *Relation { return d.rels[id] }

// InTxn reports whether a Begin was decoded without its Commit.
func (d *Decoder) InTxn() bool { return d.txn != nil }

// Split ends the open transaction's current part, if it has changes: it
// returns them as a Txn with More set, and the transaction goes on in a
// new part. The returned Txn shares no memory with what is decoded next.
func (d *Decoder) Split() *Txn {
	t := d.txn
	if t == nil || len(t.Changes) == 0 {
		return nil
	}
	part := *t
	part.More = true
	d.txn = &Txn{XID: t.XID, CommitLSN: t.CommitLSN, CommitTime: t.CommitTime, first: t.first + len(t.Changes)}
	d.bytes, d.values = nil, nil
	return &part
}

// Reset forgets the open transaction (for example after a reconnect, where
// the server starts again with a Begin). The relation cache is kept:
// pgoutput sends a Relation message again before using it on a new stream.
func (d *Decoder) Reset() { d.txn = nil; d.bytes = nil; d.values = nil }

const (
	minBytesChunk  = 512
	maxBytesChunk  = 64 << 10
	minValuesChunk = 16
	maxValuesChunk = 4096
)

// Decode decodes one pgoutput message (XLogData.WALData). It returns the
// complete transaction when msg is a Commit, and nil otherwise. The
// returned Txn does not reference msg, which the caller may reuse.
// Message types the relay does not need (Origin, Type, logical decoding
// Message) are accepted and ignored.
func (d *Decoder) Decode(msg []byte) (*Txn, error) {
	if len(msg) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrMalformed)
	}
	r := reader{b: msg[1:]}
	switch msg[0] {
	case 'B':
		lsn, ts, xid := r.u64(), r.u64(), r.u32()
		if r.err != nil {
			return nil, r.fail("begin")
		}
		if d.txn != nil {
			return nil, fmt.Errorf("%w: begin of xid %d inside open xid %d", ErrMalformed, xid, d.txn.XID)
		}
		d.txn = &Txn{XID: xid, CommitLSN: LSN(lsn), CommitTime: pgTime(int64(ts))}
		d.bytes, d.values = nil, nil
		return nil, nil

	case 'C':
		_ = r.u8() // flags, unused
		commit, end, ts := r.u64(), r.u64(), r.u64()
		if r.err != nil {
			return nil, r.fail("commit")
		}
		t := d.txn
		if t == nil {
			return nil, fmt.Errorf("%w: commit at %s without begin", ErrMalformed, LSN(commit))
		}
		t.CommitLSN, t.EndLSN, t.CommitTime = LSN(commit), LSN(end), pgTime(int64(ts))
		d.txn, d.bytes, d.values = nil, nil, nil
		return t, nil

	case 'R':
		id := r.u32()
		rel := &Relation{ID: id, Namespace: r.str(), Name: r.str()}
		_ = r.u8() // replica identity setting
		n := r.u16()
		if r.err != nil {
			return nil, r.fail("relation")
		}
		// Each column needs at least 10 bytes; refuse counts the message
		// cannot hold before allocating for them.
		if int(n)*10 > len(r.b) {
			return nil, fmt.Errorf("%w: relation %d claims %d columns in %d bytes", ErrMalformed, id, n, len(r.b))
		}
		rel.Columns = make([]Column, n)
		for i := range rel.Columns {
			c := &rel.Columns[i]
			c.Key = r.u8()&1 != 0
			c.Name = r.str()
			c.TypeOID = r.u32()
			_ = r.u32() // atttypmod
		}
		if r.err != nil {
			return nil, r.fail("relation")
		}
		d.rels[id] = rel
		return nil, nil

	case 'I', 'U', 'D':
		return nil, d.decodeChange(msg[0], &r)

	case 'T':
		n := r.u32()
		_ = r.u8() // options: CASCADE, RESTART IDENTITY
		if r.err != nil || uint64(n)*4 != uint64(len(r.b)) {
			return nil, fmt.Errorf("%w: truncate: bad length", ErrMalformed)
		}
		if d.txn == nil {
			return nil, fmt.Errorf("%w: truncate outside a transaction", ErrMalformed)
		}
		for i := uint32(0); i < n; i++ {
			id := r.u32()
			rel := d.rels[id]
			if rel == nil {
				return nil, fmt.Errorf("%w: truncate of unknown relation %d", ErrMalformed, id)
			}
			d.txn.Truncated = append(d.txn.Truncated, rel)
		}
		return nil, nil

	case 'O': // origin: LSN, name
		_ = r.u64()
		_ = r.str()
		if r.err != nil {
			return nil, r.fail("origin")
		}
		return nil, nil

	case 'Y': // type: OID, namespace, name
		_ = r.u32()
		_ = r.str()
		_ = r.str()
		if r.err != nil {
			return nil, r.fail("type")
		}
		return nil, nil

	case 'M': // logical decoding message: flags, LSN, prefix, length, content
		_ = r.u8()
		_ = r.u64()
		_ = r.str()
		n := r.u32()
		if r.err != nil || uint64(n) != uint64(len(r.b)) {
			return nil, fmt.Errorf("%w: message: bad length", ErrMalformed)
		}
		return nil, nil
	}
	return nil, fmt.Errorf("%w: unknown message type %q", ErrMalformed, msg[0])
}

func (d *Decoder) decodeChange(kind byte, r *reader) error {
	id := r.u32()
	if r.err != nil {
		return r.fail(opName(kind))
	}
	t := d.txn
	if t == nil {
		return fmt.Errorf("%w: %s outside a transaction", ErrMalformed, opName(kind))
	}
	rel := d.rels[id]
	if rel == nil {
		return fmt.Errorf("%w: %s on relation %d before its Relation message", ErrMalformed, opName(kind), id)
	}
	ch := Change{Rel: rel}
	var err error
	switch kind {
	case 'I':
		ch.Op = Insert
		if r.u8() != 'N' {
			return fmt.Errorf("%w: insert: expected 'N'", ErrMalformed)
		}
		ch.New, err = d.tuple(rel, r)
	case 'U':
		ch.Op = Update
		tag := r.u8()
		if tag == 'K' || tag == 'O' {
			if ch.Old, err = d.tuple(rel, r); err != nil {
				return err
			}
			tag = r.u8()
		}
		if tag != 'N' {
			return fmt.Errorf("%w: update: expected 'N'", ErrMalformed)
		}
		ch.New, err = d.tuple(rel, r)
	case 'D':
		ch.Op = Delete
		if tag := r.u8(); tag != 'K' && tag != 'O' {
			return fmt.Errorf("%w: delete: expected 'K' or 'O'", ErrMalformed)
		}
		ch.Old, err = d.tuple(rel, r)
	}
	if err != nil {
		return err
	}
	if len(r.b) != 0 {
		return fmt.Errorf("%w: %s: %d trailing bytes", ErrMalformed, opName(kind), len(r.b))
	}
	t.Changes = append(t.Changes, ch)
	return nil
}

// tuple decodes TupleData into Values carved from the transaction arena.
func (d *Decoder) tuple(rel *Relation, r *reader) ([]Value, error) {
	n := int(r.u16())
	if r.err != nil {
		return nil, r.fail("tuple")
	}
	if n != len(rel.Columns) {
		return nil, fmt.Errorf("%w: tuple has %d columns, relation %s.%s has %d", ErrMalformed, n, rel.Namespace, rel.Name, len(rel.Columns))
	}
	// Reserve the Value slots and the bytes of the whole tuple at once: a
	// first pass over the lengths costs little and keeps the arena simple.
	if len(d.values)+n > cap(d.values) {
		d.values = make([]Value, 0, grow(cap(d.values), n, minValuesChunk, maxValuesChunk))
	}
	start := len(d.values)
	vals := d.values[start : start+n : start+n]
	d.values = d.values[:start+n]

	size, ok := tupleSize(r.b, n)
	if !ok {
		return nil, fmt.Errorf("%w: tuple of %s.%s truncated or with a bad column kind", ErrMalformed, rel.Namespace, rel.Name)
	}
	if len(d.bytes)+size > cap(d.bytes) {
		d.bytes = make([]byte, 0, grow(cap(d.bytes), size, minBytesChunk, maxBytesChunk))
	}
	for i := range vals {
		k := r.b[0]
		r.b = r.b[1:]
		switch k {
		case 'n', 'u':
			vals[i] = Value{Kind: k}
		case 't':
			l := int(binary.BigEndian.Uint32(r.b))
			at := len(d.bytes)
			d.bytes = append(d.bytes, r.b[4:4+l]...)
			vals[i] = Value{Kind: 't', Data: d.bytes[at : at+l : at+l]}
			r.b = r.b[4+l:]
		}
	}
	return vals, nil
}

// tupleSize validates n columns of TupleData in b and returns the total
// length of their text values.
func tupleSize(b []byte, n int) (int, bool) {
	size := 0
	for i := 0; i < n; i++ {
		if len(b) < 1 {
			return 0, false
		}
		k := b[0]
		b = b[1:]
		switch k {
		case 'n', 'u':
		case 't':
			if len(b) < 4 {
				return 0, false
			}
			l := binary.BigEndian.Uint32(b)
			if uint64(l) > uint64(len(b)-4) {
				return 0, false
			}
			size += int(l)
			b = b[4+l:]
		default: // 'b' (binary) exists only in protocol version 2 with binary on
			return 0, false
		}
	}
	return size, true
}

// grow picks the next arena chunk size: at least need, otherwise double the
// previous chunk within [lo, hi], so a one-row transaction stays small and
// a large one allocates a chunk per many rows.
func grow(prev, need, lo, hi int) int {
	c := max(lo, min(prev*2, hi))
	return max(c, need)
}

func opName(kind byte) string {
	switch kind {
	case 'I':
		return "insert"
	case 'U':
		return "update"
	case 'D':
		return "delete"
	}
	return string(kind)
}

// reader reads big-endian fields; after the first short read every read
// returns zero and err is set, so callers check once per message.
type reader struct {
	b   []byte
	err error
}

var errShort = errors.New("message too short")

func (r *reader) take(n int) []byte {
	if r.err != nil || len(r.b) < n {
		r.err = errShort
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() byte {
	if v := r.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if v := r.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if v := r.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if v := r.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// str reads a NUL-terminated string.
func (r *reader) str() string {
	if r.err != nil {
		return ""
	}
	for i, c := range r.b {
		if c == 0 {
			s := string(r.b[:i])
			r.b = r.b[i+1:]
			return s
		}
	}
	r.err = errors.New("unterminated string")
	return ""
}

func (r *reader) fail(what string) error {
	return fmt.Errorf("%w: %s: %v", ErrMalformed, what, r.err)
}

// pgTime converts microseconds since 2000-01-01 UTC to a time.Time.
func pgTime(us int64) time.Time {
	const unixToY2K = 946684800
	return time.Unix(unixToY2K, 0).Add(time.Duration(us) * time.Microsecond).UTC()
}
