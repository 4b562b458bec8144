package cdc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outbox-relay/outbox-relay/internal/sockio"
)

// Batch is handed to the consumer: transactions in commit order, the last
// of them possibly a part of a larger one (Txn.More).
type Batch struct {
	Txns []Txn
	// Position: every transaction that commits before Position has been
	// handed over, in this or an earlier Batch. It is the EndLSN of the
	// last Txn, or a keepalive's WAL end; idle keepalives produce empty
	// Batches that only move Position.
	Position LSN
}

// Acker is implemented by the consumer.
type Acker interface {
	// FlushLSN returns the highest LSN whose transactions are all durable
	// on the consumer's side: a Batch.Position (or a Txn.EndLSN) whose
	// transactions, and all before, need the WAL no more. It must never
	// exceed what was handed over and should not move backwards (the
	// stream ignores both). It is called from Run's goroutine and must
	// not block.
	FlushLSN() LSN
}

// Status is a snapshot of the stream for health checks and metrics.
type Status struct {
	Connected    bool      // streaming right now
	ReceivedLSN  LSN       // highest WAL position received
	FlushedLSN   LSN       // flush position last sent to Postgres (confirmed_flush_lsn follows it)
	LastStatusAt time.Time // when the last standby status update was sent
	LastError    error     // the last error that broke a connection, nil once streaming again
}

// Stream streams the publication's transactions from the slot.
type Stream struct {
	cfg     Config
	pgxCfg  *pgx.ConnConfig
	replCfg *pgconn.Config

	mu     sync.Mutex
	status Status

	// Owned by Run's goroutine.
	handed LSN // highest Position handed over: txns ending at or before it are never handed again
	// A transaction being handed over in parts (Txn.More): its CommitLSN
	// and how many of its changes, in WAL order, were handed so far. After
	// a reconnect the server sends it again from its Begin; those are
	// skipped.
	partLSN    LSN
	partHanded int
	flushSent  LSN // highest flush position sent (or found confirmed by the slot)
	running    atomic.Bool
	createdAt  LSN // where Setup created the slot; 0 if it found one
}

// SlotCreatedAt is the position at which Setup created the slot, or 0 if
// the slot already existed. A consumer that had streamed from a slot of
// this name before learns from it that the slot was lost: what was
// committed between its last position and this one was never read.
func (s *Stream) SlotCreatedAt() LSN { return s.createdAt }

// New applies Config's defaults and validates it.
func New(cfg Config) (*Stream, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	pgxCfg, err := pgx.ParseConfig(cfg.ConnString)
	if err != nil {
		return nil, fmt.Errorf("cdc: Config.ConnString: %w", err)
	}
	replCfg, err := pgconn.ParseConfig(cfg.ConnString)
	if err != nil {
		return nil, fmt.Errorf("cdc: Config.ConnString: %w", err)
	}
	replCfg.RuntimeParams["replication"] = "database"
	PrepareSession(&pgxCfg.Config)
	prepare(replCfg, replicationDefaults) // pg_stat_replication names the walsender
	return &Stream{cfg: cfg, pgxCfg: pgxCfg, replCfg: replCfg}, nil
}

// ApplicationName is the stream's connections' application_name unless
// Config.ConnString sets one.
const ApplicationName = "outbox-relay"

// The server settings the relay's connections ask for at startup, unless
// the connection string sets them. They make the server drop a
// connection whose peer has vanished (a network partition, a host that
// died) within seconds instead of the kernel's minutes or hours, so a
// standby can take over; they apply over TCP only (on a Unix socket the
// server ignores the TCP ones).
//
// Every connection (commonDefaults): application_name and keepalives on
// an idle connection (5 s, then 3 probes a second apart). Ordinary ones
// (sessionDefaults) add tcp_user_timeout 10 s for sent data that stays
// unacknowledged (PostgreSQL 12 or newer).
//
// The replication connection (replicationDefaults) adds
// wal_sender_timeout 10 s instead of tcp_user_timeout: the stream
// answers the server every StatusInterval (100 ms), also while its
// consumer blocks, so the walsender ends itself 10 s after the relay
// vanished. tcp_user_timeout would also end a healthy stream whose
// consumer blocks (overflow "block"): the relay stops reading, its
// receive window closes, and the kernel counts a zero window as
// unacknowledged data.
var (
	commonDefaults = [][2]string{
		{"application_name", ApplicationName},
		{"tcp_keepalives_idle", "5"},
		{"tcp_keepalives_interval", "1"},
		{"tcp_keepalives_count", "3"},
	}
	sessionDefaults     = [][2]string{{"tcp_user_timeout", userTimeoutMS}}
	replicationDefaults = [][2]string{{"wal_sender_timeout", "10s"}}
)

// PrepareSession sets up an ordinary connection config as the relay's
// own are: each of the relay's session settings its RuntimeParams do not
// set, and sockets read and written with raw syscalls (internal/sockio:
// at a live rate each event is a few small reads and writes, and Go's
// blocking-syscall bookkeeping cost more than the calls themselves).
func PrepareSession(c *pgconn.Config) { prepare(c, sessionDefaults) }

// Connect opens one ordinary connection set up by PrepareSession (TCP
// keepalives and user timeout, a connect timeout, raw-syscall sockets).
// A connString that does not parse gives a *pgconn.ParseConfigError.
func Connect(ctx context.Context, connString string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	PrepareSession(&cfg.Config)
	return pgx.ConnectConfig(ctx, cfg)
}

// prepare adds commonDefaults and extra to c's RuntimeParams where unset,
// bounds each connection attempt (connectTimeout) unless connect_timeout
// does, and wraps its dialer with sockio.
func prepare(c *pgconn.Config, extra [][2]string) {
	for _, defaults := range [][][2]string{commonDefaults, extra} {
		for _, kv := range defaults {
			if _, ok := c.RuntimeParams[kv[0]]; !ok {
				c.RuntimeParams[kv[0]] = kv[1]
			}
		}
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = connectTimeout
	}
	c.DialFunc = sockio.Dial(clientTimeouts(c.DialFunc, c.RuntimeParams))
}

// connectTimeout bounds a connection attempt to one host (dial, TLS,
// startup and authentication) when neither the connection string nor
// PGCONNECT_TIMEOUT sets a positive connect_timeout. Without it a server
// that accepts the TCP connection and never answers (a stopped or hung
// postmaster, a proxy that lost its backend) holds the attempt forever:
// its kernel acknowledges every packet, so neither keepalives nor the
// user timeout ever fire.
const connectTimeout = 10 * time.Second

// userTimeoutMS is the TCP user timeout, in milliseconds, of the relay's
// ordinary connections (both ends) and of its end of the replication one.
const userTimeoutMS = "10000"

// clientTimeouts gives the relay's end of each TCP connection the
// keepalives and user timeout its RuntimeParams ask of the server's end,
// prepare having filled in the defaults (tcp_keepalives_idle, _interval,
// _count in seconds, tcp_user_timeout in milliseconds; the replication
// connection, which asks the server for none, gets userTimeoutMS). Without them a server that vanished from
// the network (a failover that moved its address, a partition) leaves a
// query waiting as long as Go's and the kernel's defaults allow: a first
// keepalive after 15 s idle and 9 more 15 s apart, and unacknowledged
// data retransmitted for about 15 minutes. The
// relay always sends on its connections (status updates every 100 ms on
// the stream's), and a live server acknowledges them, also when it is
// not reading; so the user timeout ends only a dead path.
func clientTimeouts(dial pgconn.DialFunc, params map[string]string) pgconn.DialFunc {
	// A value that is not a number leaves Go's default (0 in
	// KeepAliveConfig); the server refuses such a connection anyway.
	num := func(name string) int { n, _ := strconv.Atoi(params[name]); return n }
	ka := net.KeepAliveConfig{Enable: true, Idle: time.Duration(num("tcp_keepalives_idle")) * time.Second,
		Interval: time.Duration(num("tcp_keepalives_interval")) * time.Second, Count: num("tcp_keepalives_count")}
	userMS, ok := params["tcp_user_timeout"]
	if !ok {
		userMS = userTimeoutMS
	}
	n, _ := strconv.Atoi(userMS)
	user := time.Duration(n) * time.Millisecond
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if tc, ok := nc.(*net.TCPConn); ok {
			err := tc.SetKeepAliveConfig(ka)
			if err == nil {
				err = setUserTimeout(tc, user)
			}
			if err != nil {
				nc.Close()
				return nil, fmt.Errorf("cdc: set TCP timeouts: %w", err)
			}
		}
		return nc, nil
	}
}

// Status returns a snapshot; safe from any goroutine.
func (s *Stream) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

func (s *Stream) setStatus(f func(*Status)) {
	s.mu.Lock()
	f(&s.status)
	s.mu.Unlock()
}

const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 5 * time.Second
)

// Run streams until ctx is done (it returns ctx's error) or a fatal error
// (slot lost or missing, missing privileges, malformed data). It
// reconnects with backoff after anything else. Batches go to out; the
// send blocks for as long as the consumer does, while standby status
// updates keep the connection alive. Run must not be called concurrently
// with itself on one Stream.
func (s *Stream) Run(ctx context.Context, out chan<- Batch, ack Acker) error {
	if !s.running.CompareAndSwap(false, true) {
		return errors.New("cdc: Run is already running on this Stream")
	}
	defer s.running.Store(false)
	log := s.cfg.Logger
	backoff := backoffMin
	for attempt := 1; ; attempt++ {
		streamed, err := s.session(ctx, out, ack)
		s.setStatus(func(st *Status) {
			st.Connected = false
			if ctx.Err() == nil {
				st.LastError = err
			}
		})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if isFatal(err) {
			log.Error("replication stopped", "error", err)
			return err
		}
		if streamed {
			backoff, attempt = backoffMin, 1
		}
		// Full jitter over the upper half keeps restarts of many relays apart.
		wait := backoff/2 + rand.N(backoff/2+1)
		log.Warn("replication connection lost; reconnecting", "error", err, "attempt", attempt, "backoff", wait)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(2*backoff, backoffMax)
	}
}

// isFatal reports errors that reconnecting cannot cure.
func isFatal(err error) bool {
	for _, e := range []error{ErrSlotLost, ErrSlotMissing, ErrSlotPlugin, ErrNoReplication, ErrWALLevel, ErrMalformed} {
		if errors.Is(err, e) {
			return true
		}
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "42501", // insufficient_privilege
			"28000", "28P01", // invalid authorization, wrong password
			"3D000", // database does not exist
			"42704", // undefined_object: slot or publication does not exist
			"55000": // object_not_in_prerequisite_state: slot invalidated, wal_level too low
			return true
		}
	}
	return false
}

// session is one replication connection's life. streamed reports whether
// START_REPLICATION succeeded (so the backoff starts over).
func (s *Stream) session(ctx context.Context, out chan<- Batch, ack Acker) (streamed bool, err error) {
	log := s.cfg.Logger
	db, err := s.connect(ctx)
	if err != nil {
		return false, err
	}
	var plugin, slotDB, walStatus *string
	var confirmed *LSN
	var dbName string
	err = db.QueryRow(ctx, `SELECT plugin, database, wal_status, confirmed_flush_lsn, current_database() FROM pg_replication_slots WHERE slot_name = $1`,
		s.cfg.SlotName).Scan(&plugin, &slotDB, &walStatus, &confirmed, &dbName)
	db.Close(context.WithoutCancel(ctx))
	if errors.Is(err, pgx.ErrNoRows) {
		return false, fmt.Errorf("cdc: %w: slot %q does not exist; run Setup (outbox-relay creates it at startup)", ErrSlotMissing, s.cfg.SlotName)
	}
	if err != nil {
		return false, fmt.Errorf("cdc: look up replication slot: %w", err)
	}
	if err := s.checkSlot(plugin, slotDB, walStatus, confirmed, dbName); err != nil {
		return false, err
	}
	if confirmed != nil && *confirmed > s.flushSent {
		s.flushSent = *confirmed
	}

	conn, err := pgconn.ConnectConfig(ctx, s.replCfg.Copy())
	if err != nil {
		return false, connectError("open replication connection: ", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))

	start := s.flushSent
	err = pglogrepl.StartReplication(ctx, conn, s.cfg.SlotName, start, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", fmt.Sprintf("publication_names '%s'", s.cfg.Publication)},
	})
	if err != nil {
		return false, fmt.Errorf("cdc: start replication on slot %q at %s: %w", s.cfg.SlotName, start, err)
	}
	log.Info("replication started", slogSlot(s.cfg.SlotName), slogLSN("start_lsn", start), slogLSN("handed_lsn", s.handed))
	s.setStatus(func(st *Status) { st.Connected, st.LastError = true, nil })

	sess := &session{Stream: s, conn: conn, ack: ack, out: out, dec: NewDecoder(), received: start}
	stop := context.AfterFunc(ctx, func() { conn.Conn().SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	defer sess.wg.Wait()
	err = sess.loop(ctx)
	if ctx.Err() != nil {
		// Leaving on purpose: tell the server the latest flush position,
		// best effort, so a restart resumes as late as possible.
		_ = sess.sendStatus(false)
	}
	return true, err
}

// session is the state of one streaming connection, owned by Run's goroutine.
type session struct {
	*Stream
	conn *pgconn.PgConn
	ack  Acker
	out  chan<- Batch
	dec  *Decoder

	received   LSN       // highest WAL position received
	nextStatus time.Time // when the next timed status update is due
	lastData   time.Time // when transaction data last arrived (heartbeat clock)
	deadline   time.Time // read deadline currently set on the socket
	heard      time.Time // last data or keepalive read, or the end of a wait on the consumer
	pinged     bool      // a reply was asked for since heard

	pending      []Txn
	pendingPos   LSN
	pendingSince time.Time
	pendingBytes int // WAL message bytes of the pending transactions
	txnBytes     int // WAL message bytes of the transaction being decoded

	replyStreak      int       // keepalives asking for a reply, each within a second of the previous
	replyStreakStart time.Time // first of them
	lastReplyReq     time.Time

	heartbeating bool
	heartbeatErr chan error
	wg           sync.WaitGroup
}

func (ss *session) loop(ctx context.Context) error {
	now := time.Now()
	ss.lastData = now
	ss.heard = now
	ss.nextStatus = now
	ss.heartbeatErr = make(chan error, 1)
	nc := ss.conn.Conn()
	fe := ss.conn.Frontend()
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		now = time.Now()
		if !now.Before(ss.nextStatus) {
			if err := ss.sendStatus(false); err != nil {
				return err
			}
		}
		if len(ss.pending) > 0 && (len(ss.pending) >= ss.cfg.MaxBatchTxns || ss.pendingBytes >= ss.cfg.MaxBatchBytes || fe.ReadBufferLen() == 0 ||
			now.Sub(ss.pendingSince) >= ss.cfg.MaxBatchDelay) {
			if err := ss.flush(ctx); err != nil {
				return err
			}
			// The stream read nothing while the consumer blocked; the
			// server's silence counts from here.
			ss.heard = time.Now()
			continue
		}
		ss.heartbeat(ctx, now)

		deadline := ss.nextStatus
		if len(ss.pending) > 0 {
			deadline = minTime(deadline, ss.pendingSince.Add(ss.cfg.MaxBatchDelay))
		}
		if !ss.heartbeating {
			deadline = minTime(deadline, ss.lastData.Add(ss.cfg.HeartbeatInterval))
		}
		if ss.pinged {
			deadline = minTime(deadline, ss.heard.Add(ss.cfg.ReceiveTimeout))
		} else {
			deadline = minTime(deadline, ss.heard.Add(ss.cfg.ReceiveTimeout/2))
		}
		if !deadline.Equal(ss.deadline) {
			nc.SetReadDeadline(deadline)
			ss.deadline = deadline
		}
		msg, err := ss.conn.ReceiveMessage(context.Background())
		if err != nil {
			if pgconn.Timeout(err) || errors.Is(err, os.ErrDeadlineExceeded) {
				if err := ss.checkSilence(time.Now()); err != nil {
					return err
				}
				continue
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				// What a read sees both when the server closes the
				// connection and when the kernel gives it up (no
				// acknowledgement within TCP_USER_TIMEOUT).
				return fmt.Errorf("cdc: receive: the connection ended (closed by the server, or given up for want of acknowledgements): %w", err)
			}
			return fmt.Errorf("cdc: receive: %w", err)
		}
		switch msg := msg.(type) {
		case *pgproto3.CopyData:
			if err := ss.handleCopyData(ctx, msg.Data); err != nil {
				return err
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("cdc: replication: %w", pgconn.ErrorResponseToPgError(msg))
		case *pgproto3.CopyDone:
			return errors.New("cdc: server ended the replication stream")
		default:
			// NoticeResponse, ParameterStatus: nothing to do.
		}
	}
}

func (ss *session) handleCopyData(ctx context.Context, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	switch data[0] {
	case pglogrepl.XLogDataByteID:
		if len(data) < 25 {
			return fmt.Errorf("cdc: %w: XLogData of %d bytes", ErrMalformed, len(data))
		}
		if at := LSN(binary.BigEndian.Uint64(data[1:])); at > ss.received {
			ss.received = at
		}
		txn, err := ss.dec.Decode(data[25:])
		if err != nil {
			return fmt.Errorf("cdc: decode at %s: %w", ss.received, err)
		}
		ss.lastData = time.Now()
		ss.heard, ss.pinged = ss.lastData, false
		ss.txnBytes += len(data)
		if txn == nil {
			if ss.txnBytes < ss.cfg.MaxBatchBytes {
				return nil
			}
			// A transaction this large goes over in parts, so that what
			// waits for the consumer stays bounded however large it is.
			if txn = ss.dec.Split(); txn == nil {
				return nil
			}
		}
		size := ss.txnBytes
		ss.txnBytes = 0
		if txn.More && txn.CommitLSN < ss.handed || !txn.More && (txn.EndLSN <= ss.handed || txn.EndLSN <= ss.pendingPos) {
			ss.cfg.Logger.Debug("dropping transaction already handed over", "xid", txn.XID, slogLSN("commit_lsn", txn.CommitLSN), slogLSN("handed_lsn", ss.handed))
			return nil
		}
		if txn.CommitLSN == ss.partLSN && ss.partLSN != 0 {
			// Sent again after a reconnect: skip what was handed.
			skip := min(max(ss.partHanded-txn.first, 0), len(txn.Changes))
			txn.Changes, txn.first = txn.Changes[skip:], txn.first+skip
			if txn.More && len(txn.Changes) == 0 {
				return nil
			}
		}
		if len(ss.pending) == 0 {
			ss.pendingSince = ss.lastData
			ss.pending = make([]Txn, 0, min(ss.cfg.MaxBatchTxns, 16))
		}
		ss.pending = append(ss.pending, *txn)
		if !txn.More {
			ss.pendingPos = txn.EndLSN
		}
		ss.pendingBytes += size
		return nil

	case pglogrepl.PrimaryKeepaliveMessageByteID:
		pkm, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("cdc: %w: %w", ErrMalformed, err)
		}
		ss.heard, ss.pinged = time.Now(), false
		if pkm.ServerWALEnd > ss.received {
			ss.received = pkm.ServerWALEnd
		}
		if !ss.dec.InTxn() {
			if len(ss.pending) > 0 {
				ss.pendingPos = max(ss.pendingPos, pkm.ServerWALEnd)
			} else if pkm.ServerWALEnd > ss.handed {
				select {
				case ss.out <- Batch{Position: pkm.ServerWALEnd}:
					ss.handed = pkm.ServerWALEnd
				default: // the consumer is busy; a later keepalive will do
				}
			}
		}
		if pkm.ReplyRequested {
			if err := ss.sendStatus(false); err != nil {
				return err
			}
			return ss.checkShutdown(pkm.ServerWALEnd)
		}
		return nil
	}
	return nil
}

// checkSilence asks the server for a reply once it has been silent for
// half of ReceiveTimeout, and gives the connection up after all of it.
func (ss *session) checkSilence(now time.Time) error {
	quiet := now.Sub(ss.heard)
	switch {
	case quiet >= ss.cfg.ReceiveTimeout:
		return fmt.Errorf("cdc: nothing from the server for %v, not even an answer to a request for one (receive timeout %v): the server or the network is gone",
			quiet.Round(time.Millisecond), ss.cfg.ReceiveTimeout)
	case quiet >= ss.cfg.ReceiveTimeout/2 && !ss.pinged:
		ss.pinged = true
		return ss.sendStatus(true)
	}
	return nil
}

// errServerStopping is returned (and the connection closed) when the server
// is shutting down and waits for a flush position the consumer has not
// acknowledged: staying connected would hold up the shutdown indefinitely.
var errServerStopping = errors.New("cdc: server is shutting down and waits for an acknowledgement the consumer has not given; disconnecting to let it stop")

// checkShutdown spots a server in shutdown. We answer every status request
// at once and send updates every StatusInterval, so a live walsender asks
// for a reply at most every wal_sender_timeout/2; a walsender finishing a
// shutdown instead asks again after each answer until the flush position
// reaches what it sent. After a second of that, disconnect: the server can
// stop, and the transactions not acknowledged come again after the
// reconnect (and are dropped as already handed over).
func (ss *session) checkShutdown(walEnd LSN) error {
	now := time.Now()
	if now.Sub(ss.lastReplyReq) > time.Second {
		ss.replyStreak, ss.replyStreakStart = 0, now
	}
	ss.replyStreak++
	ss.lastReplyReq = now
	if ss.replyStreak >= 5 && now.Sub(ss.replyStreakStart) >= time.Second && ss.flushSent < walEnd {
		ss.cfg.Logger.Info("server is shutting down; disconnecting", slogLSN("server_wal_end", walEnd), slogLSN("flush_lsn", ss.flushSent))
		return errServerStopping
	}
	return nil
}

// handedOver records b as handed over.
func (ss *session) handedOver(b Batch) {
	ss.handed = max(ss.handed, b.Position)
	ss.pending, ss.pendingPos, ss.pendingBytes = nil, 0, 0
	for i := range b.Txns {
		switch t := &b.Txns[i]; {
		case t.More:
			ss.partLSN, ss.partHanded = t.CommitLSN, t.first+len(t.Changes)
		case t.CommitLSN == ss.partLSN:
			ss.partLSN, ss.partHanded = 0, 0
		}
	}
}

// flush hands the pending transactions over, blocking as long as the
// consumer does while keeping the standby status updates flowing.
func (ss *session) flush(ctx context.Context) error {
	b := Batch{Txns: ss.pending, Position: ss.pendingPos}
	var timer *time.Timer
	for {
		select {
		case ss.out <- b:
			ss.handedOver(b)
			if timer != nil {
				timer.Stop()
			}
			return nil
		default:
		}
		wait := time.Until(ss.nextStatus)
		if wait <= 0 {
			if err := ss.sendStatus(false); err != nil {
				return err
			}
			continue
		}
		if timer == nil {
			timer = time.NewTimer(wait)
		} else {
			timer.Reset(wait)
		}
		select {
		case ss.out <- b:
			ss.handedOver(b)
			timer.Stop()
			return nil
		case <-ctx.Done():
			timer.Stop()
			return ctx.Err()
		case <-timer.C:
		}
	}
}

// sendStatus sends a standby status update with write, flush and apply all
// set explicitly. (pglogrepl.SendStandbyStatusUpdate would replace a zero
// flush position by the write position, confirming WAL nobody has made
// durable.)
func (ss *session) sendStatus(replyRequested bool) error {
	flush := ss.ack.FlushLSN()
	// Never confirm beyond what was handed over, never move backwards.
	flush = min(flush, ss.handed)
	flush = max(flush, ss.flushSent)
	write := max(ss.received, flush)
	now := time.Now()

	buf := make([]byte, 0, 5+34)
	buf = append(buf, 'd', 0, 0, 0, 4+34)
	buf = append(buf, pglogrepl.StandbyStatusUpdateByteID)
	buf = binary.BigEndian.AppendUint64(buf, uint64(write))
	buf = binary.BigEndian.AppendUint64(buf, uint64(flush))
	buf = binary.BigEndian.AppendUint64(buf, uint64(flush)) // apply
	buf = binary.BigEndian.AppendUint64(buf, uint64(now.Sub(pgEpoch).Microseconds()))
	if replyRequested {
		buf = append(buf, 1)
	} else {
		buf = append(buf, 0)
	}
	nc := ss.conn.Conn()
	nc.SetWriteDeadline(now.Add(10 * time.Second))
	if err := ss.conn.Frontend().SendUnbufferedEncodedCopyData(buf); err != nil {
		return fmt.Errorf("cdc: send standby status: %w", err)
	}
	ss.flushSent = flush
	ss.nextStatus = now.Add(ss.cfg.StatusInterval)
	ss.setStatus(func(st *Status) {
		st.ReceivedLSN, st.FlushedLSN, st.LastStatusAt = ss.received, flush, now
	})
	return nil
}

var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// heartbeat writes a WAL record on an ordinary connection when no data
// arrived for HeartbeatInterval, in its own goroutine so the replication
// connection keeps being served.
func (ss *session) heartbeat(ctx context.Context, now time.Time) {
	if ss.heartbeating {
		select {
		case err := <-ss.heartbeatErr:
			ss.heartbeating = false
			ss.lastData = now
			if err != nil {
				ss.cfg.Logger.Warn("heartbeat failed", "error", err)
			}
		default:
		}
		return
	}
	if now.Sub(ss.lastData) < ss.cfg.HeartbeatInterval {
		return
	}
	ss.heartbeating = true
	ss.wg.Add(1)
	go func() {
		defer ss.wg.Done()
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		ss.heartbeatErr <- ss.emitHeartbeat(hctx)
	}()
}

func (s *Stream) emitHeartbeat(ctx context.Context) error {
	conn, err := s.connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, `SELECT pg_logical_emit_message(false, 'outbox-relay-heartbeat', '')`)
	return err
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func slogLSN(key string, lsn LSN) slog.Attr { return slog.String(key, lsn.String()) }

func slogSlot(name string) slog.Attr { return slog.String("slot", name) }
