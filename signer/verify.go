package signer

import (
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Defaults applied by Verifier when a field is left zero.
const (
	DefaultTolerance    = 5 * time.Minute
	DefaultMaxBodyBytes = 1 << 20 // 1 MiB
)

// Errors returned by Verify, wrapped with detail; test with errors.Is.
// None of them means the verifier is misconfigured: that is reported by
// Validate, with errors that name the field.
var (
	// ErrMissingHeaders: webhook-id, webhook-timestamp or webhook-signature
	// is absent or empty. The wrapping error names which.
	ErrMissingHeaders = errors.New("missing webhook headers")
	// ErrInvalidTimestamp: webhook-timestamp is not decimal Unix seconds.
	ErrInvalidTimestamp = errors.New("invalid webhook-timestamp")
	// ErrTimestampTooOld: webhook-timestamp is more than the tolerance in the past.
	ErrTimestampTooOld = errors.New("webhook timestamp too old")
	// ErrTimestampTooNew: webhook-timestamp is more than the tolerance in the future.
	ErrTimestampTooNew = errors.New("webhook timestamp too new")
	// ErrNoMatchingSignature: no v1 signature in webhook-signature matches
	// any secret (tampered body or headers, wrong secret, or no v1 entry).
	ErrNoMatchingSignature = errors.New("no matching webhook signature")
)

// Verifier checks Standard Webhooks signatures. Fill in the fields and use it
// from any number of goroutines; do not change it while it is in use.
type Verifier struct {
	// Secrets are the keys a message may be signed with. A message is
	// accepted if any of its v1 signatures matches any of them, so during a
	// rotation list both the new and the old secret. Required.
	Secrets []Secret

	// Tolerance is how far webhook-timestamp may be from Now, in the past or
	// in the future, inclusive. Default DefaultTolerance (5 minutes).
	Tolerance time.Duration

	// Now returns the current time. Default time.Now.
	Now func() time.Time

	// MaxBodyBytes is the largest request body Middleware reads, in bytes;
	// larger bodies get 413. Default DefaultMaxBodyBytes (1 MiB). Verify
	// itself ignores it.
	MaxBodyBytes int64
}

// Validate reports whether v can verify anything, naming the offending field.
func (v *Verifier) Validate() error {
	if v == nil {
		return errors.New("signer: nil Verifier")
	}
	if len(v.Secrets) == 0 {
		return errors.New("signer: Verifier.Secrets is empty; need at least one secret")
	}
	for i, s := range v.Secrets {
		if s.IsZero() {
			return fmt.Errorf("signer: Verifier.Secrets[%d] is the zero Secret; build secrets with ParseSecret", i)
		}
	}
	if v.Tolerance < 0 {
		return fmt.Errorf("signer: Verifier.Tolerance is %s; must be >= 0 (0 means %s)", v.Tolerance, DefaultTolerance)
	}
	if v.MaxBodyBytes < 0 {
		return fmt.Errorf("signer: Verifier.MaxBodyBytes is %d; must be >= 0 (0 means %d)", v.MaxBodyBytes, DefaultMaxBodyBytes)
	}
	return nil
}

func (v *Verifier) tolerance() time.Duration {
	if v.Tolerance == 0 {
		return DefaultTolerance
	}
	return v.Tolerance
}

func (v *Verifier) maxBodyBytes() int64 {
	if v.MaxBodyBytes == 0 {
		return DefaultMaxBodyBytes
	}
	return v.MaxBodyBytes
}

func (v *Verifier) now() time.Time {
	if v.Now == nil {
		return time.Now()
	}
	return v.Now()
}

// Verify checks that body with headers h is a message signed with one of
// v.Secrets, timestamped within the tolerance of v.Now. It returns nil if so,
// an error wrapping one of the package's sentinel errors if not, and the
// Validate error if v is misconfigured.
//
// body must be the exact bytes received: re-encoded JSON does not verify.
func (v *Verifier) Verify(h http.Header, body []byte) error {
	if err := v.Validate(); err != nil {
		return err
	}
	id, tsText, sigs := h.Get(HeaderID), h.Get(HeaderTimestamp), h.Values(HeaderSignature)
	if id == "" || tsText == "" || len(sigs) == 0 || sigs[0] == "" {
		var missing []string
		for _, name := range []string{HeaderID, HeaderTimestamp, HeaderSignature} {
			if h.Get(name) == "" {
				missing = append(missing, name)
			}
		}
		return fmt.Errorf("%w: %s", ErrMissingHeaders, strings.Join(missing, ", "))
	}

	ts, err := parseTimestamp(tsText)
	if err != nil {
		return err
	}
	now, tol := v.now(), v.tolerance()
	sent := time.Unix(ts, 0)
	if d := now.Sub(sent); d > tol {
		return fmt.Errorf("%w: sent %s before now, tolerance %s", ErrTimestampTooOld, d.Truncate(time.Second), tol)
	}
	if d := sent.Sub(now); d > tol {
		return fmt.Errorf("%w: sent %s after now, tolerance %s", ErrTimestampTooNew, d.Truncate(time.Second), tol)
	}

	// The expected signatures, base64 without the "v1," prefix, one per
	// secret, packed into one buffer.
	expected := make([]byte, 0, len(v.Secrets)*signedLen)
	var scratch []byte
	for _, s := range v.Secrets {
		expected, scratch = appendOne(expected, scratch, hmac.New(sha256.New, s.key), id, ts, body)
	}
	const prefix = len(sigVersion) + 1
	candidates := 0
	for _, value := range sigs {
		for field := range strings.FieldsSeq(value) {
			version, sig, ok := strings.Cut(field, ",")
			if !ok || version != sigVersion {
				continue // another scheme (v1a, v2, ...) or garbage: not ours to judge
			}
			candidates++
			for off := 0; off < len(expected); off += signedLen {
				if hmac.Equal([]byte(sig), expected[off+prefix:off+signedLen]) {
					return nil
				}
			}
		}
	}
	return fmt.Errorf("%w: checked %d v1 signature(s) against %d secret(s)", ErrNoMatchingSignature, candidates, len(v.Secrets))
}

// Verify checks one message against one secret at the given time; tolerance
// 0 means DefaultTolerance. It is Verifier.Verify for callers that hold a
// single secret and do not want to build a Verifier.
func Verify(secret Secret, h http.Header, body []byte, now time.Time, tolerance time.Duration) error {
	v := Verifier{Secrets: []Secret{secret}, Tolerance: tolerance, Now: func() time.Time { return now }}
	return v.Verify(h, body)
}

// parseTimestamp accepts decimal Unix seconds and nothing else: no sign, no
// fraction, no spaces. The value, not the text, is what gets signed, so a
// lenient parser would let two spellings share one signature.
func parseTimestamp(s string) (int64, error) {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("%w: want decimal Unix seconds, found a non-digit at byte %d", ErrInvalidTimestamp, i)
		}
	}
	ts, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: out of range", ErrInvalidTimestamp)
	}
	return ts, nil
}
