// Package pgtemp starts throwaway PostgreSQL clusters for tests and for the
// demo command.
//
// What it promises:
//
//   - [Start] runs initdb and postgres from the installed server binaries
//     (pg_config --bindir, then /usr/lib/postgresql/*/bin newest first, then
//     PATH) in a new temporary directory, on a free TCP port on 127.0.0.1 and
//     a unix socket inside that directory. Nothing else on the machine is
//     touched: not the system cluster, not its port, not its files.
//   - The cluster is ready for logical replication: wal_level=logical, 64 WAL
//     senders and replication slots, 300 connections, trust authentication
//     (including replication) for the superuser "postgres" over the socket
//     and 127.0.0.1.
//   - When the process runs as root, initdb and postgres run as the
//     "postgres" OS user (PostgreSQL refuses to run as root); otherwise they
//     run as the current user.
//   - The server is a child process that gets SIGKILL if the process that
//     started it dies (Linux parent-death signal), so an aborted test run does
//     not leave servers behind. Temporary directories left by such a run are
//     removed by the next Start once both their owner and their server are
//     gone.
//   - [Cluster.Stop] shuts the server down and removes the directory; it is
//     idempotent. [Cluster.Restart] restarts on the same port with the same
//     data, either cleanly ("fast") or as a crash ("immediate").
//   - [Cluster.DropDatabase] works even while logical replication slots
//     and walsenders use the database.
//   - [Main] and [NewDatabase] give each test package one cluster and each
//     test its own database. Setting OUTBOX_RELAY_TEST_DATABASE_URL makes
//     [Main] use that server instead ([External]); it must have
//     wal_level=logical and the URL's user must be allowed to create
//     databases and replication slots.
//
// What it does not promise:
//
//   - Durability against an OS crash. fsync and full_page_writes are off
//     unless [Options.Durable] is set. synchronous_commit stays on, so a
//     Restart("immediate") (a server crash, not an OS crash) keeps every
//     commit that was acknowledged.
//   - Production use, or any security: authentication is "trust".
//   - Portability beyond Unix-like systems with PostgreSQL 14 or newer.
package pgtemp
