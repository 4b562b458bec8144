// Package bench measures the relay on the machine it runs on, side by side
// with a bare Go HTTP client posting the same bodies to the same receiver
// (the ceiling), in one run. It backs `outbox-relay bench`.
//
// What it measures:
//
//   - Backlog drain: N events are inserted into relay.outbox of a durable
//     throwaway cluster while no relay runs (the publication and slot exist
//     already, so the WAL is kept); then the real relay binary is started as
//     a child process and timed until the receiver has seen every event and
//     every relay.deliveries row is succeeded. The bare client posts N
//     bodies of the same size and shape at the relay's concurrency.
//   - Steady latency: a producer commits single-row transactions at a fixed
//     rate; each payload carries the producer's clock reading taken just
//     before the INSERT that commits it, and the receiver subtracts it from
//     its arrival time. The bare path does the same with a direct POST (no
//     database), which is the floor of what any relay can reach.
//   - Cost: the relay process's CPU time and peak RSS from /proc, and the
//     WAL bytes per event from pg_current_wal_lsn deltas.
//   - Scale (scale.go): backlogs spread over many endpoints of many tenants
//     (drain-many for the relay, peer-drain-many for the polling peer of
//     bench/pollrelay), with the receiver checking that each event arrived
//     at its own endpoint; several backlog sizes and steady rates in one
//     run ([Config.EventCounts], [Config.Rates]); issue 4's and 6's targets.
//
// The receiver counts requests per webhook-id (ids are built from a run tag
// and a sequence number), so a duplicate or a miss is visible in the
// figures; it can verify every signature ([Config.VerifySignatures]), off by
// default because verification costs receiver CPU that the relay and the
// bare client would otherwise share.
//
// Opt-in fault phases (faults.go), each in a database and slot of its
// own: recovery (SIGKILL the relay under a steady producer and restart it,
// timed to the first delivery over a new connection), takeover (SIGKILL
// the active relay with a standby on the slot), ratelimit (an endpoint's
// and a tenant's rate limit measured at the receiver while another
// tenant's backlog drains), and memory (the relay's RSS with the receiver
// down and a large backlog, under spill and block, then the drain). Each
// ends by checking that every event has exactly one succeeded row.
//
// Figures are as noisy as the machine: run it on an otherwise idle box and
// compare ratios from the same run.
package bench
