package signer_test

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/signer"
)

func headers(id string, ts int64, sig string) http.Header {
	h := http.Header{}
	h.Set(signer.HeaderID, id)
	h.Set(signer.HeaderTimestamp, strconv.FormatInt(ts, 10))
	h.Set(signer.HeaderSignature, sig)
	return h
}

func fixedNow(unix int64) func() time.Time {
	return func() time.Time { return time.Unix(unix, 0) }
}

func TestVerify(t *testing.T) {
	t.Parallel()
	const (
		id  = "msg_2mXyZ"
		now = int64(1_700_000_000)
	)
	body := []byte(`{"type":"invoice.paid","amount":4200}`)
	oldSec, newSec, otherSec := testSecret(t, 1), testSecret(t, 2), testSecret(t, 3)
	sign := func(ts int64, b []byte, secrets ...signer.Secret) string {
		return signer.Sign(id, time.Unix(ts, 0), b, secrets...)
	}
	good := sign(now, body, newSec)
	// Well-formed v1 signatures that match nothing (from svix's test suite).
	junk1 := "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ="
	junk2 := "v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q="
	goodB64 := strings.TrimPrefix(good, "v1,")

	tests := []struct {
		name    string
		secrets []signer.Secret // verifier's; default {newSec}
		tol     time.Duration
		h       http.Header
		body    []byte // default body
		want    error  // nil: accepted
		wantMsg string // substring of the error, if set
	}{
		{name: "valid", h: headers(id, now, good)},
		{name: "tampered body", h: headers(id, now, good), body: []byte(`{"type":"invoice.paid","amount":9999}`), want: signer.ErrNoMatchingSignature},
		{name: "empty body when signed body was not", h: headers(id, now, good), body: []byte{}, want: signer.ErrNoMatchingSignature},
		{name: "wrong secret", secrets: []signer.Secret{otherSec}, h: headers(id, now, good), want: signer.ErrNoMatchingSignature},
		{name: "tampered id", h: headers("msg_other", now, good), want: signer.ErrNoMatchingSignature},
		{name: "tampered timestamp within tolerance", h: headers(id, now+1, good), want: signer.ErrNoMatchingSignature},

		{name: "old, exactly at tolerance", h: headers(id, now-300, sign(now-300, body, newSec))},
		{name: "too old", h: headers(id, now-301, sign(now-301, body, newSec)), want: signer.ErrTimestampTooOld},
		{name: "new, exactly at tolerance", h: headers(id, now+300, sign(now+300, body, newSec))},
		{name: "too new", h: headers(id, now+301, sign(now+301, body, newSec)), want: signer.ErrTimestampTooNew},
		{name: "custom tolerance accepts", tol: time.Hour, h: headers(id, now-3600, sign(now-3600, body, newSec))},
		{name: "custom tolerance rejects", tol: 10 * time.Second, h: headers(id, now-11, sign(now-11, body, newSec)), want: signer.ErrTimestampTooOld},
		{name: "epoch", h: headers(id, 0, sign(0, body, newSec)), want: signer.ErrTimestampTooOld},
		{name: "far future", h: headers(id, 1<<62, sign(1<<62, body, newSec)), want: signer.ErrTimestampTooNew},

		{name: "missing id", h: without(headers(id, now, good), signer.HeaderID), want: signer.ErrMissingHeaders, wantMsg: "webhook-id"},
		{name: "missing timestamp", h: without(headers(id, now, good), signer.HeaderTimestamp), want: signer.ErrMissingHeaders, wantMsg: "webhook-timestamp"},
		{name: "missing signature", h: without(headers(id, now, good), signer.HeaderSignature), want: signer.ErrMissingHeaders, wantMsg: "webhook-signature"},
		{name: "no headers at all", h: http.Header{}, want: signer.ErrMissingHeaders, wantMsg: "webhook-id, webhook-timestamp, webhook-signature"},
		{name: "empty signature header", h: headers(id, now, ""), want: signer.ErrMissingHeaders},

		{name: "timestamp not a number", h: withHeader(headers(id, now, good), signer.HeaderTimestamp, "yesterday"), want: signer.ErrInvalidTimestamp},
		{name: "timestamp with fraction", h: withHeader(headers(id, now, good), signer.HeaderTimestamp, "1700000000.0"), want: signer.ErrInvalidTimestamp},
		{name: "timestamp with plus sign", h: withHeader(headers(id, now, good), signer.HeaderTimestamp, "+1700000000"), want: signer.ErrInvalidTimestamp},
		{name: "negative timestamp", h: withHeader(headers(id, now, good), signer.HeaderTimestamp, "-1700000000"), want: signer.ErrInvalidTimestamp},
		{name: "timestamp overflows int64", h: withHeader(headers(id, now, good), signer.HeaderTimestamp, "99999999999999999999"), want: signer.ErrInvalidTimestamp},
		{name: "timestamp in milliseconds", h: withHeader(headers(id, now, good), signer.HeaderTimestamp, "1700000000000"), want: signer.ErrTimestampTooNew},

		{name: "one of several signatures matches", h: headers(id, now, junk1+" "+junk2+" "+good+" "+junk1)},
		{name: "several signatures, none matches", h: headers(id, now, junk1+" "+junk2), want: signer.ErrNoMatchingSignature, wantMsg: "checked 2 v1 signature(s)"},
		{name: "extra spaces between signatures", h: headers(id, now, "  "+junk1+"   "+good+" ")},
		{name: "signature in a second header line", h: addHeader(headers(id, now, junk1), signer.HeaderSignature, good)},
		{name: "unknown version with a valid MAC is ignored", h: headers(id, now, "v1a,"+goodB64+" v2,"+goodB64), want: signer.ErrNoMatchingSignature, wantMsg: "checked 0 v1"},
		{name: "unknown version beside a valid v1", h: headers(id, now, "v1a,"+goodB64+" "+good)},
		{name: "version only", h: headers(id, now, "v1,"), want: signer.ErrNoMatchingSignature},
		{name: "no comma", h: headers(id, now, "v1"+goodB64), want: signer.ErrNoMatchingSignature},
		{name: "truncated signature", h: headers(id, now, good[:len(good)-4]), want: signer.ErrNoMatchingSignature},
		{name: "signature with extra bytes", h: headers(id, now, good+"AAAA"), want: signer.ErrNoMatchingSignature},
		{name: "hex instead of base64", h: headers(id, now, "v1,"+strings.Repeat("ab", 32)), want: signer.ErrNoMatchingSignature},

		// Rotation: the relay signs with both secrets while receivers switch.
		{name: "rotation: sent with old+new, receiver knows new", h: headers(id, now, sign(now, body, oldSec, newSec))},
		{name: "rotation: sent with old+new, receiver knows old", secrets: []signer.Secret{oldSec}, h: headers(id, now, sign(now, body, oldSec, newSec))},
		{name: "rotation: sent with new, receiver knows old and new", secrets: []signer.Secret{oldSec, newSec}, h: headers(id, now, sign(now, body, newSec))},
		{name: "rotation: sent with old+new, receiver knows neither", secrets: []signer.Secret{otherSec}, h: headers(id, now, sign(now, body, oldSec, newSec)), want: signer.ErrNoMatchingSignature},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			v := &signer.Verifier{Secrets: tt.secrets, Tolerance: tt.tol, Now: fixedNow(now)}
			if v.Secrets == nil {
				v.Secrets = []signer.Secret{newSec}
			}
			b := body
			if tt.body != nil {
				b = tt.body
			}
			err := v.Verify(tt.h, b)
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("Verify = %v, want nil", err)
			case tt.want != nil && !errors.Is(err, tt.want):
				t.Fatalf("Verify = %v, want an error wrapping %q", err, tt.want)
			}
			if tt.wantMsg != "" && !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("Verify error %q does not mention %q", err, tt.wantMsg)
			}
			// Each failure has exactly one cause.
			for _, other := range []error{signer.ErrMissingHeaders, signer.ErrInvalidTimestamp, signer.ErrTimestampTooOld, signer.ErrTimestampTooNew, signer.ErrNoMatchingSignature} {
				if other != tt.want && errors.Is(err, other) {
					t.Errorf("Verify = %v, which also matches %q", err, other)
				}
			}
		})
	}
}

func TestVerifyDefaultsToNowAndFiveMinutes(t *testing.T) {
	t.Parallel()
	sec := testSecret(t, 9)
	body := []byte("hi")
	v := &signer.Verifier{Secrets: []signer.Secret{sec}}
	for _, c := range []struct {
		offset time.Duration
		want   error
	}{
		{0, nil},
		{-4 * time.Minute, nil},
		{4 * time.Minute, nil},
		{-6 * time.Minute, signer.ErrTimestampTooOld},
		{6 * time.Minute, signer.ErrTimestampTooNew},
	} {
		ts := time.Now().Add(c.offset)
		h := headers("msg_now", ts.Unix(), signer.Sign("msg_now", ts, body, sec))
		if err := v.Verify(h, body); !errors.Is(err, c.want) {
			t.Errorf("offset %s: Verify = %v, want %v", c.offset, err, c.want)
		}
	}
}

func TestVerifyFunc(t *testing.T) {
	t.Parallel()
	v := vectors[0]
	sec := mustSecret(t, v.secret)
	h := headers(v.msgID, v.ts, v.want)
	at := time.Unix(v.ts, 0)
	if err := signer.Verify(sec, h, []byte(v.body), at.Add(time.Minute), 0); err != nil {
		t.Errorf("Verify(vector) = %v, want nil", err)
	}
	if err := signer.Verify(sec, h, []byte(v.body), at.Add(10*time.Minute), 0); !errors.Is(err, signer.ErrTimestampTooOld) {
		t.Errorf("Verify 10 minutes later with default tolerance = %v, want ErrTimestampTooOld", err)
	}
	if err := signer.Verify(sec, h, []byte(v.body), at.Add(10*time.Minute), 11*time.Minute); err != nil {
		t.Errorf("Verify 10 minutes later with 11m tolerance = %v, want nil", err)
	}
	if err := signer.Verify(testSecret(t, 1), h, []byte(v.body), at, 0); !errors.Is(err, signer.ErrNoMatchingSignature) {
		t.Errorf("Verify with another secret = %v, want ErrNoMatchingSignature", err)
	}
}

func TestVerifierValidate(t *testing.T) {
	t.Parallel()
	ok := testSecret(t, 1)
	tests := []struct {
		name string
		v    *signer.Verifier
		want string // substring naming the field; "" for valid
	}{
		{"valid", &signer.Verifier{Secrets: []signer.Secret{ok}}, ""},
		{"nil", nil, "nil Verifier"},
		{"no secrets", &signer.Verifier{}, "Verifier.Secrets is empty"},
		{"zero secret", &signer.Verifier{Secrets: []signer.Secret{ok, {}}}, "Verifier.Secrets[1]"},
		{"negative tolerance", &signer.Verifier{Secrets: []signer.Secret{ok}, Tolerance: -time.Second}, "Verifier.Tolerance"},
		{"negative max body", &signer.Verifier{Secrets: []signer.Secret{ok}, MaxBodyBytes: -1}, "Verifier.MaxBodyBytes"},
	}
	for _, tt := range tests {
		err := tt.v.Validate()
		if tt.want == "" {
			if err != nil {
				t.Errorf("%s: Validate = %v, want nil", tt.name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Validate = %v, want an error mentioning %q", tt.name, err, tt.want)
		}
		// Verify refuses to run with a broken config rather than accepting.
		if err := tt.v.Verify(headers("m", 1, "v1,x"), nil); err == nil {
			t.Errorf("%s: Verify succeeded with an invalid Verifier", tt.name)
		}
	}
}

func FuzzVerify(f *testing.F) {
	sec := testSecret(f, 5)
	f.Add("msg_1", "1700000000", signer.Sign("msg_1", time.Unix(1700000000, 0), []byte("body"), sec), []byte("body"))
	f.Add("msg_1", "1700000000", "v1, v1,, ,v1 v1a,abc", []byte{})
	f.Add("", "", "", []byte(nil))
	v := &signer.Verifier{Secrets: []signer.Secret{sec}, Now: fixedNow(1700000000)}
	f.Fuzz(func(t *testing.T, id, ts, sig string, body []byte) {
		h := http.Header{}
		h.Set(signer.HeaderID, id)
		h.Set(signer.HeaderTimestamp, ts)
		h.Set(signer.HeaderSignature, sig)
		err := v.Verify(h, body)
		if err != nil {
			return
		}
		// Anything accepted must carry a signature we would have produced.
		n, perr := strconv.ParseInt(ts, 10, 64)
		if perr != nil {
			t.Fatalf("accepted unparsable timestamp %q", ts)
		}
		want := signer.Sign(id, time.Unix(n, 0), body, sec)
		if !strings.Contains(sig, want) {
			t.Fatalf("accepted signature header %q without our signature %q", sig, want)
		}
	})
}

func without(h http.Header, name string) http.Header {
	h.Del(name)
	return h
}

func withHeader(h http.Header, name, value string) http.Header {
	h.Set(name, value)
	return h
}

func addHeader(h http.Header, name, value string) http.Header {
	h.Add(name, value)
	return h
}

func timeUnix(s int64) time.Time { return time.Unix(s, 0) }
