package signer_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/signer"
)

func TestParseSecret(t *testing.T) {
	t.Parallel()
	const vectorB64 = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	key32 := bytes.Repeat([]byte{0xAB}, 32)
	std32 := base64.StdEncoding.EncodeToString(key32) // ends in "="
	raw32 := base64.RawStdEncoding.EncodeToString(key32)
	short := base64.StdEncoding.EncodeToString(make([]byte, 23))

	tests := []struct {
		name, in string
		wantErr  string // substring; "" for success
	}{
		{"whsec form", "whsec_" + vectorB64, ""},
		{"bare base64", vectorB64, ""},
		{"surrounding whitespace and newline", "  whsec_" + vectorB64 + "\n", ""},
		{"padded", "whsec_" + std32, ""},
		{"unpadded", "whsec_" + raw32, ""},
		{"exactly 24 bytes", base64.StdEncoding.EncodeToString(make([]byte, 24)), ""},
		{"empty", "", "empty"},
		{"prefix only", "whsec_", "empty"},
		{"not base64", "whsec_this-is-not*base64!!", "not valid standard base64"},
		{"url-safe alphabet", "whsec_" + strings.NewReplacer("+", "-", "/", "_").Replace(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0xFB, 0xFF}, 16))), "not valid standard base64"},
		{"too short", "whsec_" + short, "23 bytes, need at least 24"},
		{"hex secret", strings.Repeat("0f", 8), "12 bytes"},
	}
	for _, tt := range tests {
		sec, err := signer.ParseSecret(tt.in)
		if tt.wantErr == "" {
			if err != nil {
				t.Errorf("%s: ParseSecret = %v, want nil", tt.name, err)
			} else if sec.IsZero() {
				t.Errorf("%s: ParseSecret returned a zero Secret", tt.name)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: ParseSecret succeeded, want error mentioning %q", tt.name, tt.wantErr)
			continue
		}
		if !errors.Is(err, signer.ErrInvalidSecret) {
			t.Errorf("%s: error %v does not wrap ErrInvalidSecret", tt.name, err)
		}
		if !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("%s: error %q does not mention %q", tt.name, err, tt.wantErr)
		}
		if body := strings.TrimPrefix(strings.TrimSpace(tt.in), "whsec_"); len(body) >= 4 && strings.Contains(err.Error(), body[:4]) {
			t.Errorf("%s: error %q contains part of the secret", tt.name, err)
		}
		if !sec.IsZero() {
			t.Errorf("%s: failed ParseSecret returned a non-zero Secret", tt.name)
		}
	}
}

func TestParseSecretPaddingIsTheSameKey(t *testing.T) {
	t.Parallel()
	key := bytes.Repeat([]byte{7}, 32)
	a, err := signer.ParseSecret("whsec_" + base64.StdEncoding.EncodeToString(key))
	if err != nil {
		t.Fatal(err)
	}
	b, err := signer.ParseSecret(base64.RawStdEncoding.EncodeToString(key))
	if err != nil {
		t.Fatal(err)
	}
	c, err := signer.NewSecret(key)
	if err != nil {
		t.Fatal(err)
	}
	sa, sb, sc := signer.Sign("m", timeUnix(1), nil, a), signer.Sign("m", timeUnix(1), nil, b), signer.Sign("m", timeUnix(1), nil, c)
	if sa != sb || sa != sc {
		t.Errorf("padded, unpadded and raw forms of one key sign differently: %q %q %q", sa, sb, sc)
	}
}

func TestNewSecretCopiesKey(t *testing.T) {
	t.Parallel()
	key := bytes.Repeat([]byte{1}, 32)
	sec, err := signer.NewSecret(key)
	if err != nil {
		t.Fatal(err)
	}
	before := signer.Sign("m", timeUnix(1), nil, sec)
	key[0] = 2
	if after := signer.Sign("m", timeUnix(1), nil, sec); after != before {
		t.Error("changing the caller's slice changed the Secret")
	}
	if _, err := signer.NewSecret(make([]byte, 10)); !errors.Is(err, signer.ErrInvalidSecret) {
		t.Errorf("NewSecret(10 bytes) = %v, want ErrInvalidSecret", err)
	}
}

func TestSecretIsRedacted(t *testing.T) {
	t.Parallel()
	const b64 = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	sec := mustSecret(t, "whsec_"+b64)
	raw, _ := base64.StdEncoding.DecodeString(b64)
	leaks := func(out string) bool {
		return strings.Contains(out, b64) ||
			strings.Contains(out, fmt.Sprintf("%x", raw)) ||
			strings.Contains(out, fmt.Sprint(raw)) ||
			strings.Contains(out, fmt.Sprint(raw[:4])[1:8]) || // decimal bytes, as %d prints them
			strings.Contains(out, string(raw))
	}

	type config struct {
		URL    string
		Secret signer.Secret
		Ptr    *signer.Secret
	}
	cfg := config{URL: "https://example.com", Secret: sec, Ptr: &sec}
	var outs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%T"} {
		outs = append(outs, fmt.Sprintf(verb, sec), fmt.Sprintf(verb, cfg), fmt.Sprintf(verb, []signer.Secret{sec}))
	}
	outs = append(outs, sec.String(), fmt.Sprint(sec), fmt.Sprintln(sec))
	j, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	outs = append(outs, string(j))
	var logBuf bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&logBuf, nil))
	logger.Info("endpoint", slog.Any("secret", sec), slog.Any("config", cfg))
	text := slog.New(slog.NewTextHandler(&logBuf, nil))
	text.Info("endpoint", "secret", sec, "ptr", &sec)
	outs = append(outs, logBuf.String())

	for _, out := range outs {
		if leaks(out) {
			t.Errorf("secret leaked in %q", out)
		}
	}
	if got := fmt.Sprint(sec); got != "whsec_REDACTED" {
		t.Errorf("fmt.Sprint(secret) = %q, want whsec_REDACTED", got)
	}
	if !strings.Contains(logBuf.String(), `"secret":"whsec_REDACTED"`) {
		t.Errorf("slog output %q does not show the redacted secret", logBuf.String())
	}
}
