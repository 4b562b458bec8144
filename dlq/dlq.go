package dlq

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrNotFound is returned when there is no delivery (or no dead letter)
// for the event and endpoint asked for. The error's text says which.
var ErrNotFound = errors.New("not found")

// ErrNoPayload is returned by [Replay] for a dead letter recorded before
// dead letters kept their payload: there is nothing to send again.
var ErrNoPayload = errors.New("dead letter has no payload to replay")

// DB is what the package needs from a connection: *pgxpool.Pool, *pgx.Conn
// and pgx.Tx all have it. With a pool, [ReplayAll] runs each batch in its
// own transaction; with a pgx.Tx, everything is in that transaction.
type DB interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// DefaultLimit is how many entries [List] returns when Filter.Limit is 0.
const DefaultLimit = 100

// replayBatch is how many rows one transaction of [ReplayAll] replays.
const replayBatch = 1000

// Filter selects dead letters. Zero fields do not filter.
type Filter struct {
	EventID    string // a UUID or a msg_... webhook-id
	EndpointID string
	TenantID   string
	Since      time.Time // completed at or after
	Until      time.Time // completed before
	// Limit caps how many entries List returns (0 = DefaultLimit, newest
	// first) and how many ReplayAll replays (0 = all).
	Limit int
}

// Entry is one delivery row: a dead letter from [List] and [Get], or a row
// in any state from [Deliveries].
type Entry struct {
	EventID    string // UUID
	WebhookID  string // msg_..., as the receiver sees it
	EndpointID string
	TenantID   string
	EventType  string
	State      string // dead, failed or rejected for a dead letter
	// Reason is why it ended (relay.deliveries.error). For a non-2xx answer
	// it ends with the first 256 bytes of the response body.
	Reason         string
	Attempts       int
	HTTPStatus     int // of the last attempt; 0 if there was no answer
	CreatedAt      time.Time
	FirstAttemptAt time.Time // zero if never attempted
	LastAttemptAt  time.Time
	NextAttemptAt  time.Time // pending and retrying rows only
	CompletedAt    time.Time // zero while not final
	ReplayCount    int
	ReplayedAt     time.Time // zero if never replayed
	Replayable     bool      // the row holds its payload
	Payload        json.RawMessage
	// History is the failed attempts in relay.attempts, oldest first
	// (filled by Get and Deliveries). Numbering starts again at 1 after a
	// replay; a successful attempt has no row there.
	History []Attempt
}

// Attempt is one failed attempt, from relay.attempts.
type Attempt struct {
	Attempt     int
	AttemptedAt time.Time
	Duration    time.Duration
	HTTPStatus  int    // 0 if there was no answer
	ErrorClass  string // timeout, connection_refused, http_5xx, ...
	Error       string
}

const entryColumns = `event_id::text, endpoint_id, tenant_id, event_type, state, coalesce(error, ''), attempts,
    coalesce(http_status, 0), created_at, first_attempt_at, last_attempt_at, next_attempt_at, completed_at,
    replay_count, replayed_at, payload IS NOT NULL, payload::text`

func scanEntry(row pgx.Row) (Entry, error) {
	var e Entry
	var first, last, next, completed, replayed *time.Time
	var payload *string
	err := row.Scan(&e.EventID, &e.EndpointID, &e.TenantID, &e.EventType, &e.State, &e.Reason, &e.Attempts,
		&e.HTTPStatus, &e.CreatedAt, &first, &last, &next, &completed, &e.ReplayCount, &replayed, &e.Replayable, &payload)
	if err != nil {
		return Entry{}, err
	}
	e.WebhookID = WebhookID(e.EventID)
	e.FirstAttemptAt, e.LastAttemptAt, e.NextAttemptAt = deref(first), deref(last), deref(next)
	e.CompletedAt, e.ReplayedAt = deref(completed), deref(replayed)
	if payload != nil {
		e.Payload = json.RawMessage(*payload)
	}
	return e, nil
}

func deref(t *time.Time) time.Time {
	if t == nil {
		return time.Time{}
	}
	return *t
}

func nullTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}

func nullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// List returns the dead letters that match f, most recently completed
// first.
func List(ctx context.Context, db DB, f Filter) ([]Entry, error) {
	var eventID any
	if f.EventID != "" {
		id, err := ParseEventID(f.EventID)
		if err != nil {
			return nil, err
		}
		eventID = id
	}
	limit := f.Limit
	if limit <= 0 {
		limit = DefaultLimit
	}
	// The view's columns are a subset of the table's; reading the table
	// with the view's state condition keeps one column list for Entry.
	rows, err := db.Query(ctx, `SELECT `+entryColumns+` FROM relay.deliveries
WHERE state IN ('dead', 'failed', 'rejected')
  AND ($1::uuid IS NULL OR event_id = $1::uuid)
  AND ($2::text IS NULL OR endpoint_id = $2)
  AND ($3::text IS NULL OR tenant_id = $3)
  AND ($4::timestamptz IS NULL OR completed_at >= $4)
  AND ($5::timestamptz IS NULL OR completed_at < $5)
ORDER BY completed_at DESC, event_id, endpoint_id
LIMIT $6`, eventID, nullString(f.EndpointID), nullString(f.TenantID), nullTime(f.Since), nullTime(f.Until), limit)
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Entry, error) { return scanEntry(r) })
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	return out, nil
}

// Get returns one dead letter with its attempt history. If the delivery
// exists but is not a dead letter, or does not exist, the error wraps
// [ErrNotFound] and says which.
func Get(ctx context.Context, db DB, eventID, endpointID string) (Entry, error) {
	id, err := ParseEventID(eventID)
	if err != nil {
		return Entry{}, err
	}
	e, err := scanEntry(db.QueryRow(ctx, `SELECT `+entryColumns+` FROM relay.deliveries
WHERE event_id = $1::uuid AND endpoint_id = $2`, id, endpointID))
	if errors.Is(err, pgx.ErrNoRows) {
		return Entry{}, notFound(id, endpointID)
	}
	if err != nil {
		return Entry{}, fmt.Errorf("read dead letter: %w", err)
	}
	if !isDeadLetter(e.State) {
		return Entry{}, fmt.Errorf("%w: the delivery of event %s to endpoint %s is %s, not a dead letter", ErrNotFound, id, endpointID, e.State)
	}
	hist, err := history(ctx, db, id, endpointID)
	if err != nil {
		return Entry{}, err
	}
	e.History = hist[endpointID]
	return e, nil
}

// Deliveries returns every endpoint's delivery row of one event, in any
// state, with its attempt history, ordered by endpoint. With no row the
// error wraps [ErrNotFound] and says whether the event is still in
// relay.outbox (not yet recorded by a relay) or unknown.
func Deliveries(ctx context.Context, db DB, eventID string) ([]Entry, error) {
	id, err := ParseEventID(eventID)
	if err != nil {
		return nil, err
	}
	rows, err := db.Query(ctx, `SELECT `+entryColumns+` FROM relay.deliveries WHERE event_id = $1::uuid ORDER BY endpoint_id`, id)
	if err != nil {
		return nil, fmt.Errorf("read deliveries: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Entry, error) { return scanEntry(r) })
	if err != nil {
		return nil, fmt.Errorf("read deliveries: %w", err)
	}
	if len(out) == 0 {
		var inOutbox bool
		if err := db.QueryRow(ctx, `SELECT EXISTS (SELECT FROM relay.outbox WHERE id = $1::uuid)`, id).Scan(&inOutbox); err != nil {
			return nil, fmt.Errorf("look up outbox: %w", err)
		}
		if inOutbox {
			return nil, fmt.Errorf("%w: no delivery for event %s yet: it is in relay.outbox, and no relay has recorded it (is one running?)", ErrNotFound, id)
		}
		return nil, fmt.Errorf("%w: no delivery for event %s", ErrNotFound, id)
	}
	hist, err := history(ctx, db, id, "")
	if err != nil {
		return nil, err
	}
	for i := range out {
		out[i].History = hist[out[i].EndpointID]
	}
	return out, nil
}

// history reads relay.attempts for an event (and one endpoint, if given),
// grouped by endpoint.
func history(ctx context.Context, db DB, eventID, endpointID string) (map[string][]Attempt, error) {
	rows, err := db.Query(ctx, `SELECT endpoint_id, attempt, attempted_at, coalesce(duration_ms, 0), coalesce(http_status, 0),
    coalesce(error_class, ''), coalesce(error, '')
FROM relay.attempts WHERE event_id = $1::uuid AND ($2::text IS NULL OR endpoint_id = $2)
ORDER BY attempted_at, attempt`, eventID, nullString(endpointID))
	if err != nil {
		return nil, fmt.Errorf("read attempt history: %w", err)
	}
	out := make(map[string][]Attempt)
	var ep string
	var a Attempt
	var ms float64
	_, err = pgx.ForEachRow(rows, []any{&ep, &a.Attempt, &a.AttemptedAt, &ms, &a.HTTPStatus, &a.ErrorClass, &a.Error}, func() error {
		a.Duration = time.Duration(ms * float64(time.Millisecond))
		out[ep] = append(out[ep], a)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read attempt history: %w", err)
	}
	return out, nil
}

// Replay puts one dead letter back to pending for the running relay to
// deliver (relay.replay_dead_letter). It returns true if this call replayed
// it, and false if the delivery exists but is not a dead letter (not yet
// final, delivered, or already replayed, perhaps by a concurrent call). The
// error wraps [ErrNotFound] when there is no such delivery and is
// [ErrNoPayload] when the dead letter cannot be replayed.
func Replay(ctx context.Context, db DB, eventID, endpointID string) (bool, error) {
	id, err := ParseEventID(eventID)
	if err != nil {
		return false, err
	}
	var ok bool
	if err := db.QueryRow(ctx, `SELECT relay.replay_dead_letter($1::uuid, $2)`, id, endpointID).Scan(&ok); err != nil {
		return false, fmt.Errorf("replay dead letter: %w", err)
	}
	if ok {
		return true, nil
	}
	var state string
	var hasPayload bool
	err = db.QueryRow(ctx, `SELECT state, payload IS NOT NULL FROM relay.deliveries WHERE event_id = $1::uuid AND endpoint_id = $2`,
		id, endpointID).Scan(&state, &hasPayload)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return false, notFound(id, endpointID)
	case err != nil:
		return false, fmt.Errorf("replay dead letter: %w", err)
	case isDeadLetter(state) && !hasPayload:
		return false, fmt.Errorf("replay event %s at endpoint %s: %w", id, endpointID, ErrNoPayload)
	}
	return false, nil
}

// ReplayAll replays every dead letter that matches f (EventID is not a
// filter here and must be empty), up to f.Limit if it is set, and returns
// how many it replayed. It calls relay.replay_dead_letters in batches of
// 1000 rows; with a pool each batch is its own transaction. A row that
// fails again while ReplayAll runs is not replayed a second time.
func ReplayAll(ctx context.Context, db DB, f Filter) (int, error) {
	if f.EventID != "" {
		return 0, errors.New("replay all: filter by event is not supported; use Replay for one entry")
	}
	var started time.Time
	if err := db.QueryRow(ctx, `SELECT now()`).Scan(&started); err != nil {
		return 0, fmt.Errorf("replay dead letters: %w", err)
	}
	total := 0
	for {
		batch := replayBatch
		if f.Limit > 0 {
			batch = min(batch, f.Limit-total)
		}
		if batch <= 0 {
			return total, nil
		}
		var n int
		err := db.QueryRow(ctx, `SELECT relay.replay_dead_letters(endpoint_id => $1, tenant_id => $2, since => $3, until => $4,
    max_rows => $5, replayed_before => $6)`,
			nullString(f.EndpointID), nullString(f.TenantID), nullTime(f.Since), nullTime(f.Until), batch, started).Scan(&n)
		if err != nil {
			return total, fmt.Errorf("replay dead letters (%d replayed so far): %w", total, err)
		}
		total += n
		if n < batch {
			return total, nil
		}
	}
}

func isDeadLetter(state string) bool {
	return state == "dead" || state == "failed" || state == "rejected"
}

func notFound(eventID, endpointID string) error {
	return fmt.Errorf("%w: no delivery for event %s at endpoint %s", ErrNotFound, eventID, endpointID)
}

// ErrInvalidEventID is wrapped by the error for an event id that is neither
// a UUID nor a msg_ webhook-id.
var ErrInvalidEventID = errors.New("invalid event id")

// ParseEventID accepts an event id as a UUID (with or without dashes, any
// case) or as a webhook-id ("msg_" and 32 hex digits) and returns the
// canonical UUID text.
func ParseEventID(s string) (string, error) {
	hex := strings.TrimPrefix(strings.TrimSpace(s), "msg_")
	hex = strings.ReplaceAll(hex, "-", "")
	if len(hex) != 32 {
		return "", fmt.Errorf("%w %q: want a UUID or a msg_ webhook-id", ErrInvalidEventID, s)
	}
	for _, c := range hex {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return "", fmt.Errorf("%w %q: want a UUID or a msg_ webhook-id", ErrInvalidEventID, s)
		}
	}
	hex = strings.ToLower(hex)
	return hex[0:8] + "-" + hex[8:12] + "-" + hex[12:16] + "-" + hex[16:20] + "-" + hex[20:], nil
}

// WebhookID returns the webhook-id receivers see for an event id (a UUID),
// as the relay derives it.
func WebhookID(eventID string) string {
	return "msg_" + strings.ReplaceAll(strings.ToLower(eventID), "-", "")
}
