package cdc

import (
	"encoding/binary"
	"testing"
)

// FuzzDecode feeds a stream of messages to one Decoder. The input is a
// sequence of frames, each a 2-byte big-endian length and that many bytes
// (one pgoutput message), so the fuzzer can reach states that need a
// Relation and a Begin first. The decoder must never panic, and every Txn
// it returns must be self-consistent.
func FuzzDecode(f *testing.F) {
	frame := func(msgs ...[]byte) []byte {
		var b []byte
		for _, m := range msgs {
			b = binary.BigEndian.AppendUint16(b, uint16(len(m)))
			b = append(b, m...)
		}
		return b
	}
	rel := relationMsg(16390, "relay", "endpoints", col{"id", 25, true}, col{"url", 25, false}, col{"enabled", 16, false})
	f.Add(frame(outboxRel(1), beginMsg(1, y2k, 1), outboxInsert(1, 1), outboxInsert(1, 2), commitMsg(1, 2, y2k)))
	f.Add(frame(rel, beginMsg(5, y2k, 2),
		updateMsg(16390, 'K', []*string{sp("ep_1"), nil, nil}, sp("ep_2"), toast, sp("t")),
		updateMsg(16390, 0, nil, sp("ep_2"), sp("u"), nil),
		deleteMsg(16390, 'O', sp("ep_2"), sp("u"), sp("f")),
		msgb{'T'}.u32(1).u8(0).u32(16390),
		msgb{'O'}.u64(5).str("o"), msgb{'Y'}.u32(1).str("a").str("b"),
		commitMsg(5, 9, y2k)))
	f.Add(frame(msgb{'M'}.u8(0).u64(1).str("outbox-relay-heartbeat").u32(0)))
	f.Fuzz(func(t *testing.T, data []byte) {
		d := NewDecoder()
		for len(data) >= 2 {
			n := int(binary.BigEndian.Uint16(data))
			data = data[2:]
			if n > len(data) {
				n = len(data)
			}
			msg := data[:n:n]
			data = data[n:]
			txn, err := d.Decode(msg)
			if err != nil {
				if txn != nil {
					t.Fatal("Txn and error both returned")
				}
				continue
			}
			if txn == nil {
				continue
			}
			for _, c := range txn.Changes {
				if c.Rel == nil {
					t.Fatal("change without relation")
				}
				for _, vals := range [][]Value{c.New, c.Old} {
					if vals != nil && len(vals) != len(c.Rel.Columns) {
						t.Fatalf("%d values for %d columns", len(vals), len(c.Rel.Columns))
					}
					for _, v := range vals {
						if v.Kind != 'n' && v.Kind != 'u' && v.Kind != 't' {
							t.Fatalf("bad kind %q", v.Kind)
						}
					}
				}
				if (c.Op == Insert || c.Op == Update) && c.New == nil || c.Op == Delete && c.Old == nil {
					t.Fatalf("%s without its tuple", c.Op)
				}
			}
		}
	})
}
