package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// The status writer encodes COPY's binary format itself. pgx's CopyFrom
// first prepares a SELECT over the columns to learn their types (one more
// round trip and a parse per batch) and then encodes every value through
// pgtype's generic paths; on a backlog that was ~7 % of the relay's CPU.
// The columns and their types here are fixed by schema.sql, so the
// encoding is a handful of appends per value.

// copyBinaryHeader is the binary COPY signature, flags and header
// extension length.
var copyBinaryHeader = []byte("PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

// pgEpochMicros is 2000-01-01 00:00:00 UTC, the zero of Postgres's
// binary timestamps, in Unix microseconds.
const pgEpochMicros = 946684800 * 1_000_000

// copyEncoder builds one COPY ... FROM STDIN (FORMAT binary) stream.
type copyEncoder struct {
	b []byte
}

func (e *copyEncoder) reset() { e.b = append(e.b[:0], copyBinaryHeader...) }

func (e *copyEncoder) row(fields int) { e.b = binary.BigEndian.AppendUint16(e.b, uint16(fields)) }

func (e *copyEncoder) null() { e.b = binary.BigEndian.AppendUint32(e.b, math.MaxUint32) }

func (e *copyEncoder) text(s string) {
	e.b = binary.BigEndian.AppendUint32(e.b, uint32(len(s)))
	e.b = append(e.b, s...)
}

// textOrNull writes "" as NULL, as the rows' optional text columns want.
func (e *copyEncoder) textOrNull(s string) {
	if s == "" {
		e.null()
		return
	}
	e.text(s)
}

func (e *copyEncoder) int4(v int32) {
	e.b = binary.BigEndian.AppendUint32(e.b, 4)
	e.b = binary.BigEndian.AppendUint32(e.b, uint32(v))
}

// int4OrNull writes 0 as NULL.
func (e *copyEncoder) int4OrNull(v int) {
	if v == 0 {
		e.null()
		return
	}
	e.int4(int32(v))
}

func (e *copyEncoder) int8(v int64) {
	e.b = binary.BigEndian.AppendUint32(e.b, 8)
	e.b = binary.BigEndian.AppendUint64(e.b, uint64(v))
}

func (e *copyEncoder) float8(v float64) {
	e.b = binary.BigEndian.AppendUint32(e.b, 8)
	e.b = binary.BigEndian.AppendUint64(e.b, math.Float64bits(v))
}

// timestamptz writes the zero time as NULL.
func (e *copyEncoder) timestamptz(t time.Time) {
	if t.IsZero() {
		e.null()
		return
	}
	e.int8(t.UnixMicro() - pgEpochMicros)
}

func (e *copyEncoder) uuid(id [16]byte) {
	e.b = binary.BigEndian.AppendUint32(e.b, 16)
	e.b = append(e.b, id[:]...)
}

// jsonb writes JSON text in jsonb's binary input form (version 1, then
// the text, which the server parses); nil is NULL.
func (e *copyEncoder) jsonb(js []byte) {
	if js == nil {
		e.null()
		return
	}
	e.b = binary.BigEndian.AppendUint32(e.b, uint32(len(js)+1))
	e.b = append(e.b, 1)
	e.b = append(e.b, js...)
}

func (e *copyEncoder) finish() {
	e.b = binary.BigEndian.AppendUint16(e.b, math.MaxUint16) // -1: end of data
}

// copyStatement is COPY table (columns) FROM STDIN in binary format.
func copyStatement(table string, columns []string) string {
	return "COPY " + table + " (" + strings.Join(columns, ", ") + ") FROM STDIN (FORMAT binary)"
}

var (
	copyDeliveriesSQL = copyStatement("relay.deliveries", copyColumns)
	copyAttemptsSQL   = copyStatement("relay.attempts", attemptColumns)
)

// copyChunk is how much encoded data is buffered before the server gets
// it: payloads can be large, so a batch is streamed, not built whole.
const copyChunk = 64 << 10

// copyReader streams rows as binary COPY data, encoding them as the
// server's connection asks for more.
//
// When a COPY fails midway (a broken connection, a cancelled context),
// pgconn returns without waiting for its goroutine that reads from here.
// close, called once CopyFrom has returned, waits for a Read under way
// and makes every later one fail without touching the rows: the writer
// may put them back in its buffer, and reuse or clear that memory, at once.
type copyReader struct {
	mu     sync.Mutex
	closed bool
	enc    *copyEncoder
	rows   []*delivery
	encode func(e *copyEncoder, d *delivery)
	off    int  // read offset into enc.b
	ended  bool // the trailer is in enc.b
}

var errCopyAbandoned = errors.New("COPY abandoned")

func (c *copyReader) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
}

func (c *copyReader) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, errCopyAbandoned
	}
	if !c.ended && len(c.enc.b)-c.off < copyChunk {
		c.enc.b = append(c.enc.b[:0], c.enc.b[c.off:]...)
		c.off = 0
		for len(c.rows) > 0 && len(c.enc.b) < copyChunk {
			c.encode(c.enc, c.rows[0])
			c.rows = c.rows[1:]
		}
		if len(c.rows) == 0 {
			c.enc.finish()
			c.ended = true
		}
	}
	if c.off == len(c.enc.b) {
		return 0, io.EOF
	}
	n := copy(p, c.enc.b[c.off:])
	c.off += n
	return n, nil
}

// copy runs one binary COPY of rows on conn; sql may hold more
// statements after the COPY (a simple-protocol query).
func (e *copyEncoder) copy(ctx context.Context, conn *pgconn.PgConn, sql string, rows []*delivery, encode func(*copyEncoder, *delivery)) error {
	e.reset()
	r := &copyReader{enc: e, rows: rows, encode: encode}
	_, err := conn.CopyFrom(ctx, r, sql)
	r.close()
	if err == nil && cap(e.b) > 4*copyChunk {
		e.b = nil // one huge payload must not stay allocated
	}
	return err
}

// encodeDelivery appends one relay.deliveries row in copyColumns order.
func encodeDelivery(e *copyEncoder, d *delivery) {
	e.row(len(copyColumns))
	e.uuid(d.eventID)
	e.text(d.endpointID)
	e.text(d.tenantID)
	e.text(d.eventType)
	e.text(string(d.state))
	e.int4(int32(d.attempts))
	e.int4OrNull(d.httpStatus)
	e.textOrNull(d.errText)
	e.timestamptz(d.nextAttempt)
	if d.commitLSN == 0 { // unknown, as the upsert path writes it
		e.null()
	} else {
		e.int8(int64(d.commitLSN))
	}
	e.timestamptz(d.committedAt)
	e.timestamptz(d.firstAttempt)
	e.timestamptz(d.lastAttempt)
	e.timestamptz(d.completed)
	if d.lastAttempt.IsZero() {
		e.null()
	} else {
		e.float8(float64(d.duration) / float64(time.Millisecond))
	}
	if d.state.keepsPayload() {
		e.jsonb(d.payload)
		e.jsonb(d.headers)
		e.textOrNull(d.traceparent)
	} else {
		e.null()
		e.null()
		e.null()
	}
	e.int4(d.eventSeq)
}

// encodeAttempt appends the relay.attempts row of a failed attempt.
func encodeAttempt(e *copyEncoder, d *delivery) {
	e.row(len(attemptColumns))
	e.uuid(d.eventID)
	e.text(d.endpointID)
	e.int4(int32(d.attempts))
	e.timestamptz(d.lastAttempt)
	e.float8(float64(d.duration) / float64(time.Millisecond))
	e.int4OrNull(d.httpStatus)
	e.text(d.failClass)
	e.textOrNull(d.errText)
}
