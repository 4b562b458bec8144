package relay

import (
	"sync"
	"sync/atomic"

	"github.com/outbox-relay/outbox-relay/cdc"
)

// txnMark counts the deliveries of one transaction that have no durable
// row yet. The watermark may pass the transaction's EndLSN only when the
// count is zero.
type txnMark struct {
	end       cdc.LSN
	remaining atomic.Int64
}

// done records that n more deliveries of the transaction are durable.
func (m *txnMark) done(n int) {
	if m != nil {
		m.remaining.Add(int64(-n))
	}
}

// watermark computes the flush LSN the stream may confirm to Postgres:
// the end of the longest prefix of transactions, in commit order, whose
// deliveries all have durable rows. It implements cdc.Acker.
type watermark struct {
	mu       sync.Mutex
	marks    []*txnMark // commit order; marks[head:] are live
	head     int
	flushed  cdc.LSN // highest end LSN known durable
	position cdc.LSN // everything before it was handed over
}

// add registers a transaction with n deliveries still to make durable.
// Transactions must be added in commit order.
func (w *watermark) add(end cdc.LSN, n int) *txnMark {
	m := &txnMark{end: end}
	m.remaining.Store(int64(n))
	w.mu.Lock()
	w.marks = append(w.marks, m)
	w.mu.Unlock()
	return m
}

// advance records that every transaction committed before pos has been
// added.
func (w *watermark) advance(pos cdc.LSN) {
	w.mu.Lock()
	if pos > w.position {
		w.position = pos
	}
	w.mu.Unlock()
}

// FlushLSN returns the highest LSN that is safe to confirm.
func (w *watermark) FlushLSN() cdc.LSN {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.head < len(w.marks) && w.marks[w.head].remaining.Load() <= 0 {
		if e := w.marks[w.head].end; e > w.flushed {
			w.flushed = e
		}
		w.marks[w.head] = nil
		w.head++
	}
	if w.head == len(w.marks) {
		w.marks, w.head = w.marks[:0], 0
		if w.position > w.flushed {
			w.flushed = w.position
		}
	} else if w.head > 1024 && w.head*2 > len(w.marks) {
		n := copy(w.marks, w.marks[w.head:])
		w.marks, w.head = w.marks[:n], 0
	}
	return w.flushed
}

// pending returns how many transactions still hold the watermark back.
func (w *watermark) pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.marks) - w.head
}
