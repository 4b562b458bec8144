package relay

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/cdc"
	"github.com/outbox-relay/outbox-relay/limiter"
)

// ErrSchemaMissing means the relay schema is not installed.
var ErrSchemaMissing = errors.New("relay schema is missing or older than this relay: run `outbox-relay migrate --database-url ...` first")

// Relay streams outbox rows and delivers them. Create it with New and
// start it with Run.
type Relay struct {
	cfg  Config
	log  *slog.Logger
	now  func() time.Time
	pool *pgxpool.Pool

	stream *cdc.Stream
	wm     *watermark
	sched  *scheduler
	writer *writer
	client *deliveryClient
	config *configState

	recorded  cdc.LSN       // highest end LSN with recorded rows at startup
	spilled   atomic.Bool   // rows were spilled: the loader should look soon
	history   historyBatch  // endpoint versions of the batch being dispatched (history.go)
	histq     *historyQueue // versions on their way to relay.endpoint_history
	recent    recentSet     // endpoints routed to lately; dispatch goroutine only
	changeLog changeLog     // how many endpoint changes a transaction has logged (dispatch.go)

	reportedEndpoints int // last count given to Config.EndpointsChanged

	metrics  *metrics
	health   *health
	state    atomic.Value  // string: "starting", "standby", "active", "stopped"
	attempts atomic.Uint64 // HTTP attempts made, for Attempts
}

// Attempts is the number of HTTP delivery attempts this relay has made.
func (r *Relay) Attempts() uint64 { return r.attempts.Load() }

// New validates cfg and builds a Relay. It does not connect.
func New(cfg Config) (*Relay, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("relay config: %w", err)
	}
	cfg = cfg.withDefaults()
	r := &Relay{
		cfg:    cfg,
		log:    cfg.Logger,
		now:    cfg.Now,
		wm:     &watermark{},
		histq:  newHistoryQueue(),
		sched:  newScheduler(cfg.QueueEvents, cfg.QueueBytes, cfg.EndpointMaxInFlight),
		config: newConfigState(),
		health: newHealth(),
	}
	r.sched.now = cfg.Now
	r.sched.tenantMaxInFlight = cfg.TenantMaxInFlight
	r.sched.limits = limiter.New()
	r.sched.breakerChanged = r.breakerChanged
	if cfg.Overflow == OverflowSpill {
		// Under block, nothing is written to make room: a long-parked
		// endpoint keeps its deliveries in memory.
		r.sched.evicted = r.evict
		r.sched.maxHeld = max(0, cfg.HeldEvents)
	}
	// Ordered endpoints keep their deliveries as rows under either policy
	// (lane.go).
	r.sched.toRows = func(ds []*delivery) { r.writer.addNoWait(ds...) }
	r.sched.loadSoon = func() { r.spilled.Store(true) }
	r.state.Store("starting")
	r.client = newDeliveryClient(cfg)
	r.metrics = newMetrics(cfg.Registerer, r)
	return r, nil
}

// State is "starting", "standby", "active" or "stopped".
func (r *Relay) State() string { return r.state.Load().(string) }

// Ready reports whether the relay is doing its job, for a readiness probe:
// streaming with a live replication connection, or standing by while
// another relay streams. The reason says why not.
func (r *Relay) Ready() (bool, string) {
	switch r.State() {
	case "standby":
		return true, "standby: another relay holds the slot"
	case "active":
		st := r.stream.Status()
		if st.Connected {
			return true, "streaming"
		}
		if st.LastError != nil {
			return false, "replication disconnected: " + st.LastError.Error()
		}
		return false, "replication connecting"
	}
	return false, r.State()
}

// Run connects, waits to become the active relay for its slot, and
// streams and delivers until ctx is done or a fatal error occurs.
func (r *Relay) Run(ctx context.Context) error {
	defer r.state.Store("stopped")
	defer r.client.CloseIdleConnections()
	pool, err := openPool(ctx, r.cfg.DatabaseURL, 8)
	if err != nil {
		return err
	}
	defer pool.Close()
	r.pool = pool
	// Endpoint versions are recorded from startup on (the snapshot) until
	// Run returns; stopped before the pool closes.
	histCtx, stopHist := context.WithCancel(ctx)
	histDone := make(chan struct{})
	go func() { defer close(histDone); r.historyLoop(histCtx) }()
	defer func() { stopHist(); <-histDone }()
	lock, err := r.startup(ctx)
	if err != nil {
		return err
	}
	defer func() { lock.Close(context.Background()) }()
	r.writer = &writer{
		pool: pool, slot: r.cfg.SlotName, log: r.log,
		maxBatch: r.cfg.StatusBatch, interval: r.cfg.StatusInterval,
		kick: make(chan struct{}, 1), written: r.metrics.written, writeSecs: r.metrics.statusWriteSecs,
		maxBuffered: 4 * r.cfg.StatusBatch, wrote: make(chan struct{}, 1), slowAfter: r.cfg.slowSQL,
	}
	r.writer.space = sync.NewCond(&r.writer.mu)
	r.log.Info("relay active", slog.String("slot", r.cfg.SlotName), slog.Int("workers", r.cfg.Workers),
		slog.String("overflow", string(r.cfg.Overflow)), slog.String("recorded_lsn", r.recorded.String()))

	// Shutdown order: stop reading, stop handing out work, let workers
	// finish their attempt, then write the last status rows.
	streamCtx, stopStream := context.WithCancelCause(ctx)
	defer stopStream(nil)
	writerCtx, stopWriter := context.WithCancel(context.Background())
	defer stopWriter()

	var wg, workers sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); r.writer.run(writerCtx) }()
	// Attempts in flight at shutdown get ShutdownGrace to finish.
	workCtx, stopWork := context.WithCancel(context.Background())
	defer stopWork()
	for range r.cfg.Workers {
		workers.Add(1)
		go func() { defer workers.Done(); r.work(workCtx) }()
	}
	wg.Add(7)
	go func() { defer wg.Done(); r.sched.unparkLoop() }()
	go func() { defer wg.Done(); r.laneLoop(streamCtx) }()
	go func() { defer wg.Done(); r.runHealth(writerCtx) }()
	go func() { defer wg.Done(); r.slotLoop(streamCtx) }()
	go func() { defer wg.Done(); r.loadLoop(streamCtx) }()
	go func() { defer wg.Done(); r.holdLoop(streamCtx) }()
	go func() { defer wg.Done(); r.cleanupLoop(streamCtx) }()

	batches := make(chan cdc.Batch, 1) // with the stream's byte bound per Batch, what waits outside the queues stays small
	dispatchErr := make(chan error, 1)
	go func() { dispatchErr <- r.dispatch(streamCtx, batches) }()

	lockDone := make(chan struct{})
	go func() { defer close(lockDone); r.keepLock(streamCtx, &lock, stopStream) }()

	runErr := r.stream.Run(streamCtx, batches, r.wm)
	if cause := context.Cause(streamCtx); errors.Is(cause, ErrLostActive) {
		runErr = cause
	}
	stopStream(nil)
	<-lockDone
	if err := <-dispatchErr; err != nil && runErr == nil {
		runErr = err
	}
	r.sched.close()
	workersDone := make(chan struct{})
	go func() { workers.Wait(); close(workersDone) }()
	select {
	case <-workersDone:
	case <-time.After(r.cfg.ShutdownGrace):
		r.log.Warn("in-flight attempts cut short by shutdown; they stay pending", slog.Duration("grace", r.cfg.ShutdownGrace))
		stopWork()
		r.writer.release()
		<-workersDone
	}
	stopWriter()
	wg.Wait()
	if ctx.Err() != nil && (runErr == nil || errors.Is(runErr, context.Canceled)) {
		return nil
	}
	return runErr
}

// startup checks the database, sets up replication, waits to become the
// active relay and loads config. A Postgres restart or a dropped
// connection during startup is retried with backoff; a configuration
// problem (or a database never reached) ends Run with an error that says
// what to fix.
func (r *Relay) startup(ctx context.Context) (*pgx.Conn, error) {
	connected := false
	backoff := 100 * time.Millisecond
	for {
		lock, err := r.startupOnce(ctx, &connected)
		if err == nil {
			return lock, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		// A database never reached is a wrong URL or credentials: say so
		// at once. Once the server has answered, losing it is transient.
		var connErr *pgconn.ConnectError
		if (!connected && errors.As(err, &connErr)) || !transient(err) {
			return nil, err
		}
		r.log.Warn("startup interrupted; retrying", slog.Duration("backoff", backoff), slog.Any("error", err))
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (r *Relay) startupOnce(ctx context.Context, connected *bool) (*pgx.Conn, error) {
	if err := checkSchema(ctx, r.pool); err != nil {
		return nil, err
	}
	if missing := missingIndexes(ctx, r.pool); len(missing) > 0 {
		r.log.Warn("relay.deliveries lacks indexes of this version's schema; run `outbox-relay migrate`: until then claims of due rows are slow",
			slog.Any("missing", missing))
	}
	*connected = true
	stream, err := cdc.New(cdc.Config{
		ConnString:    r.cfg.DatabaseURL,
		SlotName:      r.cfg.SlotName,
		Publication:   r.cfg.Publication,
		Logger:        r.log,
		MaxBatchBytes: r.cfg.StreamBatchBytes,
	})
	if err != nil {
		return nil, err
	}
	r.stream = stream
	if err := stream.Setup(ctx); err != nil {
		return nil, err
	}
	if gap, err := CheckLostSlot(ctx, r.pool, stream, r.cfg.SlotName); err != nil {
		r.log.Warn("could not check for events the lost slot held", slog.Any("error", err))
	} else if gap != nil {
		r.log.Error(gap.Error(), slog.String("slot", r.cfg.SlotName), slog.String("created_lsn", gap.Created.String()),
			slog.String("recorded_lsn", gap.Recorded.String()), slog.Int64("outbox_rows_without_delivery", gap.Undelivered))
	}
	lock, err := r.becomeActive(ctx)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*pgx.Conn, error) {
		lock.Close(context.Background())
		return nil, err
	}
	// A relay that held the lock is gone. If its walsender lingers with a
	// live peer (the old process still runs and streams), end it so the
	// slot is free now. One whose peer has not answered for 2 s is left to
	// end itself: it does within wal_sender_timeout (10 s, set by the
	// stream), while a terminated one would first try to send its peer
	// the error, and can hang there for minutes when that peer vanished
	// from the network.
	if _, err := r.pool.Exec(ctx, `SELECT pg_terminate_backend(s.active_pid) FROM pg_replication_slots s
JOIN pg_stat_replication p ON p.pid = s.active_pid
WHERE s.slot_name = $1 AND p.reply_time > now() - interval '2 seconds'`, r.cfg.SlotName); err != nil {
		r.log.Warn("could not end the previous walsender of the slot", slog.Any("error", err))
	}
	// We are the only relay on this slot: claims left by a dead process
	// are void.
	if _, err := r.pool.Exec(ctx, `UPDATE relay.deliveries SET claimed_until = NULL
WHERE claimed_until IS NOT NULL AND state IN ('pending', 'retrying')`); err != nil {
		return fail(fmt.Errorf("release old claims: %w", err))
	}
	if r.recorded, err = recordedLSN(ctx, r.pool, r.cfg.SlotName); err != nil {
		return fail(err)
	}
	// Ordered endpoints wait for the replay of what was recorded but not
	// confirmed (lane.go, invariant 7); with nothing to replay, they start.
	var confirmed *string
	if err := r.pool.QueryRow(ctx, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`,
		r.cfg.SlotName).Scan(&confirmed); err != nil {
		return fail(fmt.Errorf("read the slot's confirmed position: %w", err))
	}
	if confirmed != nil {
		if lsn, err := pglogrepl.ParseLSN(*confirmed); err == nil && lsn >= r.recorded {
			r.sched.openLanes()
		}
	}
	// Config is read as of the slot's confirmed position (history.go):
	// changes committed after it come again through the stream and are
	// applied in order, so every replayed event is routed with the config
	// committed before it.
	var startLSN cdc.LSN
	if confirmed != nil {
		if startLSN, err = pglogrepl.ParseLSN(*confirmed); err != nil {
			return fail(fmt.Errorf("read the slot's confirmed position: %w", err))
		}
	}
	if err := r.loadConfig(ctx, startLSN); err != nil {
		return fail(err)
	}
	r.state.Store("active")
	return lock, nil
}

// transient reports whether err is a lost connection or a server going
// away, as opposed to a configuration problem.
func transient(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return strings.HasPrefix(pgErr.Code, "57") || strings.HasPrefix(pgErr.Code, "08")
	}
	var connErr *pgconn.ConnectError
	var netErr net.Error
	return errors.As(err, &connErr) || errors.As(err, &netErr) || errors.Is(err, cdc.ErrConnect) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || pgconn.Timeout(err)
}

func checkSchema(ctx context.Context, pool *pgxpool.Pool) error {
	var ok bool
	err := pool.QueryRow(ctx, `SELECT to_regclass('relay.deliveries') IS NOT NULL AND to_regclass('relay.outbox') IS NOT NULL AND to_regclass('relay.endpoint_history') IS NOT NULL
AND EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'relay' AND table_name = 'deliveries' AND column_name = 'claimed_until')
AND EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'relay' AND table_name = 'deliveries' AND column_name = 'event_seq')`).Scan(&ok)
	if err != nil {
		return fmt.Errorf("check relay schema: %w", err)
	}
	if !ok {
		return ErrSchemaMissing
	}
	return nil
}

// missingIndexes lists the indexes the loader's queries rely on that the
// database does not have (a schema migrated by an older version). The
// relay works without them, slowly.
func missingIndexes(ctx context.Context, pool *pgxpool.Pool) []string {
	var missing []string
	for _, name := range []string{"relay.deliveries_due_unclaimed_idx", "relay.deliveries_claimed_idx"} {
		var ok bool
		if err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, name).Scan(&ok); err == nil && !ok {
			missing = append(missing, name)
		}
	}
	return missing
}

func (r *Relay) lockKey() int64 {
	h := fnv.New64a()
	h.Write([]byte("outbox-relay/" + r.cfg.SlotName))
	return int64(h.Sum64())
}

// ErrLostActive means this relay lost its lock and another relay took
// over the slot; run it again (as a standby).
var ErrLostActive = errors.New("another relay took over the slot after this one lost its lock connection; restart this process and it stands by")

// keepLock watches the lock connection. If it breaks (a Postgres restart,
// a network cut), it takes the lock again on a new connection; if another
// relay got it first, it ends the pipeline with ErrLostActive.
func (r *Relay) keepLock(ctx context.Context, lock **pgx.Conn, lost func(error)) {
	t := time.NewTicker(r.cfg.StandbyPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := (*lock).Ping(ctx); err == nil || ctx.Err() != nil {
			continue
		}
		r.log.Warn("lock connection lost; taking the lock again")
		(*lock).Close(context.Background())
		for ctx.Err() == nil {
			conn, err := r.connectLock(ctx)
			if err == nil {
				var got bool
				err = conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, r.lockKey()).Scan(&got)
				if err == nil && got {
					*lock = conn
					r.log.Info("lock taken again")
					break
				}
				conn.Close(context.Background())
				if err == nil {
					lost(ErrLostActive)
					return
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(r.cfg.StandbyPoll):
			}
		}
	}
}

// connectLock opens a connection for the advisory lock, with the relay's
// session settings: the server notices within seconds if this relay
// vanishes without closing it (its keepalives), so a standby can take over.
func (r *Relay) connectLock(ctx context.Context) (*pgx.Conn, error) {
	conn, err := cdc.Connect(ctx, r.cfg.DatabaseURL)
	if errors.As(err, new(*pgconn.ParseConfigError)) {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	return conn, err
}

// becomeActive takes the slot's advisory lock on a dedicated connection,
// waiting as a standby while another relay holds it. The lock lives as
// long as the returned connection.
func (r *Relay) becomeActive(ctx context.Context) (*pgx.Conn, error) {
	key := r.lockKey()
	logged := false
	for {
		conn, err := r.connectLock(ctx)
		if err == nil {
			var got bool
			if err = conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, key).Scan(&got); err == nil && got {
				return conn, nil
			}
			conn.Close(context.Background())
			if err == nil && !logged {
				r.state.Store("standby")
				r.log.Info("another relay is active on this slot; standing by", slog.String("slot", r.cfg.SlotName))
				logged = true
			}
		}
		if err != nil {
			r.log.Warn("standby check failed", slog.Any("error", err))
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(r.cfg.StandbyPoll):
		}
	}
}

// loadConfig reads endpoints and tenants. Changes after this arrive
// through the replication stream.
func (r *Relay) loadConfig(ctx context.Context, at cdc.LSN) error {
	current, err := queryRows(ctx, r.pool, `SELECT id, tenant_id, url, secrets::text, event_types::text, enabled::text,
timeout_ms::text, headers::text, disabled_reason, retry_schedule::text, max_attempts::text, rate_limit::text,
rate_burst::text, max_in_flight::text, breaker_failures::text, breaker_cooldown_ms::text, ordered::text FROM relay.endpoints`)
	if err != nil {
		return fmt.Errorf("load endpoints: %w", err)
	}
	eps, changed := current, 0
	var snapshot []historyEntry
	if at != 0 {
		if eps, snapshot, changed, err = endpointsAt(ctx, r.pool, at, current); err != nil {
			return err
		}
	}
	if changed > 0 {
		r.log.Info("endpoint config as of the slot's confirmed position; the replay applies the changes since",
			slog.String("lsn", at.String()), slog.Int("endpoints_changed_since", changed))
	}
	for _, row := range eps {
		r.installEndpoint(r.config.upsertEndpoint(row, r.log))
	}
	tenants, err := queryRows(ctx, r.pool, `SELECT id, weight::text, rate_limit::text, rate_burst::text FROM relay.tenants`)
	if err != nil {
		return fmt.Errorf("load tenants: %w", err)
	}
	for _, row := range tenants {
		r.installTenant(r.config.upsertTenant(row))
	}
	r.log.Info("config loaded", slog.Int("endpoints", len(eps)), slog.Int("tenants", len(tenants)))
	r.endpointsChanged()
	if err := r.loadHealth(ctx); err != nil {
		return err
	}
	if len(snapshot) > 0 {
		// Queued last, so a startup retried after a failure above does
		// not queue it twice. Recorded in the background; the slot is not
		// acknowledged past at until it is (history.go, invariant 2).
		r.histq.add(snapshot, []*txnMark{r.wm.add(at, 1)})
	}
	return nil
}

// endpointsChanged reports the endpoint count to Config.EndpointsChanged
// when it differs from the last one reported.
func (r *Relay) endpointsChanged() {
	if n := len(r.config.endpoints); r.cfg.EndpointsChanged != nil && n != r.reportedEndpoints {
		r.reportedEndpoints = n
		r.cfg.EndpointsChanged(n)
	}
}

// installEndpoint hands a new endpoint version to the scheduler and
// records why the deliveries it can no longer take end.
func (r *Relay) installEndpoint(ep *Endpoint) {
	if ep == nil {
		return
	}
	if ep.Enabled {
		r.health.enabled(ep.ID)
	}
	drained := r.sched.setEndpoint(ep)
	now := r.now()
	state, reason, _ := ep.refusal()
	for _, d := range drained {
		d.state, d.errText, d.completed = state, reason, now
	}
	if len(drained) > 0 && r.writer != nil {
		r.writer.add(drained...)
	}
}

func (r *Relay) installTenant(t *Tenant) {
	if t == nil {
		return
	}
	r.sched.setTenantWeight(t.ID, t.Weight)
	r.sched.limits.Tenants().Configure(t.ID, t.Limit, r.now())
}

// queryRows runs a query whose columns are all text and returns each row
// as a map by column name.
func queryRows(ctx context.Context, pool *pgxpool.Pool, sql string) ([]mapRow, error) {
	rows, err := pool.Query(ctx, sql)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	fields := rows.FieldDescriptions()
	var out []mapRow
	for rows.Next() {
		vals := make([]*string, len(fields))
		dest := make([]any, len(fields))
		for i := range vals {
			dest[i] = &vals[i]
		}
		if err := rows.Scan(dest...); err != nil {
			return nil, err
		}
		m := make(mapRow, len(fields))
		for i, f := range fields {
			m[f.Name] = vals[i]
		}
		out = append(out, m)
	}
	return out, rows.Err()
}
