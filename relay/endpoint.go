package relay

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/outbox-relay/outbox-relay/internal/h1"
	"github.com/outbox-relay/outbox-relay/internal/retrypolicy"
	"github.com/outbox-relay/outbox-relay/limiter"
	"github.com/outbox-relay/outbox-relay/signer"
)

// Endpoint is one row of relay.endpoints, parsed. An Endpoint value never
// changes after it is built; a config change builds a new one.
type Endpoint struct {
	ID         string
	TenantID   string
	URL        string
	EventTypes []string // empty = every type
	Enabled    bool
	Timeout    time.Duration
	Headers    http.Header // extra request headers, already filtered

	// Per-endpoint overrides; zero values mean the relay's defaults.
	RetrySchedule   []time.Duration
	MaxInFlight     int
	Limit           limiter.Limit
	BreakerFailures int
	BreakerCooldown time.Duration
	// DisabledReason is set when the relay disabled the endpoint itself.
	DisabledReason string
	// Ordered endpoints get their deliveries one at a time, in commit
	// order (see lane.go).
	Ordered bool

	// Invalid is set when the row cannot be used (bad URL, bad secret, no
	// secret). Deliveries routed to it are rejected with this reason.
	Invalid string

	signer      *signer.Signer
	maxAttempts int
	u           *url.URL  // URL, parsed
	head        *postHead // the request head for h1.Post (worker.go)
}

// postHead is an endpoint version's request head, rendered once.
type postHead struct {
	once sync.Once
	p    *h1.Prepared
}

// retryDelay is the delay before attempt number attempts+1 under this
// endpoint's retry schedule (its own, else def) and max_attempts (which
// cuts the schedule or repeats its last delay); false once the budget is
// spent. It builds no schedule: extending one to max_attempts took 8
// bytes per allowed attempt on every failure, 8 MB at a max_attempts of a
// million, and a max_attempts near 2^31 asked for 16 GiB.
func (ep *Endpoint) retryDelay(def []time.Duration, attempts int) (time.Duration, bool) {
	s := def
	if len(ep.RetrySchedule) > 0 {
		s = ep.RetrySchedule
	}
	return retrypolicy.Delay(s, ep.maxAttempts, attempts)
}

// Tenant is one row of relay.tenants, parsed.
type Tenant struct {
	ID     string
	Weight int
	Limit  limiter.Limit
}

// reservedHeaders cannot be set by endpoint or event headers: the signature
// headers, and hop-by-hop or framing headers that would corrupt the request.
var reservedHeaders = map[string]bool{
	"Webhook-Id": true, "Webhook-Timestamp": true, "Webhook-Signature": true,
	"Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Proxy-Connection": true, "Te": true, "Trailer": true,
	"Transfer-Encoding": true, "Upgrade": true, "Content-Length": true, "Host": true,
	"Content-Type": true,
}

// row is a set of column values in Postgres text format, by column name.
// It lets the stream path (pgoutput tuples) and the load path (SQL) share
// one parser.
type row interface {
	// text returns the column's text value and whether it is non-NULL.
	text(col string) (string, bool)
}

type mapRow map[string]*string

// parseRowJSON decodes a JSON object whose values are strings or null, as
// writeHistory stores a row and Postgres prints it back, without
// reflection (a restart with 10,000 endpoints reads each one's version). ok is false for
// any other JSON, and for text that is not valid UTF-8: the caller then
// decodes with encoding/json, which gives the same result for what this
// accepts.
func parseRowJSON(s string) (_ mapRow, ok bool) {
	if !utf8.ValidString(s) {
		return nil, false
	}
	i := skipJSONSpace(s, 0)
	if i >= len(s) || s[i] != '{' {
		return nil, false
	}
	row := make(mapRow, 20)
	i = skipJSONSpace(s, i+1)
	if i < len(s) && s[i] == '}' {
		return row, skipJSONSpace(s, i+1) == len(s)
	}
	for {
		var key string
		if key, i, ok = parseJSONString(s, i); !ok {
			return nil, false
		}
		if i = skipJSONSpace(s, i); i >= len(s) || s[i] != ':' {
			return nil, false
		}
		i = skipJSONSpace(s, i+1)
		switch {
		case strings.HasPrefix(s[i:], "null"):
			row[key] = nil
			i += 4
		default:
			var v string
			if v, i, ok = parseJSONString(s, i); !ok {
				return nil, false
			}
			row[key] = &v
		}
		if i = skipJSONSpace(s, i); i >= len(s) {
			return nil, false
		}
		switch s[i] {
		case ',':
			i = skipJSONSpace(s, i+1)
		case '}':
			return row, skipJSONSpace(s, i+1) == len(s)
		default:
			return nil, false
		}
	}
}

func skipJSONSpace(s string, i int) int {
	for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
		i++
	}
	return i
}

// parseJSONString decodes the JSON string at s[i] and returns the index
// after it.
func parseJSONString(s string, i int) (string, int, bool) {
	if i >= len(s) || s[i] != '"' {
		return "", i, false
	}
	i++
	start := i
	for i < len(s) && s[i] != '"' && s[i] != '\\' && s[i] >= 0x20 {
		i++
	}
	if i < len(s) && s[i] == '"' {
		return s[start:i], i + 1, true // no escapes: the text itself
	}
	buf := []byte(s[start:i])
	for i < len(s) {
		c := s[i]
		switch {
		case c == '"':
			return string(buf), i + 1, true
		case c < 0x20:
			return "", i, false
		case c != '\\':
			buf = append(buf, c)
			i++
			continue
		}
		if i+1 >= len(s) {
			return "", i, false
		}
		switch e := s[i+1]; e {
		case '"', '\\', '/':
			buf = append(buf, e)
		case 'b':
			buf = append(buf, '\b')
		case 'f':
			buf = append(buf, '\f')
		case 'n':
			buf = append(buf, '\n')
		case 'r':
			buf = append(buf, '\r')
		case 't':
			buf = append(buf, '\t')
		case 'u':
			r, ok := jsonHex4(s, i+2)
			if !ok {
				return "", i, false
			}
			i += 6
			if utf16.IsSurrogate(r) {
				if r2, ok := jsonHex4(s, i+2); ok && s[i] == '\\' && s[i+1] == 'u' {
					if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
						buf = utf8.AppendRune(buf, d)
						i += 6
						continue
					}
				}
			}
			buf = utf8.AppendRune(buf, r) // U+FFFD for a lone surrogate, as encoding/json decodes it
			continue
		default:
			return "", i, false
		}
		i += 2
	}
	return "", i, false
}

// jsonHex4 reads the four hex digits at s[i:].
func jsonHex4(s string, i int) (rune, bool) {
	if i+4 > len(s) {
		return 0, false
	}
	var r rune
	for _, c := range []byte(s[i : i+4]) {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		r = r<<4 | rune(c)
	}
	return r, true
}

func (m mapRow) text(col string) (string, bool) {
	v := m[col]
	if v == nil {
		return "", false
	}
	return *v, true
}

// parseEndpoint builds an Endpoint from a row. It fails only when the row
// has no id; every other problem makes the endpoint Invalid, so the
// deliveries routed to it say why.
func parseEndpoint(r row) (*Endpoint, error) {
	id, ok := r.text("id")
	if !ok || id == "" {
		return nil, fmt.Errorf("endpoint row without id")
	}
	ep := &Endpoint{ID: id, Enabled: true, Timeout: 10 * time.Second, head: &postHead{}}
	ep.TenantID, _ = r.text("tenant_id")
	ep.URL, _ = r.text("url")
	if v, ok := r.text("enabled"); ok {
		ep.Enabled = v == "t" || v == "true"
	}
	if v, ok := r.text("timeout_ms"); ok {
		if ms, err := strconv.Atoi(v); err == nil && ms > 0 {
			ep.Timeout = time.Duration(ms) * time.Millisecond
		}
	}
	if v, ok := r.text("event_types"); ok {
		types, err := parseTextArray(v)
		if err != nil {
			ep.Invalid = "event_types: " + err.Error()
		}
		ep.EventTypes = types
	}
	ep.DisabledReason, _ = r.text("disabled_reason")
	if v, ok := r.text("ordered"); ok {
		ep.Ordered = v == "t" || v == "true"
	}
	ep.BreakerFailures, ep.BreakerCooldown = defaultBreakerFailures, defaultBreakerCooldown
	if v, ok := r.text("breaker_failures"); ok {
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			ep.BreakerFailures = n
		}
	}
	if v, ok := r.text("breaker_cooldown_ms"); ok {
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			ep.BreakerCooldown = time.Duration(n) * time.Millisecond
		}
	}
	if v, ok := r.text("max_in_flight"); ok {
		ep.MaxInFlight, _ = strconv.Atoi(v)
	}
	if v, ok := r.text("rate_limit"); ok {
		ep.Limit.Rate, _ = strconv.ParseFloat(v, 64)
	}
	if v, ok := r.text("rate_burst"); ok {
		ep.Limit.Burst, _ = strconv.Atoi(v)
	}
	if v, ok := r.text("retry_schedule"); ok {
		steps, err := parseTextArray(v)
		for _, st := range steps {
			d, derr := time.ParseDuration(st)
			if derr != nil || d < 0 {
				err = fmt.Errorf("%q is not a duration like 5s or 2h", st)
				break
			}
			ep.RetrySchedule = append(ep.RetrySchedule, d)
		}
		if err != nil && ep.Invalid == "" {
			ep.Invalid = "retry_schedule: " + err.Error()
		}
	}
	if v, ok := r.text("max_attempts"); ok {
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			ep.maxAttempts = n
		}
	}
	if v, ok := r.text("headers"); ok && v != "" {
		h, err := parseHeaders(v)
		if err != nil && ep.Invalid == "" {
			ep.Invalid = "headers: " + err.Error()
		}
		ep.Headers = h
	}
	if u, err := checkURL(ep.URL); err != nil {
		if ep.Invalid == "" {
			ep.Invalid = err.Error()
		}
	} else {
		ep.u = u
	}
	var secrets []signer.Secret
	if v, ok := r.text("secrets"); ok {
		raw, err := parseTextArray(v)
		if err != nil && ep.Invalid == "" {
			ep.Invalid = "secrets: " + err.Error()
		}
		for i, s := range raw {
			sec, err := signer.ParseSecret(s)
			if err != nil {
				if ep.Invalid == "" {
					// The error names the problem, never the secret.
					ep.Invalid = fmt.Sprintf("secrets[%d]: %v", i+1, err)
				}
				continue
			}
			secrets = append(secrets, sec)
		}
	}
	if len(secrets) == 0 && ep.Invalid == "" {
		ep.Invalid = "endpoint has no signing secret (set relay.endpoints.secrets to {whsec_...})"
	}
	if len(secrets) > 0 {
		ep.signer = signer.NewSigner(secrets...)
	}
	return ep, nil
}

func checkURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("invalid url %q: %v", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("invalid url %q: scheme must be http or https", raw)
	}
	if u.Host == "" || u.Hostname() == "" {
		return nil, fmt.Errorf("invalid url %q: no host", raw)
	}
	if u.User != nil {
		return nil, fmt.Errorf("invalid url: credentials in the URL are not allowed, use headers")
	}
	return u, nil
}

// parseHeaders reads a JSON object of string values. Reserved headers are
// dropped.
func parseHeaders(js string) (http.Header, error) {
	var m map[string]any
	if err := json.Unmarshal([]byte(js), &m); err != nil {
		return nil, fmt.Errorf("not a JSON object: %v", err)
	}
	h := make(http.Header, len(m))
	for k, v := range m {
		ck := http.CanonicalHeaderKey(k)
		if reservedHeaders[ck] {
			continue
		}
		s, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("header %q: value must be a string", k)
		}
		if strings.ContainsAny(s, "\r\n") || strings.ContainsAny(k, " \r\n:") {
			return nil, fmt.Errorf("header %q: invalid characters", k)
		}
		h[ck] = []string{s}
	}
	return h, nil
}

func parseTenant(r row) (*Tenant, error) {
	id, ok := r.text("id")
	if !ok || id == "" {
		return nil, fmt.Errorf("tenant row without id")
	}
	t := &Tenant{ID: id, Weight: 1}
	if v, ok := r.text("weight"); ok {
		if w, err := strconv.Atoi(v); err == nil && w > 0 {
			t.Weight = w
		}
	}
	if v, ok := r.text("rate_limit"); ok {
		t.Limit.Rate, _ = strconv.ParseFloat(v, 64)
	}
	if v, ok := r.text("rate_burst"); ok {
		t.Limit.Burst, _ = strconv.Atoi(v)
	}
	return t, nil
}

// refusal says why no delivery can be attempted at ep, and the state
// such a delivery ends in; refused is false when ep is usable.
func (ep *Endpoint) refusal() (state State, reason string, refused bool) {
	switch {
	case ep.Invalid != "":
		return StateRejected, "endpoint is invalid: " + ep.Invalid, true
	case !ep.Enabled && ep.DisabledReason != "":
		return StateDead, ep.DisabledReason, true
	case !ep.Enabled:
		return StateRejected, "endpoint " + ep.ID + " is disabled", true
	}
	return "", "", false
}

// Subscribes reports whether the endpoint wants events of this type.
func (ep *Endpoint) Subscribes(eventType string) bool {
	if len(ep.EventTypes) == 0 {
		return true
	}
	for _, t := range ep.EventTypes {
		if t == eventType || t == "*" {
			return true
		}
		if strings.HasSuffix(t, "*") && strings.HasPrefix(eventType, t[:len(t)-1]) {
			return true
		}
	}
	return false
}
