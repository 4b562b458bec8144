package cdc

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Conditions Setup and Run report; test with errors.Is. The wrapping
// message says what to do about it.
var (
	// ErrConnect: the database could not be reached or refused the login.
	ErrConnect = errors.New("cannot connect to the database")
	// ErrWALLevel: wal_level is not logical.
	ErrWALLevel = errors.New("wal_level is not logical")
	// ErrNoReplication: the role has neither REPLICATION nor SUPERUSER.
	ErrNoReplication = errors.New("role lacks the REPLICATION attribute")
	// ErrTableMissing: a configured table does not exist.
	ErrTableMissing = errors.New("table missing")
	// ErrPublicationMissingTable: the publication exists without a table.
	ErrPublicationMissingTable = errors.New("publication lacks a table")
	// ErrPublicationOptions: the publication does not publish insert, update and delete.
	ErrPublicationOptions = errors.New("publication does not publish insert, update and delete")
	// ErrSlotLost: the slot was invalidated (wal_status = 'lost').
	ErrSlotLost = errors.New("replication slot invalidated")
	// ErrSlotPlugin: the slot exists but is not a pgoutput logical slot of this database.
	ErrSlotPlugin = errors.New("replication slot has another plugin or database")
	// ErrSlotMissing: Run found no slot (Setup was not run, or it was dropped).
	ErrSlotMissing = errors.New("replication slot missing")
)

// Setup checks that the database can feed the relay and creates what is
// missing: the publication (publish = 'insert, update, delete' for
// Config.Tables) and the permanent pgoutput slot. Every failure wraps one
// of the sentinel errors above and says how to fix it. Setup is idempotent.
func (s *Stream) Setup(ctx context.Context) error {
	conn, err := s.connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	log := s.cfg.Logger

	var walLevel string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		return fmt.Errorf("cdc setup: read wal_level: %w", err)
	}
	if walLevel != "logical" {
		return fmt.Errorf("cdc setup: %w (it is %q): set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart Postgres", ErrWALLevel, walLevel)
	}

	var role, db string
	var repl, super bool
	err = conn.QueryRow(ctx, `SELECT current_user, current_database(), rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user`).
		Scan(&role, &db, &repl, &super)
	if err != nil {
		return fmt.Errorf("cdc setup: read role attributes: %w", err)
	}
	if !repl && !super {
		return fmt.Errorf("cdc setup: %w: role %q can neither stream nor create a slot; as a superuser run: ALTER ROLE %s REPLICATION",
			ErrNoReplication, role, pgx.Identifier{role}.Sanitize())
	}

	for _, t := range s.cfg.Tables {
		var exists bool
		if err := conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, quoteTable(t)).Scan(&exists); err != nil {
			return fmt.Errorf("cdc setup: look up table %s: %w", t, err)
		}
		if !exists {
			return fmt.Errorf("cdc setup: %w: %s does not exist in database %q; apply the schema first (outbox-relay migrate)", ErrTableMissing, t, db)
		}
	}

	if err := s.setupPublication(ctx, conn); err != nil {
		return err
	}

	var plugin, slotDB, walStatus *string
	var confirmed *LSN
	err = conn.QueryRow(ctx, `SELECT plugin, database, wal_status, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1`,
		s.cfg.SlotName).Scan(&plugin, &slotDB, &walStatus, &confirmed)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		var lsn LSN
		err := conn.QueryRow(ctx, `SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')`, s.cfg.SlotName).Scan(&lsn)
		if pgErr := (*pgconn.PgError)(nil); errors.As(err, &pgErr) && pgErr.Code == "42710" {
			return s.Setup(ctx) // created concurrently by another instance: check it
		}
		if err != nil {
			return fmt.Errorf("cdc setup: create replication slot %q: %w", s.cfg.SlotName, err)
		}
		log.Info("created replication slot", slogSlot(s.cfg.SlotName), slogLSN("consistent_lsn", lsn))
		s.createdAt = lsn
		return nil
	case err != nil:
		return fmt.Errorf("cdc setup: look up replication slot %q: %w", s.cfg.SlotName, err)
	}
	return s.checkSlot(plugin, slotDB, walStatus, confirmed, db)
}

func (s *Stream) setupPublication(ctx context.Context, conn *pgx.Conn) error {
	pub := s.cfg.Publication
	var ins, upd, del bool
	err := conn.QueryRow(ctx, `SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = $1`, pub).Scan(&ins, &upd, &del)
	if errors.Is(err, pgx.ErrNoRows) {
		quoted := make([]string, len(s.cfg.Tables))
		for i, t := range s.cfg.Tables {
			quoted[i] = quoteTable(t)
		}
		sql := fmt.Sprintf(`CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert, update, delete')`, pub, strings.Join(quoted, ", "))
		if _, err := conn.Exec(ctx, sql); err != nil {
			return fmt.Errorf("cdc setup: create publication (the role must own the tables, or a superuser can run %q): %w", sql, err)
		}
		s.cfg.Logger.Info("created publication", "publication", pub, "tables", s.cfg.Tables)
		return nil
	}
	if err != nil {
		return fmt.Errorf("cdc setup: look up publication %q: %w", pub, err)
	}
	if !ins || !upd || !del {
		return fmt.Errorf("cdc setup: %w: publication %q; run: ALTER PUBLICATION %s SET (publish = 'insert, update, delete')", ErrPublicationOptions, pub, pub)
	}
	for _, t := range s.cfg.Tables {
		schema, name, _ := splitTable(t)
		var ok bool
		err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)`,
			pub, schema, name).Scan(&ok)
		if err != nil {
			return fmt.Errorf("cdc setup: read publication %q: %w", pub, err)
		}
		if !ok {
			return fmt.Errorf("cdc setup: %w: publication %q does not include %s; run: ALTER PUBLICATION %s ADD TABLE %s",
				ErrPublicationMissingTable, pub, t, pub, quoteTable(t))
		}
	}
	return nil
}

// checkSlot turns a pg_replication_slots row into ErrSlotPlugin or
// ErrSlotLost, or nil.
func (s *Stream) checkSlot(plugin, slotDB, walStatus *string, confirmed *LSN, db string) error {
	slot := s.cfg.SlotName
	if plugin == nil || *plugin != "pgoutput" || slotDB == nil || *slotDB != db {
		return fmt.Errorf("cdc: %w: slot %q uses plugin %q in database %q, the relay needs a pgoutput slot in %q; pick another Config.SlotName or drop it: SELECT pg_drop_replication_slot('%s')",
			ErrSlotPlugin, slot, deref(plugin), deref(slotDB), db, slot)
	}
	if walStatus != nil && *walStatus == "lost" {
		at := "unknown"
		if confirmed != nil {
			at = confirmed.String()
		}
		return fmt.Errorf("cdc: %w: slot %q has wal_status = 'lost' (confirmed up to %s): Postgres removed WAL the relay had not confirmed, because the slot fell behind more than max_slot_wal_keep_size. "+
			"The slot cannot stream again: drop it (SELECT pg_drop_replication_slot('%s')) and run setup to recreate it. "+
			"Events committed after %s and before the new slot was created were not streamed: recover them from relay.outbox (rows without a relay.deliveries row)",
			ErrSlotLost, slot, at, slot, at)
	}
	if walStatus != nil && *walStatus == "unreserved" {
		s.cfg.Logger.Warn("replication slot is about to lose WAL (wal_status = unreserved): the relay is far behind", slogSlot(slot))
	}
	return nil
}

// connect opens an ordinary connection.
func (s *Stream) connect(ctx context.Context) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, s.pgxCfg.Copy())
	if err != nil {
		return nil, connectError("", err)
	}
	return conn, nil
}

// connectError wraps a failed connection attempt in ErrConnect with a
// hint at the likely cause: a timeout is a server or network that did
// not answer, anything else most often a wrong address or login.
func connectError(what string, err error) error {
	hint := "check Config.ConnString, host, port, database and credentials"
	if pgconn.Timeout(err) || errors.Is(err, context.DeadlineExceeded) {
		hint = fmt.Sprintf("no answer within the connect timeout (connect_timeout, else %v): the server or the network is down, stopped or overloaded", connectTimeout)
	}
	return fmt.Errorf("cdc: %s%w (%s): %w", what, ErrConnect, hint, err)
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
