// Package cdc streams the relay's tables out of Postgres through logical
// replication (a permanent pgoutput slot, protocol version 1) and decodes
// the stream into transactions. It knows nothing of HTTP or webhooks.
//
// # Promises
//
//   - Order: Run hands over committed transactions, in commit order, inside
//     Batches. A transaction whose WAL messages pass Config.MaxBatchBytes
//     goes over in parts (Txn.More), each closing its Batch, so memory does
//     not grow with the size of one transaction; its parts come in order,
//     and only the last has its EndLSN. A part is committed: pgoutput sends
//     a transaction only after its commit.
//   - No duplicate within a process: one Stream never hands over the same
//     transaction twice, even across reconnects and Postgres restarts; a
//     transaction whose EndLSN is at or below the last Position handed over
//     is dropped, and of one handed over in parts when the connection
//     dropped, the changes already handed are skipped. A new Stream (a new process) resumes at the slot's
//     confirmed position, so transactions handed over but not acknowledged
//     by the previous process come again: the consumer deduplicates them.
//   - Position: every transaction that commits before Batch.Position has
//     been handed over, in that Batch or an earlier one. On an idle
//     database the stream hands over empty Batches (when the channel has
//     room) whose Position follows the server's WAL end, and writes a small
//     heartbeat record every Config.HeartbeatInterval without data, so an
//     acknowledging consumer lets the slot advance and Postgres recycle WAL.
//   - Acknowledgement: the flush position reported to Postgres is
//     max(slot's confirmed position at start, Acker.FlushLSN()), capped at
//     the last Position handed over and never moving backwards. Write,
//     flush and apply positions are always set explicitly.
//   - Liveness under backpressure: while the consumer does not take a
//     Batch, the stream stops reading (WAL waits in the slot) but keeps
//     sending standby status updates every Config.StatusInterval, so
//     wal_sender_timeout does not cut the connection.
//   - Setup says what to fix: a misconfigured server, role, publication or
//     slot yields an error wrapping one of the Err* sentinels.
//
// # What the consumer must guarantee
//
// Acker.FlushLSN must return L only when every transaction handed over with
// EndLSN <= L (equivalently every Batch with Position <= L, and all before
// it) has a durable record on the consumer's side. Postgres will never send
// those transactions again, to this process or any other.
//
// # Batching
//
// Decoded transactions are accumulated and handed over when the
// connection's read buffer holds nothing more, when Config.MaxBatchTxns is
// reached, or Config.MaxBatchDelay (1ms) after the first one, so a lone
// transaction is not delayed and a busy stream costs one channel send per
// many transactions.
//
// The Decoder is usable on its own: bytes in, transactions out, no I/O.
package cdc
