// Package dlq reads and replays the relay's dead letters: the deliveries
// in relay.deliveries that ended dead (attempts exhausted), failed (a final
// answer such as 400 or 410) or rejected (never attempted).
//
// The SQL in schema.sql is the one implementation: the relay.dead_letters
// view, and the functions relay.replay_dead_letter and
// relay.replay_dead_letters, which operators can also call from psql or an
// application. This package wraps them for Go callers and for the
// `outbox-relay dlq` and `outbox-relay status` commands.
//
// What it promises:
//
//   - A replayed delivery keeps its event id, and so its webhook-id; it is
//     set back to pending, due now, with a fresh attempt budget, and the
//     running relay delivers it within its poll interval. The row records
//     the replay (replay_count, replayed_at).
//   - Replaying the same entry from several places at once replays it once:
//     only a row that is a dead letter when its UPDATE runs changes, so one
//     [Replay] returns true and the rest return false.
//   - [ReplayAll] works in batches, one transaction each, so it never holds
//     locks on the whole queue, and it never replays a row twice in one call
//     even if that row fails again while the call runs.
//   - Event ids are accepted as a UUID (with or without dashes) or as the
//     webhook-id a receiver saw ("msg_" and 32 hex digits).
//
// What it does not do: it does not deliver anything itself (a relay must be
// running), it does not re-enable a disabled endpoint (a replayed delivery
// to one ends again without an attempt: dead with the endpoint's
// disabled_reason when that is set, else rejected), and it cannot replay
// rows written before dead
// letters kept their payload (see [ErrNoPayload]).
package dlq
