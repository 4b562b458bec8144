package outboxrelay

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
)

// Event is one outbox row. Publish it inside the transaction that makes the
// business change, and the relay delivers it only if that transaction commits.
type Event struct {
	// ID becomes the webhook-id ("msg_" + its 32 hex digits). Optional: empty
	// lets Postgres generate one. Set it to make a retried publish idempotent.
	ID string
	// TenantID and EventType are required.
	TenantID  string
	EventType string
	// Payload is the request body; it must be valid JSON.
	Payload []byte
	// EndpointID, if set, delivers to that endpoint only.
	EndpointID string
	// Headers are extra request headers for this event.
	Headers map[string]string
	// TraceParent is a W3C traceparent forwarded to the receiver.
	TraceParent string
}

// PgxExecer is satisfied by pgx.Tx, *pgx.Conn and *pgxpool.Pool.
type PgxExecer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// SQLExecer is satisfied by *sql.Tx, *sql.DB and *sql.Conn.
type SQLExecer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

const insertSQL = `INSERT INTO relay.outbox (id, tenant_id, event_type, payload, endpoint_id, headers, traceparent)
VALUES (COALESCE($1::uuid, gen_random_uuid()), $2, $3, $4::jsonb, $5, $6::jsonb, $7)`

func (e Event) args() ([]any, error) {
	if e.TenantID == "" {
		return nil, errors.New("outbox event: TenantID is required")
	}
	if e.EventType == "" {
		return nil, errors.New("outbox event: EventType is required")
	}
	if !json.Valid(e.Payload) {
		return nil, errors.New("outbox event: Payload is not valid JSON")
	}
	var headers any
	if len(e.Headers) > 0 {
		b, err := json.Marshal(e.Headers)
		if err != nil {
			return nil, fmt.Errorf("outbox event: Headers: %w", err)
		}
		headers = string(b)
	}
	return []any{nullable(e.ID), e.TenantID, e.EventType, string(e.Payload), nullable(e.EndpointID), headers, nullable(e.TraceParent)}, nil
}

func nullable(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// Publish inserts the event with a pgx transaction (or connection).
func Publish(ctx context.Context, tx PgxExecer, e Event) error {
	args, err := e.args()
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insertSQL, args...); err != nil {
		return fmt.Errorf("insert into relay.outbox: %w", err)
	}
	return nil
}

// PublishSQL inserts the event with a database/sql transaction (or DB).
func PublishSQL(ctx context.Context, tx SQLExecer, e Event) error {
	args, err := e.args()
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, insertSQL, args...); err != nil {
		return fmt.Errorf("insert into relay.outbox: %w", err)
	}
	return nil
}

// Migrate applies the schema. It is idempotent.
func Migrate(ctx context.Context, db PgxExecer) error {
	if _, err := db.Exec(ctx, Schema); err != nil {
		return fmt.Errorf("apply relay schema: %w", err)
	}
	return nil
}
