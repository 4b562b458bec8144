package bench

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outbox-relay/outbox-relay/signer"
)

// eventID is the outbox id of event seq in the phase tagged tag: 4 bytes of
// tag, 4 zero bytes, 8 bytes of sequence number. Its webhook-id is
// "msg_" + the 32 hex digits, which the receiver turns back into seq.
func eventID(tag uint32, seq int) [16]byte {
	var id [16]byte
	binary.BigEndian.PutUint32(id[0:4], tag)
	binary.BigEndian.PutUint64(id[8:16], uint64(seq))
	return id
}

func webhookID(id [16]byte) string {
	var b [4 + 32]byte
	copy(b[:], "msg_")
	hex.Encode(b[4:], id[:])
	return string(b[:])
}

// appendBody appends a JSON body of exactly size bytes (when size allows)
// in the form jsonb prints it (keys by length, ": " and ", "), so the
// relay, which sends payload::text, posts the very bytes the bare client
// posts. t is the producer's clock in Unix nanoseconds.
func appendBody(dst []byte, seq int, t int64, size int) []byte {
	start := len(dst)
	dst = append(dst, `{"i": `...)
	dst = appendInt(dst, int64(seq))
	dst = append(dst, `, "t": `...)
	dst = appendInt(dst, t)
	dst = append(dst, `, "pad": "`...)
	for pad := size - (len(dst) - start) - 2; pad > 0; pad-- {
		dst = append(dst, 'x')
	}
	return append(dst, `"}`...)
}

func appendInt(dst []byte, v int64) []byte {
	var b [20]byte
	i := len(b)
	neg := v < 0
	if neg {
		v = -v
	}
	for {
		i--
		b[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			break
		}
	}
	if neg {
		i--
		b[i] = '-'
	}
	return append(dst, b[i:]...)
}

// bodyTime reads the "t" field of a body built by appendBody.
func bodyTime(body []byte) (int64, bool) {
	i := bytes.Index(body, []byte(`"t": `))
	if i < 0 {
		return 0, false
	}
	var v int64
	n := 0
	for _, c := range body[i+5:] {
		if c < '0' || c > '9' {
			break
		}
		v = v*10 + int64(c-'0')
		n++
	}
	return v, n > 0
}

// tally counts what one phase receives.
type tally struct {
	prefix   string // "msg_" + hex(tag) + "00000000"
	n        int
	size     int  // expected body length
	latency  bool // record arrival - body "t"
	verifier *signer.Verifier

	counts []atomic.Int32
	lat    []int64 // ns, written once per seq on its first arrival

	requests   atomic.Int64
	distinct   atomic.Int64
	dups       atomic.Int64
	unexpected atomic.Int64 // webhook-id not of this phase
	badBody    atomic.Int64 // wrong length: the body was altered on the way
	badSig     atomic.Int64
	misrouted  atomic.Int64 // scale.go: arrived at another endpoint's path
	routes     int          // scale.go: event seq belongs at /ep/<seq mod routes>; 0 = no check
	first      atomic.Int64 // Unix ns of the first arrival
	last       atomic.Int64 // Unix ns of the last first-arrival
	done       chan struct{}
	doneOnce   sync.Once
}

func newTally(tag uint32, n, size int, latency bool, v *signer.Verifier) *tally {
	var t [4]byte
	binary.BigEndian.PutUint32(t[:], tag)
	tl := &tally{
		prefix: "msg_" + hex.EncodeToString(t[:]) + "00000000",
		n:      n, size: size, latency: latency, verifier: v,
		counts: make([]atomic.Int32, n),
		done:   make(chan struct{}),
	}
	if latency {
		tl.lat = make([]int64, n)
	}
	if n == 0 {
		close(tl.done)
	}
	return tl
}

func (tl *tally) seq(id string) (int, bool) {
	if len(id) != 36 || id[:20] != tl.prefix {
		return 0, false
	}
	var b [8]byte
	if _, err := hex.Decode(b[:], []byte(id[20:])); err != nil {
		return 0, false
	}
	s := binary.BigEndian.Uint64(b[:])
	if s >= uint64(tl.n) {
		return 0, false
	}
	return int(s), true
}

func (tl *tally) record(h http.Header, body []byte, now time.Time) {
	tl.requests.Add(1)
	if tl.verifier != nil && tl.verifier.Verify(h, body) != nil {
		tl.badSig.Add(1)
	}
	if tl.size > 0 && len(body) != tl.size {
		tl.badBody.Add(1)
	}
	seq, ok := tl.seq(h.Get("Webhook-Id"))
	if !ok {
		tl.unexpected.Add(1)
		return
	}
	if tl.counts[seq].Add(1) > 1 {
		tl.dups.Add(1)
		return
	}
	ns := now.UnixNano()
	if tl.latency {
		if t, ok := bodyTime(body); ok {
			tl.lat[seq] = ns - t
		}
	}
	tl.first.CompareAndSwap(0, ns)
	tl.last.Store(ns)
	if tl.distinct.Add(1) == int64(tl.n) {
		tl.doneOnce.Do(func() { close(tl.done) })
	}
}

// latencies returns the recorded latencies of the events that arrived,
// sorted. Call it once the phase is over.
func (tl *tally) latencies() []time.Duration {
	out := make([]time.Duration, 0, tl.n)
	for i := range tl.counts {
		if tl.counts[i].Load() > 0 {
			out = append(out, time.Duration(tl.lat[i]))
		}
	}
	slices.Sort(out)
	return out
}

// afterCommit returns, sorted, each arrived event's latency less its
// producer's commit time (commits[seq]: how long the INSERT took to
// return): commit-to-delivery counted from the moment the producer's
// COMMIT returned. Events with no commit time (a gap left by a failed
// run) are left out. A value can be slightly negative: the walsender may
// send a commit before the producer's backend has answered it.
func (tl *tally) afterCommit(commits []time.Duration) []time.Duration {
	if tl.lat == nil {
		return nil
	}
	out := make([]time.Duration, 0, len(commits))
	for i, c := range commits[:min(len(commits), tl.n)] {
		if c > 0 && tl.counts[i].Load() > 0 {
			out = append(out, time.Duration(tl.lat[i])-c)
		}
	}
	slices.Sort(out)
	return out
}

// receiver is a minimal loopback webhook receiver answering 204.
type receiver struct {
	srv  *http.Server
	ln   net.Listener
	url  string
	cur  atomic.Pointer[tally]
	bufs sync.Pool
	json bool // decode every body, as a handler would
}

func startReceiver(decodeJSON bool) (*receiver, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	rc := &receiver{ln: ln, url: "http://" + ln.Addr().String() + "/hook", json: decodeJSON}
	rc.bufs.New = func() any { b := make([]byte, 0, 4096); return &b }
	rc.srv = &http.Server{Handler: rc, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute}
	go rc.srv.Serve(ln) //nolint:errcheck // ends with Close
	return rc, nil
}

// expect makes tl the tally for what arrives from now on.
func (rc *receiver) expect(tl *tally) { rc.cur.Store(tl) }

func (rc *receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	bp := rc.bufs.Get().(*[]byte)
	body, err := readAll(r.Body, (*bp)[:0])
	if err == nil {
		if tl := rc.cur.Load(); tl != nil {
			if tl.routes > 0 {
				tl.checkRoute(r.URL.Path, r.Header)
			}
			if rc.json {
				var v map[string]any
				if json.Unmarshal(body, &v) != nil {
					tl.badBody.Add(1)
				}
			}
			tl.record(r.Header, body, now)
		}
	}
	*bp = body
	rc.bufs.Put(bp)
	w.WriteHeader(http.StatusNoContent)
}

func readAll(r io.Reader, b []byte) ([]byte, error) {
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err != nil {
			if errors.Is(err, io.EOF) {
				return b, nil
			}
			return b, err
		}
	}
}

func (rc *receiver) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if rc.srv.Shutdown(ctx) != nil {
		rc.srv.Close()
	}
}
