package signer_test

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"

	"github.com/outbox-relay/outbox-relay/signer"
)

// The tests in this file check the wire format against implementations that
// share no code with ours: the Standard Webhooks reference Go library
// (github.com/standard-webhooks/standard-webhooks/libraries v0.0.1, test-only
// dependency) and the openssl command line tool.

type interopCase struct {
	secret string // whsec_...
	id     string
	body   []byte
}

// interopCases returns the published vectors plus random messages: keys of
// several lengths, binary and empty bodies, ids with dots in them.
func interopCases(t *testing.T) []interopCase {
	t.Helper()
	var cs []interopCase
	for _, v := range vectors {
		cs = append(cs, interopCase{v.secret, v.msgID, []byte(v.body)})
	}
	for i := 0; i < 50; i++ {
		keyLen := 24 + randInt(t, 41) // 24..64 bytes, the spec's range
		bodyLen := randInt(t, 4096)
		if i%10 == 0 {
			bodyLen = 0
		}
		key, body := make([]byte, keyLen), make([]byte, bodyLen)
		_, _ = rand.Read(key)
		_, _ = rand.Read(body)
		cs = append(cs, interopCase{
			secret: "whsec_" + base64.StdEncoding.EncodeToString(key),
			id:     fmt.Sprintf("msg_%d.%x", i, key[:4]),
			body:   body,
		})
	}
	return cs
}

func randInt(t *testing.T, n int64) int {
	t.Helper()
	v, err := rand.Int(rand.Reader, big.NewInt(n))
	if err != nil {
		t.Fatal(err)
	}
	return int(v.Int64())
}

func TestInteropStandardWebhooksLibrary(t *testing.T) {
	t.Parallel()
	// The reference library reads time.Now itself, so sign at the current time.
	now := time.Now()
	for i, c := range interopCases(t) {
		ours := mustSecret(t, c.secret)
		theirs, err := standardwebhooks.NewWebhook(c.secret)
		if err != nil {
			t.Fatalf("case %d: reference NewWebhook: %v", i, err)
		}

		// Same bytes for the same input.
		ourSig := signer.Sign(c.id, now, c.body, ours)
		theirSig, err := theirs.Sign(c.id, now, c.body)
		if err != nil {
			t.Fatalf("case %d: reference Sign: %v", i, err)
		}
		if ourSig != theirSig {
			t.Errorf("case %d: our signature %q, reference %q", i, ourSig, theirSig)
		}
		if got := string(signer.NewSigner(ours).AppendSignature(nil, c.id, now.Unix(), c.body)); got != theirSig {
			t.Errorf("case %d: Signer signature %q, reference %q", i, got, theirSig)
		}

		// We sign, they verify.
		h := headers(c.id, now.Unix(), ourSig)
		if err := theirs.Verify(c.body, h); err != nil {
			t.Errorf("case %d: reference rejects our signature: %v", i, err)
		}
		// ... and they reject what we signed once it is tampered with.
		tampered := append(bytes.Clone(c.body), 'x')
		if err := theirs.Verify(tampered, h); !errors.Is(err, standardwebhooks.ErrNoMatchingSignature) {
			t.Errorf("case %d: reference accepted a tampered body: %v", i, err)
		}

		// They sign, we verify.
		h = headers(c.id, now.Unix(), theirSig)
		v := &signer.Verifier{Secrets: []signer.Secret{ours}, Now: func() time.Time { return now }}
		if err := v.Verify(h, c.body); err != nil {
			t.Errorf("case %d: we reject the reference signature: %v", i, err)
		}
		if err := v.Verify(h, tampered); !errors.Is(err, signer.ErrNoMatchingSignature) {
			t.Errorf("case %d: we accepted a tampered body: %v", i, err)
		}
	}
}

func TestInteropStandardWebhooksVectors(t *testing.T) {
	t.Parallel()
	for _, v := range vectors {
		theirs, err := standardwebhooks.NewWebhook(v.secret)
		if err != nil {
			t.Fatal(err)
		}
		ours := signer.Sign(v.msgID, time.Unix(v.ts, 0), []byte(v.body), mustSecret(t, v.secret))
		if err := theirs.VerifyIgnoringTimestamp([]byte(v.body), headers(v.msgID, v.ts, ours)); err != nil {
			t.Errorf("%s: reference rejects our signature %q: %v", v.msgID, ours, err)
		}
	}
}

// TestInteropRotation: a header carrying one signature per secret verifies
// with the reference library holding either secret alone.
func TestInteropRotation(t *testing.T) {
	t.Parallel()
	now := time.Now()
	oldKey, newKey := "whsec_"+base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{1}, 32)), "whsec_"+base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{2}, 32))
	body := []byte(`{"rotating":true}`)
	sig := signer.NewSigner(mustSecret(t, oldKey), mustSecret(t, newKey)).Sign("msg_rot", now, body)
	for _, k := range []string{oldKey, newKey} {
		wh, err := standardwebhooks.NewWebhook(k)
		if err != nil {
			t.Fatal(err)
		}
		if err := wh.Verify(body, headers("msg_rot", now.Unix(), sig)); err != nil {
			t.Errorf("reference with one of the two secrets rejects %q: %v", sig, err)
		}
	}
	other, _ := standardwebhooks.NewWebhook("whsec_" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{3}, 32)))
	if err := other.Verify(body, headers("msg_rot", now.Unix(), sig)); err == nil {
		t.Error("reference with an unrelated secret accepted the rotated header")
	}
}

// TestInteropOpenSSL computes the MAC with openssl, from the raw key in hex
// and the signed content assembled by hand.
func TestInteropOpenSSL(t *testing.T) {
	t.Parallel()
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("openssl not installed; the reference-library interop tests still run")
	}
	cases := interopCases(t)[:12]
	for i, c := range cases {
		key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(c.secret, "whsec_"))
		if err != nil {
			t.Fatal(err)
		}
		const ts = int64(1614265330)
		content := []byte(c.id + "." + strconv.FormatInt(ts, 10) + ".")
		content = append(content, c.body...)

		cmd := exec.Command(openssl, "dgst", "-sha256", "-mac", "HMAC", "-macopt", "hexkey:"+hex.EncodeToString(key), "-binary")
		cmd.Stdin = bytes.NewReader(content)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		mac, err := cmd.Output()
		if err != nil {
			t.Fatalf("case %d: openssl: %v: %s", i, err, stderr.String())
		}
		if len(mac) != 32 {
			t.Fatalf("case %d: openssl printed %d bytes, want a 32-byte MAC", i, len(mac))
		}
		want := "v1," + base64.StdEncoding.EncodeToString(mac)

		sec := mustSecret(t, c.secret)
		if got := signer.Sign(c.id, time.Unix(ts, 0), c.body, sec); got != want {
			t.Errorf("case %d: Sign = %q, openssl says %q", i, got, want)
		}
		v := &signer.Verifier{Secrets: []signer.Secret{sec}, Now: fixedNow(ts)}
		if err := v.Verify(headers(c.id, ts, want), c.body); err != nil {
			t.Errorf("case %d: Verify rejects the openssl signature: %v", i, err)
		}
	}
}
