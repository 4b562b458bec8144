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
	"os"
	"strings"
	"syscall"
	"testing"
	"unicode/utf8"
)

func TestClassifyStatus(t *testing.T) {
	t.Parallel()
	loc := func(v string) http.Header { return http.Header{"Location": {v}} }
	tests := []struct {
		status  int
		header  http.Header
		outcome Outcome
		class   string
		reason  string
	}{
		{200, nil, Success, "http_2xx", ""},
		{201, nil, Success, "http_2xx", ""},
		{202, nil, Success, "http_2xx", ""},
		{204, nil, Success, "http_2xx", ""},
		{299, nil, Success, "http_2xx", ""},
		{301, loc("https://new.example.com/hook"), Retry, "http_3xx", `HTTP 301 Moved Permanently: redirect to "https://new.example.com/hook" not followed`},
		{302, loc("/elsewhere"), Retry, "http_3xx", `HTTP 302 Found: redirect to "/elsewhere" not followed`},
		{307, loc("http://169.254.169.254/latest/meta-data"), Retry, "http_3xx", `HTTP 307 Temporary Redirect: redirect to "http://169.254.169.254/latest/meta-data" not followed`},
		{308, nil, Retry, "http_3xx", "HTTP 308 Permanent Redirect: redirect not followed (no Location header)"},
		{304, nil, Retry, "http_3xx", "HTTP 304 Not Modified: redirect not followed (no Location header)"},
		{302, loc("\x00evil\nheader"), Retry, "http_3xx", `HTTP 302 Found: redirect to "\x00evil\nheader" not followed`},
		{408, nil, Retry, "http_4xx", "HTTP 408 Request Timeout"},
		{425, nil, Retry, "http_4xx", "HTTP 425 Too Early"},
		{429, nil, Retry, "http_4xx", "HTTP 429 Too Many Requests"},
		{500, nil, Retry, "http_5xx", "HTTP 500 Internal Server Error"},
		{502, nil, Retry, "http_5xx", "HTTP 502 Bad Gateway"},
		{503, nil, Retry, "http_5xx", "HTTP 503 Service Unavailable"},
		{504, nil, Retry, "http_5xx", "HTTP 504 Gateway Timeout"},
		{501, nil, Retry, "http_5xx", "HTTP 501 Not Implemented"},
		{505, nil, Retry, "http_5xx", "HTTP 505 HTTP Version Not Supported"},
		{507, nil, Retry, "http_5xx", "HTTP 507 Insufficient Storage"},
		{599, nil, Retry, "http_5xx", "HTTP 599"},
		{410, nil, Gone, "http_4xx", "HTTP 410 Gone: endpoint is gone and must be disabled"},
		{400, nil, Fail, "http_4xx", "HTTP 400 Bad Request"},
		{401, nil, Fail, "http_4xx", "HTTP 401 Unauthorized"},
		{403, nil, Fail, "http_4xx", "HTTP 403 Forbidden"},
		{404, nil, Fail, "http_4xx", "HTTP 404 Not Found"},
		{405, nil, Fail, "http_4xx", "HTTP 405 Method Not Allowed"},
		{409, nil, Fail, "http_4xx", "HTTP 409 Conflict"},
		{413, nil, Fail, "http_4xx", "HTTP 413 Request Entity Too Large"},
		{422, nil, Fail, "http_4xx", "HTTP 422 Unprocessable Entity"},
		{451, nil, Fail, "http_4xx", "HTTP 451 Unavailable For Legal Reasons"},
		{499, nil, Fail, "http_4xx", "HTTP 499"},
		{100, nil, Retry, "http_1xx", "HTTP 100 Continue: unexpected informational response"},
		{0, nil, Retry, "http_invalid", "HTTP 0: invalid status code"},
		{600, nil, Retry, "http_invalid", "HTTP 600: invalid status code"},
		{-1, nil, Retry, "http_invalid", "HTTP -1: invalid status code"},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.status), func(t *testing.T) {
			got := Classify(tt.status, tt.header, nil)
			want := Decision{Outcome: tt.outcome, Reason: tt.reason, Status: tt.status, Class: tt.class}
			if got != want {
				t.Errorf("Classify(%d) = %+v, want %+v", tt.status, got, want)
			}
		})
	}
}

func TestClassifyLongLocationIsTruncated(t *testing.T) {
	t.Parallel()
	long := "https://example.com/" + strings.Repeat("é", 1000)
	d := Classify(302, http.Header{"Location": {long}}, nil)
	if len(d.Reason) > MaxReasonLen {
		t.Errorf("len(Reason) = %d, want <= %d", len(d.Reason), MaxReasonLen)
	}
	if !utf8.ValidString(d.Reason) || !strings.HasSuffix(d.Reason, "...") {
		t.Errorf("Reason = %q, want valid UTF-8 ending in ...", d.Reason)
	}
	d = Classify(0, nil, errors.New(strings.Repeat("\xff", 2000)))
	if len(d.Reason) > MaxReasonLen || !utf8.ValidString(d.Reason) {
		t.Errorf("error reason: len %d valid %v", len(d.Reason), utf8.ValidString(d.Reason))
	}
}

type finalErr struct{}

func (finalErr) Error() string   { return "destination is blocked" }
func (finalErr) Retryable() bool { return false }

type classedFinalErr struct{ finalErr }

func (classedFinalErr) ErrorClass() string { return "blocked" }

type transientErr struct{}

func (transientErr) Error() string   { return "try later" }
func (transientErr) Retryable() bool { return true }

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Addr: &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 443}, Err: err}
}

func urlErr(err error) error {
	return &url.Error{Op: "Post", URL: "https://hooks.example.com/in?token=s3cret", Err: err}
}

func TestClassifyError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		err     error
		outcome Outcome
		class   string
		reason  string
	}{
		{"refused", urlErr(opErr("dial", &os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED})),
			Retry, "connection_refused", "connection refused: dial tcp 192.0.2.1:443: connect: connection refused"},
		{"reset", urlErr(opErr("read", &os.SyscallError{Syscall: "read", Err: syscall.ECONNRESET})),
			Retry, "connection_reset", "connection reset: read tcp 192.0.2.1:443: read: connection reset by peer"},
		{"broken pipe", opErr("write", &os.SyscallError{Syscall: "write", Err: syscall.EPIPE}),
			Retry, "connection_reset", "connection reset: write tcp 192.0.2.1:443: write: broken pipe"},
		{"host unreachable", opErr("dial", &os.SyscallError{Syscall: "connect", Err: syscall.EHOSTUNREACH}),
			Retry, "unreachable", "unreachable: dial tcp 192.0.2.1:443: connect: no route to host"},
		{"network unreachable", opErr("dial", &os.SyscallError{Syscall: "connect", Err: syscall.ENETUNREACH}),
			Retry, "unreachable", "unreachable: dial tcp 192.0.2.1:443: connect: network is unreachable"},
		{"dns not found", urlErr(opErr("dial", &net.DNSError{Err: "no such host", Name: "nope.invalid", IsNotFound: true})),
			Retry, "dns", "DNS: dial tcp 192.0.2.1:443: lookup nope.invalid: no such host"},
		{"dns timeout is dns", &net.DNSError{Err: "i/o timeout", Name: "slow.example", IsTimeout: true},
			Retry, "dns", "DNS: lookup slow.example: i/o timeout"},
		{"deadline exceeded", urlErr(fmt.Errorf("send: %w", context.DeadlineExceeded)),
			Retry, "timeout", "timeout: send: context deadline exceeded"},
		{"os deadline", opErr("read", os.ErrDeadlineExceeded),
			Retry, "timeout", "timeout: read tcp 192.0.2.1:443: i/o timeout"},
		{"net.Error timeout", urlErr(timeoutErr{}),
			Retry, "timeout", "timeout: i/o timeout"},
		{"ETIMEDOUT", opErr("dial", &os.SyscallError{Syscall: "connect", Err: syscall.ETIMEDOUT}),
			Retry, "timeout", "timeout: dial tcp 192.0.2.1:443: connect: connection timed out"},
		{"unexpected EOF", urlErr(fmt.Errorf("read body: %w", io.ErrUnexpectedEOF)),
			Retry, "eof", "connection closed early: read body: unexpected EOF"},
		{"EOF", urlErr(io.EOF),
			Retry, "eof", "connection closed early: EOF"},
		{"tls record header", urlErr(tls.RecordHeaderError{Msg: "first record does not look like a TLS handshake"}),
			Retry, "tls", "TLS: tls: first record does not look like a TLS handshake"},
		{"https to plain http", urlErr(http.ErrSchemeMismatch),
			Retry, "tls", "TLS: http: server gave HTTP response to HTTPS client"},
		{"tls alert", urlErr(opErr("remote error", tls.AlertError(40))),
			Retry, "tls", "TLS: remote error tcp 192.0.2.1:443: tls: handshake failure"},
		{"x509 unknown authority", urlErr(&tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}),
			Retry, "tls", "TLS: tls: failed to verify certificate: x509: certificate signed by unknown authority"},
		{"x509 hostname", urlErr(x509.HostnameError{Certificate: &x509.Certificate{}, Host: "hooks.example.com"}),
			Retry, "tls", "TLS: x509: certificate is not valid for any names, but wanted to match hooks.example.com"},
		{"x509 expired", x509.CertificateInvalidError{Reason: x509.Expired, Detail: "too old"},
			Retry, "tls", "TLS: x509: certificate has expired or is not yet valid: too old"},
		{"canceled", urlErr(context.Canceled),
			Retry, "canceled", "canceled: context canceled"},
		{"other net op", opErr("dial", errors.New("something odd")),
			Retry, "network", "network: dial tcp 192.0.2.1:443: something odd"},
		{"unknown", errors.New("mystery"),
			Retry, "other", "other: mystery"},
		{"non-retryable", urlErr(opErr("dial", finalErr{})),
			Fail, "non_retryable", "not retryable: dial tcp 192.0.2.1:443: destination is blocked"},
		{"non-retryable with class", urlErr(opErr("dial", classedFinalErr{})),
			Fail, "blocked", "blocked: dial tcp 192.0.2.1:443: destination is blocked"},
		{"non-retryable beats timeout", fmt.Errorf("%w: %w", finalErr{}, context.DeadlineExceeded),
			Fail, "non_retryable", "not retryable: destination is blocked: context deadline exceeded"},
		{"retryable true", fmt.Errorf("wrapped: %w", transientErr{}),
			Retry, "other", "other: wrapped: try later"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Classify(200, nil, tt.err) // the error wins over any status
			want := Decision{Outcome: tt.outcome, Reason: tt.reason, Class: tt.class}
			if got != want {
				t.Errorf("Classify(%v)\n got %+v\nwant %+v", tt.err, got, want)
			}
			if c := ErrorClass(tt.err); c != tt.class {
				t.Errorf("ErrorClass = %q, want %q", c, tt.class)
			}
			if strings.Contains(got.Reason, "s3cret") {
				t.Errorf("reason leaks the URL: %q", got.Reason)
			}
		})
	}
}

func TestErrorClassNil(t *testing.T) {
	t.Parallel()
	if c := ErrorClass(nil); c != "" {
		t.Errorf("ErrorClass(nil) = %q, want empty", c)
	}
}

func TestOutcomeString(t *testing.T) {
	t.Parallel()
	for o, want := range map[Outcome]string{Success: "success", Retry: "retry", Fail: "fail", Gone: "gone", 0: "outcome(0)"} {
		if got := o.String(); got != want {
			t.Errorf("Outcome(%d).String() = %q, want %q", int(o), got, want)
		}
	}
	for o, want := range map[Outcome]bool{Success: true, Retry: false, Fail: true, Gone: true, 0: false} {
		if got := o.Final(); got != want {
			t.Errorf("%v.Final() = %v, want %v", o, got, want)
		}
	}
}
