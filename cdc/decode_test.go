package cdc

import (
	"encoding/binary"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// msgb builds pgoutput messages by hand, byte for byte as the protocol
// documentation lays them out.
type msgb []byte

func (b msgb) u8(v byte) msgb    { return append(b, v) }
func (b msgb) u16(v uint16) msgb { return binary.BigEndian.AppendUint16(b, v) }
func (b msgb) u32(v uint32) msgb { return binary.BigEndian.AppendUint32(b, v) }
func (b msgb) u64(v uint64) msgb { return binary.BigEndian.AppendUint64(b, v) }
func (b msgb) str(s string) msgb { return append(append(b, s...), 0) }

// tuple appends TupleData; nil is NULL, "\x00u" is an unchanged TOAST value.
func (b msgb) tuple(vals ...*string) msgb {
	b = b.u16(uint16(len(vals)))
	for _, v := range vals {
		switch {
		case v == nil:
			b = b.u8('n')
		case *v == "\x00u":
			b = b.u8('u')
		default:
			b = b.u8('t').u32(uint32(len(*v)))
			b = append(b, *v...)
		}
	}
	return b
}

func sp(s string) *string { return &s }

var toast = sp("\x00u")

var y2k = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

func pgMicros(t time.Time) uint64 { return uint64(t.Sub(y2k) / time.Microsecond) }

func beginMsg(finalLSN LSN, ts time.Time, xid uint32) []byte {
	return msgb{'B'}.u64(uint64(finalLSN)).u64(pgMicros(ts)).u32(xid)
}

func commitMsg(commit, end LSN, ts time.Time) []byte {
	return msgb{'C'}.u8(0).u64(uint64(commit)).u64(uint64(end)).u64(pgMicros(ts))
}

type col struct {
	name string
	oid  uint32
	key  bool
}

func relationMsg(id uint32, ns, name string, cols ...col) []byte {
	b := msgb{'R'}.u32(id).str(ns).str(name).u8('d').u16(uint16(len(cols)))
	for _, c := range cols {
		flag := byte(0)
		if c.key {
			flag = 1
		}
		b = b.u8(flag).str(c.name).u32(c.oid).u32(0xffffffff)
	}
	return b
}

func insertMsg(rel uint32, vals ...*string) []byte {
	return msgb{'I'}.u32(rel).u8('N').tuple(vals...)
}

func updateMsg(rel uint32, oldTag byte, old []*string, vals ...*string) []byte {
	b := msgb{'U'}.u32(rel)
	if oldTag != 0 {
		b = b.u8(oldTag).tuple(old...)
	}
	return b.u8('N').tuple(vals...)
}

func deleteMsg(rel uint32, tag byte, old ...*string) []byte {
	return msgb{'D'}.u32(rel).u8(tag).tuple(old...)
}

// outboxRel mirrors the publication's view of relay.outbox.
func outboxRel(id uint32) []byte {
	return relationMsg(id, "relay", "outbox",
		col{"id", 2950, true}, col{"tenant_id", 25, false}, col{"event_type", 25, false},
		col{"payload", 3802, false}, col{"endpoint_id", 25, false}, col{"headers", 3802, false},
		col{"traceparent", 25, false}, col{"created_at", 1184, false})
}

func outboxInsert(id uint32, n int) []byte {
	return insertMsg(id, sp("0b7a3c52-2d7e-4f4a-9a43-6f8a1fcb6e0"+string(rune('0'+n%10))), sp("tenant-1"),
		sp("invoice.paid"), sp(`{"amount": 4200, "currency": "eur"}`), nil, nil,
		sp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), sp("2024-05-01 12:00:00.123456+00"))
}

func mustDecode(t testing.TB, d *Decoder, msg []byte) *Txn {
	t.Helper()
	txn, err := d.Decode(msg)
	if err != nil {
		t.Fatalf("Decode(%q): %v", msg[0], err)
	}
	return txn
}

func TestDecodeTransaction(t *testing.T) {
	d := NewDecoder()
	ts := time.Date(2024, 5, 1, 12, 0, 0, 123456000, time.UTC)
	msgs := [][]byte{
		beginMsg(0x16B3748, ts, 731),
		relationMsg(16390, "relay", "endpoints", col{"id", 25, true}, col{"url", 25, false}, col{"enabled", 16, false}),
		insertMsg(16390, sp("ep_1"), sp("https://example.com/hook"), sp("t")),
		updateMsg(16390, 0, nil, sp("ep_1"), toast, sp("f")),
		updateMsg(16390, 'K', []*string{sp("ep_1"), nil, nil}, sp("ep_2"), sp("https://x"), sp("t")),
		deleteMsg(16390, 'K', sp("ep_2"), nil, nil),
		insertMsg(16390, sp(""), nil, sp("t")),
	}
	for _, m := range msgs {
		if txn := mustDecode(t, d, m); txn != nil {
			t.Fatalf("got a Txn before Commit")
		}
	}
	if !d.InTxn() {
		t.Fatal("InTxn() = false inside a transaction")
	}
	txn := mustDecode(t, d, commitMsg(0x16B3748, 0x16B3778, ts))
	if txn == nil {
		t.Fatal("no Txn at Commit")
	}
	if txn.XID != 731 || txn.CommitLSN != 0x16B3748 || txn.EndLSN != 0x16B3778 || !txn.CommitTime.Equal(ts) {
		t.Fatalf("txn header = %d %s %s %s", txn.XID, txn.CommitLSN, txn.EndLSN, txn.CommitTime)
	}
	if len(txn.Changes) != 5 {
		t.Fatalf("got %d changes, want 5", len(txn.Changes))
	}
	rel := txn.Changes[0].Rel
	if rel.Namespace != "relay" || rel.Name != "endpoints" || len(rel.Columns) != 3 || !rel.Columns[0].Key || rel.Columns[1].Key || rel.Columns[2].TypeOID != 16 {
		t.Fatalf("relation = %+v", rel)
	}
	if rel.ColumnIndex("url") != 1 || rel.ColumnIndex("nope") != -1 {
		t.Fatal("ColumnIndex")
	}
	want := []struct {
		op       Op
		old, new string // kinds and values, "|"-joined, n = NULL, u = TOAST
	}{
		{Insert, "", "ep_1|https://example.com/hook|t"},
		{Update, "", "ep_1|<u>|f"},
		{Update, "ep_1|<n>|<n>", "ep_2|https://x|t"},
		{Delete, "ep_2|<n>|<n>", ""},
		{Insert, "", "|<n>|t"},
	}
	for i, w := range want {
		c := txn.Changes[i]
		if c.Op != w.op || c.Rel != rel || render(c.Old) != w.old || render(c.New) != w.new {
			t.Errorf("change %d = %s old=%q new=%q, want %s old=%q new=%q", i, c.Op, render(c.Old), render(c.New), w.op, w.old, w.new)
		}
	}
	if d.InTxn() {
		t.Fatal("InTxn() = true after Commit")
	}
}

func render(vals []Value) string {
	if vals == nil {
		return ""
	}
	s := ""
	for i, v := range vals {
		if i > 0 {
			s += "|"
		}
		switch v.Kind {
		case 'n':
			s += "<n>"
		case 'u':
			s += "<u>"
		default:
			s += string(v.Data)
		}
	}
	return s
}

// The decoded Txn must not alias the message buffer, which the replication
// connection reuses for the next message.
func TestDecodeCopiesTupleBytes(t *testing.T) {
	d := NewDecoder()
	mustDecode(t, d, beginMsg(100, y2k, 1))
	mustDecode(t, d, outboxRel(1))
	var bufs [][]byte
	for i := range 200 {
		m := outboxInsert(1, i)
		bufs = append(bufs, m)
		mustDecode(t, d, m)
	}
	for _, b := range bufs {
		for i := range b {
			b[i] = 'X'
		}
	}
	txn := mustDecode(t, d, commitMsg(100, 120, y2k))
	for i, c := range txn.Changes {
		if got := string(c.New[2].Data); got != "invoice.paid" {
			t.Fatalf("row %d event_type = %q after the input was overwritten", i, got)
		}
		if cap(c.New) != len(c.New) || cap(c.New[3].Data) != len(c.New[3].Data) {
			t.Fatalf("row %d: slices must be capped so appends cannot clobber a neighbour", i)
		}
	}
}

// A Relation message for a cached ID (after ALTER TABLE) yields a new
// *Relation; changes decoded before keep the old columns.
func TestDecodeRelationChange(t *testing.T) {
	d := NewDecoder()
	mustDecode(t, d, relationMsg(7, "public", "t", col{"a", 23, true}))
	mustDecode(t, d, beginMsg(1, y2k, 9))
	mustDecode(t, d, insertMsg(7, sp("1")))
	mustDecode(t, d, relationMsg(7, "public", "t", col{"a", 23, true}, col{"b", 25, false}))
	mustDecode(t, d, insertMsg(7, sp("2"), sp("x")))
	txn := mustDecode(t, d, commitMsg(1, 2, y2k))
	if a, b := txn.Changes[0].Rel, txn.Changes[1].Rel; a == b || len(a.Columns) != 1 || len(b.Columns) != 2 {
		t.Fatalf("relations: %+v %+v", a, b)
	}
	if d.Relation(7) != txn.Changes[1].Rel {
		t.Fatal("cache does not hold the newest relation")
	}
}

func TestDecodeIgnoredMessages(t *testing.T) {
	d := NewDecoder()
	mustDecode(t, d, beginMsg(1, y2k, 9))
	mustDecode(t, d, msgb{'O'}.u64(5).str("origin_a"))
	mustDecode(t, d, msgb{'Y'}.u32(16400).str("public").str("mood"))
	mustDecode(t, d, msgb{'M'}.u8(1).u64(5).str("outbox-relay-heartbeat").u32(2).u8('h').u8('i'))
	mustDecode(t, d, relationMsg(3, "relay", "outbox", col{"id", 2950, true}))
	mustDecode(t, d, msgb{'T'}.u32(1).u8(0).u32(3))
	txn := mustDecode(t, d, commitMsg(1, 2, y2k))
	if len(txn.Changes) != 0 || len(txn.Truncated) != 1 || txn.Truncated[0].Name != "outbox" {
		t.Fatalf("txn = %+v", txn)
	}
}

func TestDecodeErrors(t *testing.T) {
	rel := relationMsg(1, "s", "t", col{"a", 25, true}, col{"b", 25, false})
	cases := []struct {
		name string
		msgs [][]byte
	}{
		{"empty", [][]byte{{}}},
		{"unknown type", [][]byte{{'Z', 1, 2}}},
		{"short begin", [][]byte{{'B', 0, 0, 0}}},
		{"commit without begin", [][]byte{commitMsg(1, 2, y2k)}},
		{"nested begin", [][]byte{beginMsg(1, y2k, 1), beginMsg(1, y2k, 2)}},
		{"insert outside txn", [][]byte{rel, insertMsg(1, sp("a"), sp("b"))}},
		{"unknown relation", [][]byte{beginMsg(1, y2k, 1), insertMsg(2, sp("a"), sp("b"))}},
		{"column count mismatch", [][]byte{rel, beginMsg(1, y2k, 1), insertMsg(1, sp("a"))}},
		{"length past end", [][]byte{rel, beginMsg(1, y2k, 1), msgb{'I'}.u32(1).u8('N').u16(2).u8('t').u32(1000).u8('x')}},
		{"bad column kind", [][]byte{rel, beginMsg(1, y2k, 1), msgb{'I'}.u32(1).u8('N').u16(2).u8('b').u32(0).u8('n')}},
		{"trailing bytes", [][]byte{rel, beginMsg(1, y2k, 1), append(insertMsg(1, sp("a"), sp("b")), 0)}},
		{"insert without N", [][]byte{rel, beginMsg(1, y2k, 1), msgb{'I'}.u32(1).u8('K').tuple(sp("a"), nil)}},
		{"delete without K", [][]byte{rel, beginMsg(1, y2k, 1), msgb{'D'}.u32(1).u8('N').tuple(sp("a"), nil)}},
		{"relation unterminated", [][]byte{msgb{'R'}.u32(1).str("s").u8('t')}},
		{"relation huge count", [][]byte{msgb{'R'}.u32(1).str("s").str("t").u8('d').u16(65535)}},
		{"truncate bad length", [][]byte{beginMsg(1, y2k, 1), msgb{'T'}.u32(1 << 30).u8(0)}},
		{"message bad length", [][]byte{msgb{'M'}.u8(0).u64(1).str("p").u32(10)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := NewDecoder()
			var err error
			for _, m := range tc.msgs {
				if _, err = d.Decode(m); err != nil {
					break
				}
			}
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("err = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestDecodeAllocations(t *testing.T) {
	d := NewDecoder()
	mustDecode(t, d, outboxRel(1))
	ins := outboxInsert(1, 1)
	b, c := beginMsg(1, y2k, 1), commitMsg(1, 2, y2k)
	allocs := testing.AllocsPerRun(20, func() {
		d.Decode(b)
		for range 1000 {
			d.Decode(ins)
		}
		d.Decode(c)
	})
	// Txn, chunks of Changes, Values and bytes: a few dozen per 1000 rows,
	// not one or more per column.
	if allocs > 60 {
		t.Fatalf("%v allocations per 1000-row transaction", allocs)
	}
}

// BenchmarkDecode decodes 100-row transactions of relay.outbox inserts, the
// shape LIMITS.md measures; ns/row and allocs/row are reported per row.
func BenchmarkDecode(b *testing.B) {
	for _, rows := range []int{1, 100} {
		b.Run(map[int]string{1: "rows=1", 100: "rows=100"}[rows], func(b *testing.B) {
			d := NewDecoder()
			mustDecode(b, d, outboxRel(1))
			ins := outboxInsert(1, 1)
			begin, commit := beginMsg(1, y2k, 1), commitMsg(1, 2, y2k)
			b.SetBytes(int64(rows * len(ins)))
			b.ReportAllocs()
			n := 0
			for b.Loop() {
				d.Decode(begin)
				for range rows {
					d.Decode(ins)
				}
				if txn, _ := d.Decode(commit); len(txn.Changes) != rows {
					b.Fatal("lost rows")
				}
				n += rows
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/row")
			b.ReportMetric(float64(testing.AllocsPerRun(1, func() {
				d.Decode(begin)
				for range rows {
					d.Decode(ins)
				}
				d.Decode(commit)
			}))/float64(rows), "allocs/row")
		})
	}
}

// The seed corpus was recorded from a real pgoutput stream (inserts into
// relay.outbox, an endpoint insert, updates with and without a key change,
// a delete, a tenant insert): it must decode without error into 7 Txns.
func TestDecodeRealStream(t *testing.T) {
	raw, err := os.ReadFile("testdata/fuzz/FuzzDecode/real-stream-7")
	if err != nil {
		t.Fatal(err)
	}
	_, lit, _ := strings.Cut(string(raw), "[]byte(")
	s, err := strconv.Unquote(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(lit), ")")))
	if err != nil {
		t.Fatal(err)
	}
	data := []byte(s)
	d := NewDecoder()
	var txns []*Txn
	for len(data) > 0 {
		n := int(binary.BigEndian.Uint16(data))
		txn := mustDecode(t, d, data[2:2+n])
		data = data[2+n:]
		if txn != nil {
			txns = append(txns, txn)
		}
	}
	if len(txns) != 7 || len(txns[1].Changes) != 3 || txns[4].Changes[0].Old == nil || txns[5].Changes[0].Op != Delete {
		t.Fatalf("decoded %d txns: %+v", len(txns), txns)
	}
}
