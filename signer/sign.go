package signer

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding"
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
//
// A Signer keeps, per secret, the SHA-256 states after the HMAC key pads
// (RFC 2104), so a signature costs the message's blocks and one more, with
// no per-Signer caches: a relay with thousands of endpoints signs each
// with state from one shared pool.
type Signer struct {
	n    int
	keys []keyedState
}

// keyedState is one secret's HMAC-SHA256 prefix: the marshaled SHA-256
// states after hashing key XOR ipad and key XOR opad.
type keyedState struct {
	inner, outer []byte
}

func newKeyedState(key []byte) keyedState {
	if len(key) > sha256.BlockSize {
		sum := sha256.Sum256(key)
		key = sum[:]
	}
	var ipad, opad [sha256.BlockSize]byte
	copy(ipad[:], key)
	copy(opad[:], key)
	for i := range ipad {
		ipad[i] ^= 0x36
		opad[i] ^= 0x5c
	}
	marshal := func(pad []byte) []byte {
		h := sha256.New()
		h.Write(pad)
		b, err := h.(encoding.BinaryMarshaler).MarshalBinary()
		if err != nil {
			panic("signer: sha256 state cannot be saved: " + err.Error())
		}
		return b
	}
	return keyedState{inner: marshal(ipad[:]), outer: marshal(opad[:])}
}

// shaState is what one goroutine needs to sign one message: two SHA-256
// hashes to restore the keyed states into, and scratch space.
type shaState struct {
	inner, outer hash.Hash
	scratch      []byte
}

var shaStates = sync.Pool{New: func() any {
	return &shaState{inner: sha256.New(), outer: sha256.New(), scratch: make([]byte, 0, 128)}
}}

func restore(h hash.Hash, state []byte) {
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(state); err != nil {
		panic("signer: sha256 state cannot be restored: " + err.Error())
	}
}

// NewSigner returns a Signer that signs with each of secrets, in order. It
// panics if secrets is empty or holds a zero Secret: both are programming
// errors, since ParseSecret and NewSecret never return a zero Secret without
// an error.
func NewSigner(secrets ...Secret) *Signer {
	if len(secrets) == 0 {
		panic("signer: NewSigner needs at least one secret")
	}
	sg := &Signer{n: len(secrets), keys: make([]keyedState, len(secrets))}
	for i, s := range secrets {
		mustKey(s)
		sg.keys[i] = newKeyedState(s.key)
	}
	return sg
}

// AppendSignature appends the webhook-signature header value for a message to
// dst and returns the extended buffer. ts is Unix seconds, the value sent in
// webhook-timestamp. Pass a reused buffer (sig[:0]) to sign without
// allocating.
func (sg *Signer) AppendSignature(dst []byte, msgID string, ts int64, body []byte) []byte {
	st := shaStates.Get().(*shaState)
	for i, k := range sg.keys {
		if i > 0 {
			dst = append(dst, ' ')
		}
		st.scratch = append(st.scratch[:0], msgID...)
		st.scratch = append(st.scratch, '.')
		st.scratch = strconv.AppendInt(st.scratch, ts, 10)
		st.scratch = append(st.scratch, '.')
		restore(st.inner, k.inner)
		st.inner.Write(st.scratch)
		st.inner.Write(body)
		st.scratch = st.inner.Sum(st.scratch[:0])
		restore(st.outer, k.outer)
		st.outer.Write(st.scratch)
		st.scratch = st.outer.Sum(st.scratch[:0])
		dst = append(dst, sigVersion+","...)
		dst = base64.StdEncoding.AppendEncode(dst, st.scratch)
	}
	shaStates.Put(st)
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
