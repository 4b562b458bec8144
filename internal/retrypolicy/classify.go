package retrypolicy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"unicode/utf8"
)

// Outcome is what an attempt's result means for the delivery.
type Outcome int

const (
	// Success: the receiver accepted the webhook. Final.
	Success Outcome = iota + 1
	// Retry: the attempt failed in a way that may pass later; schedule
	// another attempt if any are left.
	Retry
	// Fail: the attempt failed and trying again will not help. Final.
	Fail
	// Gone: the receiver said the endpoint no longer exists (HTTP 410).
	// Final, and the endpoint must be disabled.
	Gone
)

// String returns a lower-case name suitable for logs and metric labels.
func (o Outcome) String() string {
	switch o {
	case Success:
		return "success"
	case Retry:
		return "retry"
	case Fail:
		return "fail"
	case Gone:
		return "gone"
	default:
		return fmt.Sprintf("outcome(%d)", int(o))
	}
}

// Final reports whether no further attempt should be made.
func (o Outcome) Final() bool { return o == Success || o == Fail || o == Gone }

// MaxReasonLen bounds Decision.Reason in bytes, so that a receiver sending a
// huge Location header or an error with a huge message cannot bloat the
// relay.deliveries.error column.
const MaxReasonLen = 512

// Decision is the classified result of one attempt.
type Decision struct {
	Outcome Outcome
	// Reason is a short human explanation for relay.deliveries.error;
	// empty on success. At most MaxReasonLen bytes, valid UTF-8.
	Reason string
	// Status is the HTTP status code, or 0 when the attempt ended in a
	// transport error.
	Status int
	// Class is a low-cardinality label for metrics: the error class for
	// transport errors (see ErrorClass), "http_3xx", "http_4xx", "http_5xx",
	// "http_1xx" or "http_invalid" for unsuccessful responses, and
	// "http_2xx" on success.
	Class string
}

// Classify decides what an attempt's result means. When err is non-nil the
// attempt is classified by the error alone and status and header are
// ignored; otherwise by status, with header consulted for the Location of a
// redirect. The rules are listed in the package documentation.
func Classify(status int, header http.Header, err error) Decision {
	if err != nil {
		return classifyError(err)
	}
	if status >= 200 && status <= 299 {
		// The hot path: no formatting.
		return Decision{Outcome: Success, Status: status, Class: "http_2xx"}
	}
	text := http.StatusText(status)
	statusLine := fmt.Sprintf("HTTP %d", status)
	if text != "" {
		statusLine += " " + text
	}
	d := Decision{Status: status}
	switch {
	case status >= 300 && status <= 399:
		d.Outcome, d.Class = Retry, "http_3xx"
		if loc := header.Get("Location"); loc != "" {
			d.Reason = fmt.Sprintf("%s: redirect to %q not followed", statusLine, loc)
		} else {
			d.Reason = statusLine + ": redirect not followed (no Location header)"
		}
	case status == http.StatusGone:
		d.Outcome, d.Class = Gone, "http_4xx"
		d.Reason = statusLine + ": endpoint is gone and must be disabled"
	case status == http.StatusRequestTimeout,
		status == http.StatusTooEarly,
		status == http.StatusTooManyRequests:
		d.Outcome, d.Class = Retry, "http_4xx"
		d.Reason = statusLine
	case status >= 400 && status <= 499:
		d.Outcome, d.Class = Fail, "http_4xx"
		d.Reason = statusLine
	case status >= 500 && status <= 599:
		// 500, 502, 503 and 504 by the rules; every other 5xx by choice
		// (see the package documentation).
		d.Outcome, d.Class = Retry, "http_5xx"
		d.Reason = statusLine
	case status >= 100 && status <= 199:
		d.Outcome, d.Class = Retry, "http_1xx"
		d.Reason = statusLine + ": unexpected informational response"
	default:
		d.Outcome, d.Class = Retry, "http_invalid"
		d.Reason = statusLine + ": invalid status code"
	}
	d.Reason = truncate(d.Reason)
	return d
}

func classifyError(err error) Decision {
	class := ErrorClass(err)
	outcome := Retry
	var r retryabler
	if errors.As(err, &r) && !r.Retryable() {
		outcome = Fail
	}
	return Decision{
		Outcome: outcome,
		Reason:  truncate(humanClass(class) + ": " + detail(err)),
		Class:   class,
	}
}

type retryabler interface{ Retryable() bool }

type classer interface{ ErrorClass() string }

// ErrorClass names the kind of a transport error, for metrics labels and
// reasons: "timeout", "connection_refused", "connection_reset",
// "unreachable", "dns", "tls", "eof", "canceled", "network", "other", the
// class an error names itself through an ErrorClass() string method, or
// "non_retryable" for an error that declares itself not retryable without
// naming a class. It returns "" for a nil error.
func ErrorClass(err error) string {
	if err == nil {
		return ""
	}
	// An error that knows what it is wins: it was made on purpose.
	var c classer
	if errors.As(err, &c) {
		if s := c.ErrorClass(); s != "" {
			return s
		}
	}
	var r retryabler
	if errors.As(err, &r) && !r.Retryable() {
		return "non_retryable"
	}
	if errors.Is(err, context.Canceled) {
		return "canceled"
	}
	// DNS before timeout: a DNS timeout is better reported as a DNS problem.
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return "dns"
	}
	if isTLS(err) {
		return "tls"
	}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection_refused"
	case errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.ECONNABORTED),
		errors.Is(err, syscall.EPIPE):
		return "connection_reset"
	case errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, syscall.ENETUNREACH),
		errors.Is(err, syscall.EHOSTDOWN),
		errors.Is(err, syscall.ENETDOWN):
		return "unreachable"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return "eof"
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) {
		return "network"
	}
	return "other"
}

func isTLS(err error) bool {
	var (
		recordHeader tls.RecordHeaderError
		alert        tls.AlertError
		verification *tls.CertificateVerificationError
		echRejected  *tls.ECHRejectionError
		unknownCA    x509.UnknownAuthorityError
		invalid      x509.CertificateInvalidError
		hostname     x509.HostnameError
		constraints  x509.ConstraintViolationError
		insecure     x509.InsecureAlgorithmError
		systemRoots  x509.SystemRootsError
	)
	// net/http turns the RecordHeaderError of a plain-HTTP reply to a TLS
	// handshake into ErrSchemeMismatch.
	return errors.Is(err, http.ErrSchemeMismatch) ||
		errors.As(err, &recordHeader) ||
		errors.As(err, &alert) ||
		errors.As(err, &verification) ||
		errors.As(err, &echRejected) ||
		errors.As(err, &unknownCA) ||
		errors.As(err, &invalid) ||
		errors.As(err, &hostname) ||
		errors.As(err, &constraints) ||
		errors.As(err, &insecure) ||
		errors.As(err, &systemRoots)
}

func humanClass(class string) string {
	switch class {
	case "connection_refused":
		return "connection refused"
	case "connection_reset":
		return "connection reset"
	case "non_retryable":
		return "not retryable"
	case "eof":
		return "connection closed early"
	case "dns":
		return "DNS"
	case "tls":
		return "TLS"
	}
	return class
}

// detail is the error's text without *url.Error's method and URL prefix:
// the class already says what happened, and an endpoint URL can carry
// credentials in its query string that do not belong in a status column.
func detail(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) && ue.Err != nil {
		return ue.Err.Error()
	}
	return err.Error()
}

func truncate(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= MaxReasonLen {
		return s
	}
	const ellipsis = "..."
	cut := MaxReasonLen - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + ellipsis
}
