package relay

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/sony/gobreaker/v2"
)

// healthEvent is a change worth recording in relay.endpoint_health.
type healthEvent struct {
	endpointID   string
	breaker      string    // "" = unchanged
	failingSince time.Time // with setFailing: zero clears the streak
	setFailing   bool
	lastError    string
}

// health tracks each endpoint's failure streak and records breaker and
// streak changes in relay.endpoint_health, off the delivery path.
type health struct {
	events chan healthEvent

	mu        sync.Mutex
	failing   map[string]time.Time // endpoint → start of its failure streak
	disabling map[string]bool      // endpoints the relay is disabling
}

func newHealth() *health {
	return &health{events: make(chan healthEvent, 1024), failing: map[string]time.Time{}, disabling: map[string]bool{}}
}

// streak updates an endpoint's failure streak and returns its start (zero
// when healthy) and whether it changed.
func (h *health) streak(id string, failed bool, now time.Time) (time.Time, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	since, ok := h.failing[id]
	switch {
	case failed && !ok:
		h.failing[id] = now
		return now, true
	case !failed && ok:
		delete(h.failing, id)
		return time.Time{}, true
	}
	return since, false
}

// markDisabling reports whether the caller is the first to disable id
// since it was last enabled.
func (h *health) markDisabling(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.disabling[id] {
		return false
	}
	h.disabling[id] = true
	return true
}

// enabled forgets a past disabling once the endpoint is enabled again.
func (h *health) enabled(id string) {
	h.mu.Lock()
	delete(h.disabling, id)
	h.mu.Unlock()
}

func breakerStateName(s gobreaker.State) string {
	switch s {
	case gobreaker.StateOpen:
		return "open"
	case gobreaker.StateHalfOpen:
		return "half-open"
	}
	return "closed"
}

// breakerChanged is the breakers' state callback. It runs under the
// breaker's lock, possibly under the scheduler's: it only logs and hands
// the change off.
func (r *Relay) breakerChanged(epID string, from, to gobreaker.State) {
	level := slog.LevelInfo
	if to == gobreaker.StateOpen {
		level = slog.LevelWarn
	}
	r.log.Log(context.Background(), level, "circuit breaker changed", slog.String("endpoint_id", epID),
		slog.String("from", breakerStateName(from)), slog.String("to", breakerStateName(to)))
	r.metrics.breakerTransitions.WithLabelValues(breakerStateName(to)).Inc()
	r.health.send(healthEvent{endpointID: epID, breaker: breakerStateName(to)})
}

func (h *health) send(ev healthEvent) {
	select {
	case h.events <- ev:
	default:
		// The table is a view for operators; dropping an update under
		// extreme churn is better than stalling a worker.
	}
}

// run writes health events until ctx ends.
func (r *Relay) runHealth(ctx context.Context) {
	for {
		var ev healthEvent
		select {
		case <-ctx.Done():
			return
		case ev = <-r.health.events:
		}
		var failing any
		if !ev.failingSince.IsZero() {
			failing = ev.failingSince
		}
		_, err := r.pool.Exec(ctx, `INSERT INTO relay.endpoint_health AS h (endpoint_id, breaker_state, failing_since, last_error)
VALUES ($1, coalesce(nullif($2, ''), 'closed'), $3, nullif($5, ''))
ON CONFLICT (endpoint_id) DO UPDATE SET
    breaker_state = coalesce(nullif($2, ''), h.breaker_state),
    failing_since = CASE WHEN $4 THEN $3 ELSE h.failing_since END,
    last_error = coalesce(nullif($5, ''), h.last_error),
    changed_at = now()`, ev.endpointID, ev.breaker, failing, ev.setFailing, ev.lastError)
		if err != nil && ctx.Err() == nil {
			r.log.Warn("recording endpoint health failed", slog.String("endpoint_id", ev.endpointID), slog.Any("error", err))
		}
	}
}

// loadHealth reads the failure streaks that survive restarts.
func (r *Relay) loadHealth(ctx context.Context) error {
	rows, err := r.pool.Query(ctx, `SELECT endpoint_id, failing_since FROM relay.endpoint_health WHERE failing_since IS NOT NULL`)
	if err != nil {
		return fmt.Errorf("load endpoint health: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var since time.Time
		if err := rows.Scan(&id, &since); err != nil {
			return fmt.Errorf("load endpoint health: %w", err)
		}
		r.health.mu.Lock()
		r.health.failing[id] = since
		r.health.mu.Unlock()
	}
	return rows.Err()
}

// outcome reports an attempt's result to the endpoint's breaker and
// failure streak, and disables the endpoint when the receiver says it is
// gone or it has failed for AutoDisableAfter.
func (r *Relay) outcome(d *delivery, ep *Endpoint, healthy, unhealthy bool, now time.Time) {
	if d.breakerDone != nil {
		switch {
		case unhealthy:
			d.breakerDone(errAttemptFailed)
		case healthy:
			d.breakerDone(nil)
		default:
			d.breakerDone(errNotCounted)
		}
		d.breakerDone = nil
	}
	if !healthy && !unhealthy {
		return
	}
	since, changed := r.health.streak(ep.ID, unhealthy, now)
	if changed {
		r.health.send(healthEvent{endpointID: ep.ID, setFailing: true, failingSince: since, lastError: d.errText})
	}
	if unhealthy && !since.IsZero() && now.Sub(since) >= r.cfg.AutoDisableAfter {
		r.disableEndpoint(ep.ID, fmt.Sprintf("disabled by the relay: failing continuously since %s (auto-disable after %s)",
			since.UTC().Format(time.RFC3339), r.cfg.AutoDisableAfter))
	}
}

// disableEndpoint turns an endpoint off in relay.endpoints (the change
// comes back through the stream and drains its queue) and moves its
// recorded pending and retrying deliveries to the dead-letter queue.
func (r *Relay) disableEndpoint(id, reason string) {
	if !r.health.markDisabling(id) {
		return
	}
	r.log.Warn("disabling endpoint", slog.String("endpoint_id", id), slog.String("reason", reason))
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		tx, err := r.pool.Begin(ctx)
		if err == nil {
			defer tx.Rollback(context.Background()) //nolint:errcheck // no-op after Commit
			_, err = tx.Exec(ctx, `UPDATE relay.endpoints SET enabled = false, disabled_reason = $2, updated_at = now() WHERE id = $1`, id, reason)
			if err == nil {
				// Dead letters keep their payload for a replay: a row
				// spilled without it takes it from its outbox row now.
				_, err = tx.Exec(ctx, `UPDATE relay.deliveries d SET state = 'dead', error = $2, completed_at = now(), next_attempt_at = NULL,
claimed_until = NULL, updated_at = now(),
payload = COALESCE(d.payload, (SELECT o.payload FROM relay.outbox o WHERE o.id = d.event_id)),
headers = CASE WHEN d.payload IS NULL THEN (SELECT o.headers FROM relay.outbox o WHERE o.id = d.event_id) ELSE d.headers END,
traceparent = CASE WHEN d.payload IS NULL THEN (SELECT o.traceparent FROM relay.outbox o WHERE o.id = d.event_id) ELSE d.traceparent END
WHERE d.endpoint_id = $1 AND d.state IN ('pending', 'retrying')`, id, reason)
			}
			if err == nil {
				err = tx.Commit(ctx)
			}
		}
		if err != nil {
			r.log.Error("disabling endpoint failed", slog.String("endpoint_id", id), slog.Any("error", err))
		}
	}()
}
