package relay

import (
	"encoding/hex"
	"time"

	"github.com/outbox-relay/outbox-relay/cdc"
)

// State is a delivery's state, as stored in relay.deliveries.state.
type State string

// The states of a delivery. See schema.sql for their meaning.
const (
	StatePending   State = "pending"
	StateRetrying  State = "retrying"
	StateSucceeded State = "succeeded"
	StateFailed    State = "failed"
	StateDead      State = "dead"
	StateRejected  State = "rejected"
	StateUnrouted  State = "unrouted"
)

// Final reports whether no more attempts will be made.
func (s State) Final() bool {
	return s != StatePending && s != StateRetrying
}

// keepsPayload reports whether a row in this state keeps the payload: while
// it may still be attempted, and as a dead letter that may be replayed.
func (s State) keepsPayload() bool {
	return s != StateSucceeded && s != StateUnrouted
}

// delivery is one (event, endpoint) pair in memory, from routing (or
// loading) until its row is written.
type delivery struct {
	eventID     [16]byte
	endpointID  string
	tenantID    string
	eventType   string
	payload     []byte
	headers     []byte // the event's extra headers as JSON, or nil
	traceparent string
	commitLSN   cdc.LSN
	eventSeq    int32 // position of the outbox row within its transaction: with commitLSN, the commit order
	endLSN      cdc.LSN
	committedAt time.Time
	ep          *Endpoint // config at routing time; workers use the current one

	mark      *txnMark // non-nil until the first durable row is written
	persisted bool     // a row exists already (loaded): write through the upsert path
	maybeDup  bool     // re-streamed after a restart: a row may exist
	fromLane  bool     // loaded by an ordered endpoint's lane as its oldest unfinished rows

	// Outcome of the last attempt, written by the worker.
	state        State
	attempts     int
	httpStatus   int
	errText      string
	nextAttempt  time.Time
	firstAttempt time.Time
	lastAttempt  time.Time
	completed    time.Time
	duration     time.Duration
	failClass    string // error class of the last attempt if it failed: it gets a relay.attempts row

	breakerDone func(error)    // reports the attempt to the endpoint's breaker; nil without one
	queue       *endpointQueue // the queue pickLocked took it from, while in flight (done and finish release it)
}

// webhookID is the Standard Webhooks message id: stable across attempts,
// restarts and replays because it derives from the outbox row's id.
func (d *delivery) webhookID() string {
	var b [4 + 32]byte
	copy(b[:], "msg_")
	hex.Encode(b[4:], d.eventID[:])
	return string(b[:])
}

// size is what the delivery costs the queue's byte bound.
func (d *delivery) size() int {
	return len(d.payload) + len(d.headers) + 256
}

// parseUUID reads the canonical text form (with or without dashes).
func parseUUID(s []byte) ([16]byte, bool) {
	var id [16]byte
	j := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '-' {
			continue
		}
		if j >= 32 || i+1 >= len(s) {
			return id, false
		}
		hi, ok1 := unhex(s[i])
		lo, ok2 := unhex(s[i+1])
		if !ok1 || !ok2 {
			return id, false
		}
		id[j/2] = hi<<4 | lo
		j += 2
		i++
	}
	return id, j == 32
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
