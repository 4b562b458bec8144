package relay

import (
	"testing"

	"github.com/outbox-relay/outbox-relay/cdc"
)

func TestWatermarkWaitsForEveryDelivery(t *testing.T) {
	var w watermark
	if got := w.FlushLSN(); got != 0 {
		t.Fatalf("empty watermark = %s, want 0/0", got)
	}
	a := w.add(100, 2) // a transaction with two deliveries
	b := w.add(200, 3000)
	c := w.add(300, 1)
	w.advance(350)
	if got := w.FlushLSN(); got != 0 {
		t.Fatalf("nothing durable yet, flush = %s", got)
	}
	c.done(1) // later txn done first: must not move past a or b
	if got := w.FlushLSN(); got != 0 {
		t.Fatalf("out-of-order completion moved the flush to %s", got)
	}
	a.done(1)
	if got := w.FlushLSN(); got != 0 {
		t.Fatalf("half of a's deliveries durable, flush = %s", got)
	}
	a.done(1)
	if got := w.FlushLSN(); got != 100 {
		t.Fatalf("a durable: flush = %s, want 0/64", got)
	}
	b.done(2999)
	if got := w.FlushLSN(); got != 100 {
		t.Fatalf("b has one delivery left, flush = %s", got)
	}
	b.done(1)
	// a, b, c durable and nothing else handed over before 350.
	if got := w.FlushLSN(); got != 350 {
		t.Fatalf("all durable: flush = %s, want position 0/15E", got)
	}
	if w.pending() != 0 {
		t.Fatalf("pending = %d", w.pending())
	}
	// Position never moves the flush backwards.
	w.advance(10)
	if got := w.FlushLSN(); got != 350 {
		t.Fatalf("flush went back to %s", got)
	}
}

func TestWatermarkManyTransactionsCompact(t *testing.T) {
	var w watermark
	marks := make([]*txnMark, 5000)
	for i := range marks {
		marks[i] = w.add(cdc.LSN(i+1)*10, 1)
	}
	for i, m := range marks[:4000] {
		m.done(1)
		if i%500 == 0 {
			if got, want := w.FlushLSN(), cdc.LSN(i+1)*10; got != want {
				t.Fatalf("after %d done: flush %d, want %d", i+1, got, want)
			}
		}
	}
	if got := w.FlushLSN(); got != 40000 {
		t.Fatalf("flush %d, want 40000", got)
	}
	if w.pending() != 1000 {
		t.Fatalf("pending %d, want 1000", w.pending())
	}
}
