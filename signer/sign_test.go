package signer_test

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/signer"
)

// vector is a signature published by a Standard Webhooks implementation.
type vector struct {
	source, secret, msgID string
	ts                    int64
	body                  string
	want                  string
}

var vectors = []vector{
	{
		// The example in the Standard Webhooks specification, used by the
		// test suites of every standard-webhooks and svix library.
		source: "standard-webhooks spec / libraries/go webhook_test.go TestWebhookSign",
		secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
		msgID:  "msg_p5jXN8AQM9LWM0D4loKWxJek",
		ts:     1614265330,
		body:   `{"test": 2432232314}`,
		want:   "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
	},
	{
		source: "svix-webhooks rust/src/webhooks.rs test_sign",
		secret: "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
		msgID:  "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
		ts:     1649367553,
		body:   `{"email":"test@example.com","username":"test_user"}`,
		want:   "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
	},
}

func mustSecret(t testing.TB, s string) signer.Secret {
	t.Helper()
	sec, err := signer.ParseSecret(s)
	if err != nil {
		t.Fatalf("ParseSecret: %v", err)
	}
	return sec
}

// testSecret returns a distinct valid secret for each n.
func testSecret(t testing.TB, n byte) signer.Secret {
	t.Helper()
	key := bytes.Repeat([]byte{n}, 32)
	sec, err := signer.NewSecret(key)
	if err != nil {
		t.Fatalf("NewSecret: %v", err)
	}
	return sec
}

func TestSignVectors(t *testing.T) {
	t.Parallel()
	for _, v := range vectors {
		t.Run(v.msgID, func(t *testing.T) {
			sec := mustSecret(t, v.secret)
			if got := signer.Sign(v.msgID, time.Unix(v.ts, 0), []byte(v.body), sec); got != v.want {
				t.Errorf("Sign = %q, want %q (%s)", got, v.want, v.source)
			}
			// Bare base64, without the whsec_ prefix, is the same key.
			bare := mustSecret(t, strings.TrimPrefix(v.secret, "whsec_"))
			if got := signer.Sign(v.msgID, time.Unix(v.ts, 0), []byte(v.body), bare); got != v.want {
				t.Errorf("Sign with bare base64 secret = %q, want %q", got, v.want)
			}
			sg := signer.NewSigner(sec)
			if got := string(sg.AppendSignature(nil, v.msgID, v.ts, []byte(v.body))); got != v.want {
				t.Errorf("AppendSignature = %q, want %q", got, v.want)
			}
			// Sub-second parts of the time are not signed.
			if got := sg.Sign(v.msgID, time.Unix(v.ts, 999_999_999), []byte(v.body)); got != v.want {
				t.Errorf("Signer.Sign = %q, want %q", got, v.want)
			}

			h := headers(v.msgID, v.ts, v.want)
			vf := &signer.Verifier{Secrets: []signer.Secret{sec}, Now: fixedNow(v.ts)}
			if err := vf.Verify(h, []byte(v.body)); err != nil {
				t.Errorf("Verify(published vector) = %v, want nil", err)
			}
		})
	}
}

func TestSignOneEntryPerSecret(t *testing.T) {
	t.Parallel()
	a, b, c := testSecret(t, 1), testSecret(t, 2), testSecret(t, 3)
	ts := time.Unix(1700000000, 0)
	body := []byte(`{"a":1}`)

	got := signer.Sign("msg_1", ts, body, a, b, c)
	parts := strings.Split(got, " ")
	if len(parts) != 3 {
		t.Fatalf("Sign with 3 secrets = %q, want 3 space-separated entries", got)
	}
	for i, sec := range []signer.Secret{a, b, c} {
		if want := signer.Sign("msg_1", ts, body, sec); parts[i] != want {
			t.Errorf("entry %d = %q, want %q (signature with secret %d alone)", i, parts[i], want, i)
		}
		if !strings.HasPrefix(parts[i], "v1,") || len(parts[i]) != len("v1,")+44 {
			t.Errorf("entry %d = %q, want v1,<44 base64 chars>", i, parts[i])
		}
	}
	if parts[0] == parts[1] {
		t.Errorf("different secrets gave the same signature %q", parts[0])
	}
	if got2 := signer.NewSigner(a, b, c).Sign("msg_1", ts, body); got2 != got {
		t.Errorf("Signer.Sign = %q, want Sign's %q", got2, got)
	}
	if got := signer.Sign("msg_1", ts, body); got != "" {
		t.Errorf("Sign with no secrets = %q, want empty", got)
	}
}

func TestAppendSignatureKeepsPrefixAndReusesBuffer(t *testing.T) {
	// Not parallel: AllocsPerRun refuses to run beside parallel tests.
	sec := testSecret(t, 7)
	sg := signer.NewSigner(sec)
	want := signer.Sign("msg_x", time.Unix(42, 0), []byte("body"), sec)

	got := sg.AppendSignature([]byte("prefix:"), "msg_x", 42, []byte("body"))
	if string(got) != "prefix:"+want {
		t.Errorf("AppendSignature(prefix) = %q, want %q", got, "prefix:"+want)
	}
	buf := make([]byte, 0, 256)
	for i := 0; i < 3; i++ {
		buf = sg.AppendSignature(buf[:0], "msg_x", 42, []byte("body"))
		if string(buf) != want {
			t.Fatalf("call %d: AppendSignature = %q, want %q (state leaked between calls)", i, buf, want)
		}
	}
	if raceEnabled {
		return // the race detector makes sync.Pool drop items at random
	}
	body := []byte("body")
	if allocs := testing.AllocsPerRun(100, func() {
		buf = sg.AppendSignature(buf[:0], "msg_x", 42, body)
	}); allocs > 0 {
		t.Errorf("AppendSignature into a large enough buffer allocates %.1f times per call, want 0", allocs)
	}
}

// TestSignerConcurrent shares one Signer between goroutines; run with -race.
func TestSignerConcurrent(t *testing.T) {
	t.Parallel()
	a, b := testSecret(t, 1), testSecret(t, 2)
	sg := signer.NewSigner(a, b)
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			for i := 0; i < 200; i++ {
				id := fmt.Sprintf("msg_%d_%d", g, i)
				body := []byte(strings.Repeat("x", i))
				buf = sg.AppendSignature(buf[:0], id, int64(i), body)
				if want := signer.Sign(id, time.Unix(int64(i), 0), body, a, b); string(buf) != want {
					errs <- fmt.Sprintf("goroutine %d message %d: got %q, want %q", g, i, buf, want)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

func TestSignerPanicsOnMisuse(t *testing.T) {
	t.Parallel()
	for name, f := range map[string]func(){
		"NewSigner()":                func() { signer.NewSigner() },
		"NewSigner(zero Secret)":     func() { signer.NewSigner(signer.Secret{}) },
		"Sign(zero Secret)":          func() { signer.Sign("m", time.Unix(1, 0), nil, signer.Secret{}) },
		"NewSigner(ok, zero Secret)": func() { signer.NewSigner(testSecret(t, 1), signer.Secret{}) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s did not panic", name)
				}
			}()
			f()
		}()
	}
}

func BenchmarkSignerAppendSignature(b *testing.B) {
	body := bytes.Repeat([]byte(`{"k":"v"}`), 1024/9) // ~1 KiB JSON-ish payload
	for _, n := range []int{1, 2} {
		secrets := make([]signer.Secret, n)
		for i := range secrets {
			secrets[i] = testSecret(b, byte(i+1))
		}
		sg := signer.NewSigner(secrets...)
		b.Run(fmt.Sprintf("secrets=%d/body=%dB", n, len(body)), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			buf := make([]byte, 0, 256)
			for b.Loop() {
				buf = sg.AppendSignature(buf[:0], "msg_2mXyZ0a1b2c3d4e5f6g7h8i9", 1700000000, body)
			}
		})
		b.Run(fmt.Sprintf("secrets=%d/body=%dB/parallel", n, len(body)), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, 0, 256)
				for pb.Next() {
					buf = sg.AppendSignature(buf[:0], "msg_2mXyZ0a1b2c3d4e5f6g7h8i9", 1700000000, body)
				}
			})
		})
	}
}

// BenchmarkSign is the convenience function, for comparison with Signer.
func BenchmarkSign(b *testing.B) {
	body := bytes.Repeat([]byte(`{"k":"v"}`), 1024/9)
	sec := testSecret(b, 1)
	ts := time.Unix(1700000000, 0)
	b.ReportAllocs()
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		_ = signer.Sign("msg_2mXyZ0a1b2c3d4e5f6g7h8i9", ts, body, sec)
	}
}

// The Signer's saved key states give the same MAC as crypto/hmac for keys
// shorter than, equal to and longer than SHA-256's block (which HMAC
// hashes first), alone and rotated together.
func TestSignerMatchesHMACForEveryKeyLength(t *testing.T) {
	var secrets []signer.Secret
	for _, n := range []int{24, 32, 63, 64, 65, 100, 200} {
		key := bytes.Repeat([]byte{byte(n)}, n)
		key[0] ^= 0xa5
		s, err := signer.NewSecret(key)
		if err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, s)
		ts := time.Unix(1614265330, 0)
		body := []byte(strings.Repeat(`{"k":"v"}`, n))
		want := signer.Sign("msg_p5jXN8AQM9LWM0D4loKWxJek", ts, body, s) // fresh crypto/hmac state
		if got := signer.NewSigner(s).Sign("msg_p5jXN8AQM9LWM0D4loKWxJek", ts, body); got != want {
			t.Errorf("%d-byte key: Signer gives %s, crypto/hmac %s", n, got, want)
		}
	}
	ts := time.Unix(1700000000, 0)
	if got, want := signer.NewSigner(secrets...).Sign("msg_x", ts, []byte("{}")), signer.Sign("msg_x", ts, []byte("{}"), secrets...); got != want {
		t.Errorf("all keys together: %s, want %s", got, want)
	}
}

// 10,000 endpoints each with its own Signer, signed round robin, as a relay
// with many endpoints does.
func BenchmarkManySigners(b *testing.B) {
	sgs := make([]*signer.Signer, 10_000)
	for i := range sgs {
		s, err := signer.NewSecret([]byte(fmt.Sprintf("key-%028d", i)))
		if err != nil {
			b.Fatal(err)
		}
		sgs[i] = signer.NewSigner(s)
	}
	body := bytes.Repeat([]byte("x"), 500)
	var sig []byte
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		sig = sgs[i%len(sgs)].AppendSignature(sig[:0], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
	}
}
