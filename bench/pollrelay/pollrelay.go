// Package pollrelay is the comparison peer for `outbox-relay bench`: the
// polling outbox relay teams usually write instead of reading the WAL. It is
// not part of the product.
//
// The design, written as well as that design allows:
//
//   - Pollers goroutines (default 2) each loop: BEGIN; claim up to Batch
//     rows with SELECT ... ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT
//     Batch; hand them to a shared pool of Workers HTTP senders (the same
//     concurrency as the relay's --workers); wait for the batch; DELETE the
//     delivered ids; COMMIT. Rows whose POST failed stay locked until the
//     commit and are claimed again by a later poll (at-least-once, like any
//     outbox poller). With two pollers one batch is posted while the other
//     commits, so the senders do not sit idle during the commit's fsync.
//   - A poller that claims nothing sleeps PollInterval (default 100 ms).
//   - Each request is signed per Standard Webhooks with the project's signer
//     package and carries the headers the relay sends (webhook-id,
//     webhook-timestamp, webhook-signature, content-type, user-agent), over an
//     http.Transport with the relay's settings, so the work per request
//     matches.
//
// With Config.Endpoints set, each row goes to the URL of its endpoint_id
// column (the map stands for the poller's cache of the endpoints table);
// otherwise every row goes to Config.URL.
//
// Delivered rows are deleted in the claiming transaction: it is the cheapest
// honest design (one index-scan DELETE per batch, no UPDATE churn, and the
// queue never grows with delivered rows).
package pollrelay

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/signer"
)

// Config configures Run.
type Config struct {
	// Pool connects to the database holding Table. Required.
	Pool *pgxpool.Pool
	// Table is the outbox table, with relay.outbox's columns (at least id
	// uuid, payload jsonb, created_at). Default "bench_outbox".
	Table string
	// URL receives every event. Required unless Endpoints is set.
	URL string
	// Endpoints, when set, routes each row to the URL of its endpoint_id
	// (endpoint id -> URL, loaded once, as a poller would cache
	// relay.endpoints); a row whose endpoint_id is NULL or not in the map
	// counts as a failed post and stays. Default: every row goes to URL.
	Endpoints map[string]string
	// Secret signs every request. Required.
	Secret signer.Secret
	// Workers is how many requests are in flight at most. Default 64.
	Workers int
	// Pollers is how many claim loops run at once. Default 2.
	Pollers int
	// Batch is how many rows one claim takes at most. Default 500.
	Batch int
	// PollInterval is the sleep after a claim that found nothing. Default 100ms.
	PollInterval time.Duration
	// Timeout bounds each request. Default 10s (the relay's default).
	Timeout time.Duration
	// UserAgent is sent with every request. Default "pollrelay".
	UserAgent string
}

// Stats counts what Run did.
type Stats struct {
	Claims    atomic.Int64 // claiming transactions that found rows
	Empty     atomic.Int64 // polls that found nothing
	Delivered atomic.Int64
	Failed    atomic.Int64 // POSTs that failed; the row is claimed again later
}

// CreateTable creates table with the columns and indexes of relay.outbox
// (LIKE ... INCLUDING ALL), if it does not exist. The project's schema is
// not touched.
func CreateTable(ctx context.Context, pool *pgxpool.Pool, table string) error {
	t := pgx.Identifier{cmp.Or(table, "bench_outbox")}.Sanitize()
	_, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+t+` (LIKE relay.outbox INCLUDING ALL)`)
	return err
}

type job struct {
	id      [16]byte
	payload []byte
	url     string // "" = no known endpoint: fails without a request
	ok      bool
	wg      *sync.WaitGroup
}

// Run delivers until ctx ends, then returns nil (or the first database
// error). In-flight batches are rolled back when ctx ends, so their rows are
// claimed again by the next run.
func Run(ctx context.Context, cfg Config, stats *Stats) error {
	if cfg.Pool == nil || (cfg.URL == "" && cfg.Endpoints == nil) || cfg.Secret.IsZero() {
		return errors.New("pollrelay: Pool, URL (or Endpoints) and Secret are required")
	}
	cfg.Table = cmp.Or(cfg.Table, "bench_outbox")
	cfg.Workers = cmp.Or(cfg.Workers, 64)
	cfg.Pollers = cmp.Or(cfg.Pollers, 2)
	cfg.Batch = cmp.Or(cfg.Batch, 500)
	cfg.PollInterval = cmp.Or(cfg.PollInterval, 100*time.Millisecond)
	cfg.Timeout = cmp.Or(cfg.Timeout, 10*time.Second)
	cfg.UserAgent = cmp.Or(cfg.UserAgent, "pollrelay")
	if stats == nil {
		stats = new(Stats)
	}
	// The relay's transport settings (relay/worker.go), minus its SSRF
	// dial guard.
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        cfg.Workers * 4,
		MaxIdleConnsPerHost: cfg.Workers,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
		DisableCompression:  true,
		TLSClientConfig:     &tls.Config{MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2:   true,
	}
	defer tr.CloseIdleConnections()
	p := &peer{
		cfg:    cfg,
		stats:  stats,
		client: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		signer: signer.NewSigner(cfg.Secret),
		jobs:   make(chan *job, cfg.Workers),
		ua:     []string{cfg.UserAgent},
	}
	var senders sync.WaitGroup
	for range cfg.Workers {
		senders.Add(1)
		go func() { defer senders.Done(); p.send(ctx) }()
	}
	errs := make(chan error, cfg.Pollers)
	var pollers sync.WaitGroup
	for range cfg.Pollers {
		pollers.Add(1)
		go func() { defer pollers.Done(); errs <- p.poll(ctx) }()
	}
	pollers.Wait()
	close(p.jobs)
	senders.Wait()
	close(errs)
	for err := range errs {
		if err != nil && ctx.Err() == nil {
			return err
		}
	}
	return nil
}

type peer struct {
	cfg    Config
	stats  *Stats
	client *http.Client
	signer *signer.Signer
	jobs   chan *job
	ua     []string
}

func (p *peer) poll(ctx context.Context) error {
	table := pgx.Identifier{p.cfg.Table}.Sanitize()
	cols := `id, payload::text`
	if p.cfg.Endpoints != nil {
		cols += `, endpoint_id`
	}
	claim := `SELECT ` + cols + ` FROM ` + table + ` ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT ` + strconv.Itoa(p.cfg.Batch)
	del := `DELETE FROM ` + table + ` WHERE id = ANY($1)`
	batch := make([]*job, 0, p.cfg.Batch)
	var ids [][16]byte
	for ctx.Err() == nil {
		n, err := p.once(ctx, claim, del, &batch, &ids)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("pollrelay: %w", err)
		}
		if n == 0 {
			p.stats.Empty.Add(1)
			select {
			case <-ctx.Done():
			case <-time.After(p.cfg.PollInterval):
			}
		}
	}
	return nil
}

// once claims, posts and deletes one batch in one transaction.
func (p *peer) once(ctx context.Context, claim, del string, batch *[]*job, ids *[][16]byte) (int, error) {
	tx, err := p.cfg.Pool.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // no-op after Commit
	rows, err := tx.Query(ctx, claim)
	if err != nil {
		return 0, err
	}
	var wg sync.WaitGroup
	b := (*batch)[:0]
	var endpointID *string
	for rows.Next() {
		j := &job{wg: &wg, url: p.cfg.URL}
		dst := []any{&j.id, &j.payload}
		if p.cfg.Endpoints != nil {
			dst = append(dst, &endpointID)
		}
		if err := rows.Scan(dst...); err != nil {
			rows.Close()
			return 0, err
		}
		if p.cfg.Endpoints != nil {
			j.url = ""
			if endpointID != nil {
				j.url = p.cfg.Endpoints[*endpointID]
			}
		}
		b = append(b, j)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, err
	}
	*batch = b
	if len(b) == 0 {
		return 0, tx.Commit(ctx)
	}
	p.stats.Claims.Add(1)
	wg.Add(len(b))
	for _, j := range b {
		p.jobs <- j
	}
	wg.Wait()
	d := (*ids)[:0]
	for _, j := range b {
		if j.ok {
			d = append(d, j.id)
		}
	}
	*ids = d
	if len(d) > 0 {
		if _, err := tx.Exec(ctx, del, d); err != nil {
			return 0, err
		}
	}
	return len(b), tx.Commit(ctx)
}

func (p *peer) send(ctx context.Context) {
	var sig []byte
	var msgID [4 + 32]byte
	copy(msgID[:], "msg_")
	for j := range p.jobs {
		hex.Encode(msgID[4:], j.id[:])
		id := string(msgID[:])
		err := errNoEndpoint
		if j.url != "" {
			sig, err = p.post(ctx, j.url, id, j.payload, sig)
		}
		j.ok = err == nil
		if j.ok {
			p.stats.Delivered.Add(1)
		} else {
			p.stats.Failed.Add(1)
		}
		j.wg.Done()
	}
}

var contentTypeJSON = []string{"application/json"}

var errNoEndpoint = errors.New("row has no known endpoint_id")

func (p *peer) post(ctx context.Context, url, msgID string, body, sig []byte) ([]byte, error) {
	now := time.Now().Unix()
	sig = p.signer.AppendSignature(sig[:0], msgID, now, body)
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return sig, err
	}
	req.Header = http.Header{
		"Content-Type":      contentTypeJSON,
		"User-Agent":        p.ua,
		"Webhook-Id":        {msgID},
		"Webhook-Timestamp": {strconv.FormatInt(now, 10)},
		"Webhook-Signature": {string(sig)},
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return sig, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return sig, fmt.Errorf("receiver answered %d", resp.StatusCode)
	}
	return sig, nil
}
