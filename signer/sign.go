package signer

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"hash"
	"strconv"
	"sync"
	"time"
)

// Header names of the Standard Webhooks format. net/http canonicalises them
// on the wire (Webhook-Id, ...); receivers must match them case-insensitively,
// as http.Header.Get does.
const (
	HeaderID        = "webhook-id"
	HeaderTimestamp = "webhook-timestamp"
	HeaderSignature = "webhook-signature"
)

// sigVersion is the only scheme this package produces and checks.
const sigVersion = "v1"

// signedLen is the length of one "v1,<base64 HMAC-SHA256>" entry.
var signedLen = len(sigVersion) + 1 + base64.StdEncoding.EncodedLen(sha256.Size)

// Sign returns the webhook-signature header value for a message: one
// "v1,<signature>" per secret, in the order given, separated by single spaces.
// ts is truncated to Unix seconds, which is also what webhook-timestamp must
// carry (strconv.FormatInt(ts.Unix(), 10)).
//
// Sign builds fresh HMAC state on every call; on a hot path build a Signer
// once and use AppendSignature. Sign panics if a secret is the zero Secret.
func Sign(msgID string, ts time.Time, body []byte, secrets ...Secret) string {
	if len(secrets) == 0 {
		return ""
	}
	var scratch []byte
	dst := make([]byte, 0, len(secrets)*(signedLen+1))
	for i, s := range secrets {
		mustKey(s)
		if i > 0 {
			dst = append(dst, ' ')
		}
		dst, scratch = appendOne(dst, scratch, hmac.New(sha256.New, s.key), msgID, ts.Unix(), body)
	}
	return string(dst)
}

// Signer signs messages with a fixed set of secrets, reusing HMAC state
// between calls. It is safe for concurrent use. To rotate secrets, build a
// new Signer holding both the new and the old secret, then one holding only
// the new secret once receivers have switched.
type Signer struct {
	n    int
	pool sync.Pool // of *macState
}

// macState is what one goroutine needs to sign one message: a keyed HMAC per
// secret and a scratch buffer, so that signing does not allocate.
type macState struct {
	macs    []hash.Hash
	scratch []byte
}

// NewSigner returns a Signer that signs with each of secrets, in order. It
// panics if secrets is empty or holds a zero Secret: both are programming
// errors, since ParseSecret and NewSecret never return a zero Secret without
// an error.
func NewSigner(secrets ...Secret) *Signer {
	if len(secrets) == 0 {
		panic("signer: NewSigner needs at least one secret")
	}
	keys := make([][]byte, len(secrets))
	for i, s := range secrets {
		mustKey(s)
		keys[i] = s.key // Secrets are immutable once built; sharing is safe.
	}
	sg := &Signer{n: len(keys)}
	sg.pool.New = func() any {
		st := &macState{macs: make([]hash.Hash, len(keys)), scratch: make([]byte, 0, 128)}
		for i, k := range keys {
			st.macs[i] = hmac.New(sha256.New, k)
		}
		return st
	}
	return sg
}

// AppendSignature appends the webhook-signature header value for a message to
// dst and returns the extended buffer. ts is Unix seconds, the value sent in
// webhook-timestamp. Pass a reused buffer (sig[:0]) to sign without
// allocating.
func (sg *Signer) AppendSignature(dst []byte, msgID string, ts int64, body []byte) []byte {
	st := sg.pool.Get().(*macState)
	for i, mac := range st.macs {
		if i > 0 {
			dst = append(dst, ' ')
		}
		mac.Reset()
		dst, st.scratch = appendOne(dst, st.scratch, mac, msgID, ts, body)
	}
	sg.pool.Put(st)
	return dst
}

// Sign is AppendSignature returning a string, for callers off the hot path.
func (sg *Signer) Sign(msgID string, ts time.Time, body []byte) string {
	return string(sg.AppendSignature(make([]byte, 0, sg.n*(signedLen+1)), msgID, ts.Unix(), body))
}

// appendOne appends "v1,<base64 MAC>" for one message to dst. mac must be
// freshly keyed or Reset. scratch is reused for the signed prefix and the sum
// and returned so that its growth is kept.
func appendOne(dst, scratch []byte, mac hash.Hash, msgID string, ts int64, body []byte) ([]byte, []byte) {
	scratch = append(scratch[:0], msgID...)
	scratch = append(scratch, '.')
	scratch = strconv.AppendInt(scratch, ts, 10)
	scratch = append(scratch, '.')
	mac.Write(scratch)
	mac.Write(body)
	scratch = mac.Sum(scratch[:0])
	dst = append(dst, sigVersion+","...)
	dst = base64.StdEncoding.AppendEncode(dst, scratch)
	return dst, scratch
}

func mustKey(s Secret) {
	if s.IsZero() {
		panic("signer: zero Secret; build secrets with ParseSecret or NewSecret")
	}
}
