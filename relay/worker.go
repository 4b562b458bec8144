package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/internal/h1"
	"github.com/outbox-relay/outbox-relay/internal/netguard"
	"github.com/outbox-relay/outbox-relay/internal/retrypolicy"
)

// maxResponseBytes is how much of a response body is read (and then
// discarded, so the connection can be reused); errorSnippetBytes of it is
// kept in the row when the answer is not 2xx.
const (
	maxResponseBytes  = 64 << 10
	errorSnippetBytes = 256
)

// deliveryClient is the one HTTP client every worker shares: keep-alive,
// no redirects, and the SSRF guard on every dial.
type deliveryClient struct {
	h1.Client // plain http:// through h1 when the lean client is on
	userAgent []string
}

// The values of Config.HTTPClient.
const (
	HTTPClientLean    = "lean"
	HTTPClientNetHTTP = "net/http"
)

func newDeliveryClient(cfg Config) *deliveryClient {
	guard := &netguard.Guard{Allow: cfg.AllowNetworks}
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second, Control: guard.Control}
	tr := &http.Transport{
		DialContext:           dialer.DialContext,
		MaxIdleConns:          cfg.Workers * 4,
		MaxIdleConnsPerHost:   cfg.Workers,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: 0,
		DisableCompression:    true,
		TLSClientConfig:       &tls.Config{RootCAs: cfg.RootCAs, MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2:     true,
		ResponseHeaderTimeout: 0, // the per-endpoint timeout covers it
	}
	var plain *h1.Transport
	if cfg.HTTPClient != HTTPClientNetHTTP {
		plain = &h1.Transport{Dial: dialer.DialContext, MaxIdlePerHost: cfg.Workers, MaxIdle: cfg.Workers * 4, IdleTimeout: 90 * time.Second}
	}
	return &deliveryClient{
		Client: h1.Client{Plain: plain, Other: &http.Client{
			Transport: tr,
			// Never follow redirects: a moved receiver must be
			// reconfigured, and the row says where it pointed.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}},
		userAgent: []string{cfg.UserAgent},
	}
}

var contentTypeJSON = []string{"application/json"}

// work is one worker: take a delivery, attempt it, record the outcome.
func (r *Relay) work(ctx context.Context) {
	var sig []byte
	for {
		d := r.sched.next()
		if d == nil {
			return
		}
		sig = r.attempt(ctx, d, d.ep, sig) // next set d.ep to the endpoint's current config
		if d.breakerDone != nil {          // never attempted: says nothing of the receiver
			d.breakerDone(errNotCounted)
			d.breakerDone = nil
		}
		finishLater := r.sched.done(d)
		r.writer.add(d)
		if finishLater {
			r.sched.finish(d)
		}
	}
}

// attempt makes one HTTP attempt and records its outcome in d.
func (r *Relay) attempt(ctx context.Context, d *delivery, ep *Endpoint, sig []byte) []byte {
	now := r.now()
	d.failClass = ""
	if d.payload == nil {
		// Spilled by reference, and its outbox row was deleted before it
		// was loaded back (outbox rows are never NULL).
		d.state, d.errText, d.completed = StateDead, "the outbox row holding this pending delivery's payload was deleted before it could be delivered", now
		return sig
	}
	if len(d.payload) > r.cfg.MaxPayloadBytes {
		// Routing rejects these; a replayed or loaded row meets the limit
		// in force now here, before anything is sent.
		d.state, d.errText, d.completed = StateRejected, tooBigReason(len(d.payload), r.cfg.MaxPayloadBytes), now
		return sig
	}
	if state, reason, refused := ep.refusal(); refused {
		d.state, d.errText, d.completed = state, reason, now
		return sig
	}
	d.attempts++
	if d.firstAttempt.IsZero() {
		d.firstAttempt = now
	}
	d.lastAttempt = now
	msgID := d.webhookID()
	sig = ep.signer.AppendSignature(sig[:0], msgID, now.Unix(), d.payload)

	ts := strconv.FormatInt(now.Unix(), 10)
	var resp *http.Response
	var err error
	if p := r.preparedHead(ep); p != nil && d.headers == nil && r.cfg.Tracer == nil {
		// The common case: a request head rendered once per endpoint
		// version, four fields and the body appended (h1.Post).
		fields := [...]h1.Field{{Name: "Webhook-Id", Value: msgID}, {Name: "Webhook-Timestamp", Value: ts},
			{Name: "Webhook-Signature", Value: string(sig)}, {Name: "Traceparent", Value: d.traceparent}}
		n := len(fields)
		if d.traceparent == "" {
			n--
		}
		resp, err = r.client.Plain.Post(ctx, time.Now().Add(ep.Timeout), p, fields[:n], d.payload)
	} else {
		var finish func()
		resp, finish, err = r.attemptRequest(ctx, d, ep, msgID, ts, sig)
		defer finish() // after the answer is read and d holds the outcome
	}
	var status int
	var respHeader http.Header
	var snippet []byte
	if err == nil {
		status, respHeader = resp.StatusCode, resp.Header
		if status < 200 || status > 299 {
			snippet, _ = io.ReadAll(io.LimitReader(resp.Body, errorSnippetBytes))
		}
		// Drain (bounded) so the connection goes back to the pool.
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseBytes))
		resp.Body.Close()
	}
	end := r.now()
	d.duration = end.Sub(now)
	r.metrics.attemptDuration.Observe(d.duration.Seconds())
	r.attempts.Add(1)
	d.httpStatus = status
	dec := retrypolicy.Classify(status, respHeader, err)
	if dec.Outcome != retrypolicy.Success {
		d.failClass = dec.Class
	}
	if dec.Outcome == retrypolicy.Success {
		r.metrics.attemptsOK.Inc() // the common case skips the label lookup
	} else {
		r.metrics.attemptsByClass.WithLabelValues(dec.Class).Inc()
	}
	// The breaker and failure streak count what says something about the
	// receiver's health: a 2xx (healthy) or a retryable failure (unwell).
	// A 4xx or a refused address says nothing; a shutdown either.
	shutdown := ctx.Err() != nil && err != nil
	r.outcome(d, ep, dec.Outcome == retrypolicy.Success, dec.Outcome == retrypolicy.Retry && !shutdown, end)
	switch dec.Outcome {
	case retrypolicy.Success:
		d.state, d.errText, d.completed = StateSucceeded, "", end
		return sig
	case retrypolicy.Gone:
		d.state, d.completed = StateFailed, end
		d.errText = withSnippet(dec.Reason+"; the endpoint is now disabled", snippet)
		r.disableEndpoint(ep.ID, "disabled by the relay: the receiver answered 410 Gone at "+end.UTC().Format(time.RFC3339))
		return sig
	case retrypolicy.Fail:
		d.state, d.completed = StateFailed, end
		d.errText = withSnippet(dec.Reason, snippet)
		return sig
	}
	d.errText = withSnippet(dec.Reason, snippet)
	if shutdown {
		// Shutting down cut the attempt short: it does not count.
		d.attempts--
		d.failClass = ""
		d.state, d.nextAttempt = StatePending, end
		return sig
	}
	delay, ok := ep.retryDelay(r.cfg.RetrySchedule, d.attempts)
	if !ok {
		d.state, d.completed = StateDead, end
		d.errText = "attempts exhausted (" + strconv.Itoa(d.attempts) + "): " + d.errText
		return sig
	}
	delay = retrypolicy.Jitter(delay, r.cfg.RetryJitter, rand.Float64())
	if ra, ok := retrypolicy.RetryAfter(respHeader, end); ok && (status == 429 || status == 503) && ra > delay {
		delay = min(ra, retrypolicy.DefaultMaxDelay)
	}
	d.state, d.nextAttempt = StateRetrying, end.Add(delay)
	r.log.Debug("delivery attempt failed", slog.String("endpoint_id", d.endpointID), slog.String("webhook_id", msgID),
		slog.Int("attempt", d.attempts), slog.Int("http_status", status), slog.String("error", d.errText))
	return sig
}

// attemptRequest sends an attempt as an http.Request: for https://, the
// net/http client, per-event headers and traces. finish ends the attempt's
// context and span; call it once the answer is read and d holds the
// outcome.
func (r *Relay) attemptRequest(ctx context.Context, d *delivery, ep *Endpoint, msgID, ts string, sig []byte) (resp *http.Response, finish func(), err error) {
	actx, cancel := context.WithTimeout(ctx, ep.Timeout)
	// Built by hand from the URL parsed once per config version: the
	// request path runs thousands of times a second.
	u := *ep.u
	req := (&http.Request{
		Method: http.MethodPost, URL: &u, Host: u.Host,
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Body: io.NopCloser(bytes.NewReader(d.payload)), ContentLength: int64(len(d.payload)),
	}).WithContext(actx)
	h := r.fixedHeaders(ep, 6)
	if d.headers != nil {
		if extra, err := parseHeaders(string(d.headers)); err == nil {
			for k, v := range extra {
				h[k] = v
			}
		}
	}
	vals := [...]string{msgID, ts, string(sig), d.traceparent}
	h["Content-Type"] = contentTypeJSON // over an event's own
	h["User-Agent"] = r.client.userAgent
	h["Webhook-Id"] = vals[0:1:1]
	h["Webhook-Timestamp"] = vals[1:2:2]
	h["Webhook-Signature"] = vals[2:3:3]
	if d.traceparent != "" {
		h["Traceparent"] = vals[3:4:4]
	}
	req.Header = h
	finish = cancel
	if r.cfg.Tracer != nil {
		var span trace.Span
		_, span = r.startAttemptSpan(actx, d, msgID, h)
		finish = func() { endAttemptSpan(span, d, d.httpStatus, d.failClass); cancel() }
	}
	resp, err = r.client.Do(req)
	return resp, finish, err
}

// preparedHead is ep's request head for h1.Post, rendered on first use,
// or nil when its requests go another way (https://, or net/http chosen).
func (r *Relay) preparedHead(ep *Endpoint) *h1.Prepared {
	if ep.head == nil || r.client.Plain == nil || ep.u == nil || ep.u.Scheme != "http" {
		return nil
	}
	ep.head.once.Do(func() {
		ep.head.p, _ = h1.Prepare(ep.u, r.fixedHeaders(ep, 0)) // nil on error: attemptRequest's path says why
	})
	return ep.head.p
}

// fixedHeaders are the headers every attempt at ep carries: the
// endpoint's own, Content-Type and User-Agent; room leaves space for more.
func (r *Relay) fixedHeaders(ep *Endpoint, room int) http.Header {
	h := make(http.Header, 2+len(ep.Headers)+room)
	for k, v := range ep.Headers {
		h[k] = v
	}
	h["Content-Type"] = contentTypeJSON
	h["User-Agent"] = r.client.userAgent
	return h
}

func withSnippet(reason string, body []byte) string {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return reason
	}
	if !json.Valid(body) && !isPrintable(body) {
		return reason
	}
	return reason + ": " + string(body)
}

func isPrintable(b []byte) bool {
	for _, c := range b {
		if c < 0x20 && c != '\t' && c != '\n' && c != '\r' || c == 0x7f {
			return false
		}
	}
	return true
}
