package h1

import (
	"bufio"
	"bytes"
	"cmp"
	"container/list"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/sockio"
)

// Defaults of the Transport's fields.
const (
	DefaultMaxIdlePerHost = 64
	DefaultMaxIdle        = 256
	DefaultIdleTimeout    = 90 * time.Second
)

const (
	// readBufferBytes is each connection's read buffer: a status line and
	// headers of a usual answer fit in one read.
	readBufferBytes = 4 << 10
	// maxHeaderBytes bounds an answer's status line and headers together.
	maxHeaderBytes = 64 << 10
	// keepWireBytes: a request buffer that grew past this is not pooled.
	keepWireBytes = 64 << 10
)

// Transport is an http.RoundTripper for http:// URLs (see the package
// documentation). Its zero value is not usable: Dial is required. It is
// safe for concurrent use.
type Transport struct {
	// Dial opens a connection to a host:port (required). The relay passes
	// its guarded dialer, so blocked networks are refused here too. A
	// TCP connection it returns is read and written with raw syscalls
	// (internal/sockio).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// MaxIdlePerHost is how many idle connections are kept per host:port.
	// Default DefaultMaxIdlePerHost.
	MaxIdlePerHost int
	// MaxIdle bounds the idle connections over every host, so that many
	// receivers on many hosts do not hold a file descriptor each for
	// ever; past it the longest idle is closed. Default DefaultMaxIdle.
	MaxIdle int
	// IdleTimeout: a connection idle this long is closed, not reused.
	// Default DefaultIdleTimeout.
	IdleTimeout time.Duration

	mu   sync.Mutex
	idle map[string][]*conn // by host:port, oldest first
	lru  list.List          // of *conn, every idle one, newest first
}

// conn is one connection, owned by one request at a time.
type conn struct {
	t      *Transport
	addr   string
	nc     net.Conn
	br     *bufio.Reader
	idleAt time.Time
	elem   *list.Element // in Transport.lru while idle
	// stop unregisters the request context's cancel hook; false means the
	// hook ran (or is running) and the connection's deadline is spoiled.
	stop func() bool
	// read says whether any byte of an answer arrived on this request.
	read bool
	// broken: the request was not written whole; never reuse.
	broken bool
}

var wirePool = sync.Pool{New: func() any { b := make([]byte, 0, 2048); return &b }}

// aLongTimeAgo is a deadline in the past, to interrupt a blocked read or
// write at once.
var aLongTimeAgo = time.Unix(1, 0)

// RoundTrip sends req and reads the answer's status line and headers. The
// response's Body must be read to its end (or closed) to free the
// connection; reading it to its end returns the connection to the pool.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL == nil || req.URL.Scheme != "http" {
		closeBody(req)
		return nil, errors.New("h1: only http:// URLs are supported")
	}
	ctx := req.Context()
	wp := wirePool.Get().(*[]byte)
	wire, err := appendRequest((*wp)[:0], req)
	defer func() { putWire(wp, wire) }()
	closeBody(req)
	if err != nil {
		return nil, err
	}
	deadline, _ := ctx.Deadline() // zero: none
	return t.send(ctx, deadline, req, req.Method == http.MethodHead, hostPort(req.URL), wire)
}

// hostPort is the address a request to u dials.
func hostPort(u *url.URL) string {
	if u.Port() == "" {
		return net.JoinHostPort(u.Hostname(), "80")
	}
	return u.Host
}

// Prepared is the part of a POST to one URL that does not change between
// requests: request line, Host, fixed headers (and the Authorization that
// userinfo in the URL makes), rendered and validated once.
type Prepared struct {
	addr string
	head []byte
}

// Prepare renders a POST to u with header, as RoundTrip would send it.
func Prepare(u *url.URL, header http.Header) (*Prepared, error) {
	if u == nil || u.Scheme != "http" {
		return nil, errors.New("h1: only http:// URLs are supported")
	}
	head, err := appendHead(nil, &http.Request{Method: http.MethodPost, URL: u, Host: u.Host, Header: header})
	if err != nil {
		return nil, err
	}
	return &Prepared{addr: hostPort(u), head: head}, nil
}

// Field is one header field for Post.
type Field struct{ Name, Value string }

// Post sends a POST of body with p's head and the fields in extra (which
// must not repeat p's), and reads the answer's status line and headers,
// as RoundTrip does. The request must be done by deadline (zero: none, or
// ctx's if earlier); ending ctx interrupts it. It costs less than
// RoundTrip: no http.Request, no header map, no timeout context per
// request (ending ctx still interrupts it through one context.AfterFunc
// per request).
func (t *Transport) Post(ctx context.Context, deadline time.Time, p *Prepared, extra []Field, body []byte) (*http.Response, error) {
	if d, ok := ctx.Deadline(); ok && (deadline.IsZero() || d.Before(deadline)) {
		deadline = d
	}
	wp := wirePool.Get().(*[]byte)
	wire := append((*wp)[:0], p.head...)
	defer func() { putWire(wp, wire) }()
	var err error
	for _, f := range extra {
		if wire, err = appendField(wire, f.Name, f.Value); err != nil {
			return nil, err
		}
	}
	wire = append(wire, "Content-Length: "...)
	wire = strconv.AppendInt(wire, int64(len(body)), 10)
	wire = append(wire, "\r\n\r\n"...)
	wire = append(wire, body...)
	return t.send(ctx, deadline, nil, false, p.addr, wire)
}

// putWire returns a request buffer to the pool unless it grew too large.
func putWire(wp *[]byte, wire []byte) {
	if cap(wire) <= keepWireBytes {
		*wp = wire[:0]
		wirePool.Put(wp)
	}
}

// send writes wire to addr and reads the answer, on a pooled connection;
// req (nil from Post) becomes the response's Request.
func (t *Transport) send(ctx context.Context, deadline time.Time, req *http.Request, isHead bool, addr string, wire []byte) (*http.Response, error) {
	for try := 0; ; try++ {
		c, reused, err := t.get(ctx, deadline, addr)
		if err != nil {
			return nil, err
		}
		resp, err := c.roundTrip(ctx, deadline, req, isHead, wire)
		if err == nil {
			return resp, nil
		}
		c.close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		if !deadline.IsZero() && !time.Now().Before(deadline) {
			// Post's own deadline: worded as a context's would be.
			return nil, fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
		}
		// The server closed an idle connection as it was taken: nothing of
		// an answer came back, so the request goes once more on a new one.
		// Not after a timeout: a receiver that hangs gets one copy.
		if reused && !c.read && try == 0 && closedByPeer(err) {
			continue
		}
		return nil, err
	}
}

// CloseIdleConnections closes every idle connection.
func (t *Transport) CloseIdleConnections() {
	t.mu.Lock()
	closing := make([]*conn, 0, t.lru.Len())
	for e := t.lru.Front(); e != nil; e = e.Next() {
		c := e.Value.(*conn)
		c.elem = nil
		closing = append(closing, c)
	}
	t.idle = nil
	t.lru.Init()
	t.mu.Unlock()
	for _, c := range closing {
		c.nc.Close()
	}
}

func (t *Transport) idleTimeout() time.Duration {
	if t.IdleTimeout > 0 {
		return t.IdleTimeout
	}
	return DefaultIdleTimeout
}

// get returns an idle connection to addr, newest first, or dials one.
// A new connection's dial is bounded by deadline too.
func (t *Transport) get(ctx context.Context, deadline time.Time, addr string) (*conn, bool, error) {
	t.mu.Lock()
	closing := t.expireLocked(time.Now(), 0)
	var c *conn
	if stack := t.idle[addr]; len(stack) > 0 {
		c = stack[len(stack)-1]
		stack[len(stack)-1] = nil
		t.idle[addr] = stack[:len(stack)-1]
		if len(stack) == 1 {
			delete(t.idle, addr)
		}
		t.lru.Remove(c.elem)
		c.elem = nil
	}
	t.mu.Unlock()
	closeAll(closing)
	if c != nil {
		return c, true, nil
	}
	if d, ok := ctx.Deadline(); !deadline.IsZero() && (!ok || deadline.Before(d)) {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, deadline)
		defer cancel()
	}
	nc, err := t.Dial(ctx, "tcp", addr)
	if err != nil {
		return nil, false, err
	}
	nc = sockio.Wrap(nc)
	return &conn{t: t, addr: addr, nc: nc, br: bufio.NewReaderSize(nc, readBufferBytes)}, false, nil
}

// put returns c to the idle pool, or closes it when its host's share or
// the whole pool is full (the pool then closes its oldest instead).
func (t *Transport) put(c *conn) {
	now := time.Now()
	c.idleAt = now
	perHost := cmp.Or(max(t.MaxIdlePerHost, 0), DefaultMaxIdlePerHost)
	total := cmp.Or(max(t.MaxIdle, 0), DefaultMaxIdle)
	t.mu.Lock()
	if t.idle == nil {
		t.idle = make(map[string][]*conn)
	}
	var closing []*conn
	if stack := t.idle[c.addr]; len(stack) >= perHost {
		closing = append(closing, c)
	} else {
		t.idle[c.addr] = append(stack, c)
		c.elem = t.lru.PushFront(c)
	}
	closing = append(closing, t.expireLocked(now, total)...)
	t.mu.Unlock()
	closeAll(closing)
}

// expireLocked takes out of the pool, oldest first, the connections idle
// past IdleTimeout and, when keep > 0, those past the newest keep. It
// returns them for closing outside the lock.
func (t *Transport) expireLocked(now time.Time, keep int) []*conn {
	var out []*conn
	for e := t.lru.Back(); e != nil; e = t.lru.Back() {
		c := e.Value.(*conn)
		if (keep <= 0 || t.lru.Len() <= keep) && now.Sub(c.idleAt) < t.idleTimeout() {
			break
		}
		t.lru.Remove(e)
		c.elem = nil
		stack := t.idle[c.addr]
		for i, s := range stack { // the oldest of its host: near the front
			if s == c {
				stack = append(stack[:i], stack[i+1:]...)
				break
			}
		}
		if len(stack) == 0 {
			delete(t.idle, c.addr)
		} else {
			t.idle[c.addr] = stack
		}
		out = append(out, c)
	}
	return out
}

func closeAll(cs []*conn) {
	for _, c := range cs {
		c.nc.Close()
	}
}

func (c *conn) close() {
	if c.stop != nil {
		c.stop()
		c.stop = nil
	}
	c.nc.Close()
}

// release ends c's request: it goes back to the pool if reuse says so and
// the cancel hook had not fired, else it is closed.
func (c *conn) release(reuse bool) {
	if c.stop != nil {
		if !c.stop() {
			reuse = false
		}
		c.stop = nil
	}
	if !reuse || c.broken || c.br.Buffered() > 0 {
		// Bytes past the answer's end: the server is not speaking HTTP/1.1
		// as framed, and the next answer could not be trusted.
		c.nc.Close()
		return
	}
	c.t.put(c)
}

func (c *conn) roundTrip(ctx context.Context, deadline time.Time, req *http.Request, isHead bool, wire []byte) (*http.Response, error) {
	c.read, c.broken = false, false
	if err := c.nc.SetDeadline(deadline); err != nil {
		return nil, err
	}
	nc := c.nc
	c.stop = context.AfterFunc(ctx, func() { nc.SetDeadline(aLongTimeAgo) }) //nolint:errcheck // best effort
	if _, err := c.nc.Write(wire); err != nil {
		// A server may answer before it has read the whole request (a 413
		// for a body it will not take) and close: its answer, if it made
		// one, says more than the write's error.
		c.broken = true
		if resp, rerr := c.readResponse(req, isHead); rerr == nil {
			return resp, nil
		}
		return nil, fmt.Errorf("write request: %w", err)
	}
	return c.readResponse(req, isHead)
}

// ProtocolError is an answer that is not HTTP/1.x as RFC 9112 frames it.
type ProtocolError struct{ Msg string }

func (e *ProtocolError) Error() string { return "malformed HTTP response: " + e.Msg }

// errClosedBeforeAnswer is the server closing the connection with no byte
// of an answer sent. It wraps io.EOF, so it is classed as "eof".
var errClosedBeforeAnswer = fmt.Errorf("server closed the connection before answering: %w", io.EOF)

func (c *conn) readResponse(req *http.Request, isHead bool) (*http.Response, error) {
	var headerBytes int
	for {
		line, err := c.readLine(&headerBytes)
		if err != nil {
			if !c.read && errors.Is(err, io.EOF) {
				return nil, errClosedBeforeAnswer
			}
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("read status line: %w", err)
		}
		resp, h, err := parseStatusLine(line)
		if err != nil {
			return nil, err
		}
		if err := c.readHeaders(resp, &h, &headerBytes); err != nil {
			return nil, err
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			return nil, &ProtocolError{Msg: "101 Switching Protocols to a request that asked for none"}
		}
		if resp.StatusCode >= 100 && resp.StatusCode <= 199 {
			continue // 100 Continue, 103 Early Hints: the final answer follows
		}
		resp.Request = req
		return c.frame(resp, &h, isHead)
	}
}

// readLine reads one line without its CRLF (or bare LF), counting it
// against maxHeaderBytes. The slice is valid until the next read.
func (c *conn) readLine(total *int) ([]byte, error) {
	line, err := c.br.ReadSlice('\n')
	if len(line) > 0 {
		c.read = true
	}
	if errors.Is(err, bufio.ErrBufferFull) {
		// A line longer than the buffer: gather it, within the bound.
		long := append([]byte(nil), line...)
		for errors.Is(err, bufio.ErrBufferFull) && *total+len(long) <= maxHeaderBytes {
			line, err = c.br.ReadSlice('\n')
			long = append(long, line...)
		}
		line = long
	}
	*total += len(line)
	if *total > maxHeaderBytes {
		return nil, &ProtocolError{Msg: "status line and headers longer than " + strconv.Itoa(maxHeaderBytes) + " bytes"}
	}
	if err != nil {
		return nil, err
	}
	return trimEOL(line), nil
}

// trimEOL drops a line's LF and the CR before it, if any.
func trimEOL(line []byte) []byte {
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line
}

// head is what the headers say about framing and the connection.
type head struct {
	http10        bool
	contentLength int64 // -1: none
	chunked       bool
	close         bool
	keepAlive     bool // HTTP/1.0's Connection: keep-alive
}

func parseStatusLine(line []byte) (*http.Response, head, error) {
	h := head{contentLength: -1}
	// HTTP/1.1 200 OK (the reason phrase may be empty or missing).
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return nil, h, &ProtocolError{Msg: "status line " + strconv.Quote(truncate(line))}
	}
	resp := &http.Response{Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
	switch line[7] {
	case '1':
	case '0':
		resp.Proto, resp.ProtoMinor, h.http10 = "HTTP/1.0", 0, true
	default:
		return nil, h, &ProtocolError{Msg: "status line " + strconv.Quote(truncate(line))}
	}
	code := line[9:12]
	if len(line) > 12 && line[12] != ' ' {
		return nil, h, &ProtocolError{Msg: "status line " + strconv.Quote(truncate(line))}
	}
	status := 0
	for _, d := range code {
		if d < '0' || d > '9' {
			return nil, h, &ProtocolError{Msg: "status code " + strconv.Quote(string(code))}
		}
		status = status*10 + int(d-'0')
	}
	if status < 100 {
		return nil, h, &ProtocolError{Msg: "status code " + strconv.Quote(string(code))}
	}
	resp.StatusCode = status
	reason := line[min(13, len(line)):]
	if st, ok := usualStatus[status]; ok && string(reason) == http.StatusText(status) {
		resp.Status = st // no allocation for the usual answers
	} else {
		resp.Status = strconv.Itoa(status)
		if len(reason) > 0 {
			resp.Status += " " + string(reason)
		}
	}
	return resp, h, nil
}

// usualStatus holds "200 OK" and the like, for answers whose reason
// phrase is the standard one.
var usualStatus = func() map[int]string {
	m := make(map[int]string)
	for code := 100; code <= 599; code++ {
		if text := http.StatusText(code); text != "" {
			m[code] = strconv.Itoa(code) + " " + text
		}
	}
	return m
}()

func (c *conn) readHeaders(resp *http.Response, h *head, total *int) error {
	for {
		line, err := c.readLine(total)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("read response headers: %w", err)
		}
		if len(line) == 0 {
			return nil
		}
		if line[0] == ' ' || line[0] == '\t' {
			continue // obsolete line folding, of a header the relay does not read
		}
		i := bytes.IndexByte(line, ':')
		if i <= 0 || !validName(line[:i]) {
			return &ProtocolError{Msg: "header line " + strconv.Quote(truncate(line))}
		}
		name, value := line[:i], bytes.Trim(line[i+1:], " \t")
		switch {
		case equalFold(name, "content-length"):
			u, err := strconv.ParseUint(string(value), 10, 63) // digits only: no sign
			n := int64(u)
			if err != nil || (h.contentLength >= 0 && n != h.contentLength) {
				return &ProtocolError{Msg: "Content-Length " + strconv.Quote(truncate(value))}
			}
			h.contentLength = n
		case equalFold(name, "transfer-encoding"):
			if !equalFold(value, "chunked") {
				return &ProtocolError{Msg: "unsupported Transfer-Encoding " + strconv.Quote(truncate(value))}
			}
			h.chunked = true
		case equalFold(name, "connection"):
			for _, tok := range bytes.Split(value, []byte(",")) {
				tok = bytes.Trim(tok, " \t")
				if equalFold(tok, "close") {
					h.close = true
				} else if equalFold(tok, "keep-alive") {
					h.keepAlive = true
				}
			}
		case equalFold(name, "location"), equalFold(name, "retry-after"):
			if resp.Header == nil {
				resp.Header = make(http.Header, 2)
			}
			resp.Header.Add(string(name), string(value))
		}
	}
}

// frame attaches the body as the headers frame it.
func (c *conn) frame(resp *http.Response, h *head, isHead bool) (*http.Response, error) {
	reuse := !h.close && (!h.http10 || h.keepAlive)
	resp.Close = !reuse
	if resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified || isHead {
		resp.Body, resp.ContentLength = http.NoBody, 0
		c.release(reuse)
		return resp, nil
	}
	switch {
	case h.chunked:
		// A Content-Length beside chunked is ignored (RFC 9112 6.3), and
		// the connection is not trusted afterwards.
		resp.ContentLength = -1
		resp.TransferEncoding = []string{"chunked"}
		resp.Body = &body{c: c, chunks: newChunkReader(c.br), reuse: reuse && h.contentLength < 0}
	case h.contentLength == 0:
		resp.Body, resp.ContentLength = http.NoBody, 0
		c.release(reuse)
	case h.contentLength > 0:
		resp.ContentLength = h.contentLength
		resp.Body = &body{c: c, left: h.contentLength, reuse: reuse}
	default:
		// Neither: the body runs until the server closes.
		resp.ContentLength = -1
		resp.Close = true
		resp.Body = &body{c: c, left: -1}
	}
	return resp, nil
}

// body reads one answer's body and frees the connection at its end.
type body struct {
	c      *conn
	left   int64 // bytes left of a Content-Length body; -1: until close
	chunks *chunkReader
	reuse  bool
	done   bool
	err    error
}

func (b *body) Read(p []byte) (int, error) {
	if b.done {
		return 0, io.EOF
	}
	if b.err != nil {
		return 0, b.err
	}
	var n int
	var err error
	switch {
	case b.chunks != nil:
		n, err = b.chunks.Read(p)
		if err == io.EOF {
			b.end(b.reuse)
			return n, io.EOF
		}
	case b.left < 0:
		n, err = b.c.br.Read(p)
		if err == io.EOF {
			b.end(false)
			return n, io.EOF
		}
	default:
		if int64(len(p)) > b.left {
			p = p[:b.left]
		}
		n, err = b.c.br.Read(p)
		b.left -= int64(n)
		if b.left == 0 {
			b.end(b.reuse)
			return n, io.EOF
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
	}
	if err != nil {
		b.err = fmt.Errorf("read response body: %w", err)
		b.done = true
		b.c.close()
		return n, b.err
	}
	return n, nil
}

func (b *body) end(reuse bool) {
	b.done = true
	b.c.release(reuse)
}

// Close frees the connection: a body not read to its end cannot share
// the connection with the next answer, so the connection is closed.
func (b *body) Close() error {
	if !b.done {
		b.done = true
		b.c.close()
	}
	return nil
}

// chunkReader decodes a chunked body (RFC 9112 7.1) and reads its
// trailers, so that at io.EOF the next answer starts at the reader.
type chunkReader struct {
	br   *bufio.Reader
	left int64 // of the current chunk
	data bool  // the current chunk's data is being read
	head int   // bytes of chunk-size lines and trailers read
}

func newChunkReader(br *bufio.Reader) *chunkReader { return &chunkReader{br: br} }

func (r *chunkReader) Read(p []byte) (int, error) {
	for !r.data {
		line, err := r.line()
		if err != nil {
			return 0, err
		}
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i] // chunk extensions
		}
		line = bytes.Trim(line, " \t")
		u, err := strconv.ParseUint(string(line), 16, 63)
		size := int64(u)
		if err != nil || len(line) == 0 || len(line) > 16 {
			return 0, &ProtocolError{Msg: "chunk size " + strconv.Quote(truncate(line))}
		}
		if size == 0 {
			for { // trailers, up to the empty line
				t, err := r.line()
				if err != nil {
					return 0, err
				}
				if len(t) == 0 {
					return 0, io.EOF
				}
			}
		}
		r.left, r.data = size, true
	}
	if int64(len(p)) > r.left {
		p = p[:r.left]
	}
	n, err := r.br.Read(p)
	r.left -= int64(n)
	if err == io.EOF {
		return n, io.ErrUnexpectedEOF
	}
	if err != nil {
		return n, err
	}
	if r.left == 0 {
		// The CRLF after the chunk's data.
		crlf, err := r.line()
		if err != nil {
			return n, err
		}
		if len(crlf) != 0 {
			return n, &ProtocolError{Msg: "no CRLF after a chunk"}
		}
		r.data = false
	}
	return n, nil
}

func (r *chunkReader) line() ([]byte, error) {
	line, err := r.br.ReadSlice('\n')
	r.head += len(line)
	if errors.Is(err, bufio.ErrBufferFull) || r.head > maxHeaderBytes {
		return nil, &ProtocolError{Msg: "chunk framing lines too long"}
	}
	if err == io.EOF {
		return nil, io.ErrUnexpectedEOF
	}
	if err != nil {
		return nil, err
	}
	return trimEOL(line), nil
}

// appendRequest appends req on the wire: request line, Host, the
// request's headers, Content-Length, the body.
func appendRequest(b []byte, req *http.Request) ([]byte, error) {
	b, err := appendHead(b, req)
	if err != nil {
		return b, err
	}
	return appendBody(b, req)
}

// appendHead appends req's request line, Host and headers.
func appendHead(b []byte, req *http.Request) ([]byte, error) {
	u := req.URL
	host := req.Host
	if host == "" {
		host = u.Host
	}
	if host == "" || !validValue(host) {
		return b, fmt.Errorf("h1: invalid Host %q", host)
	}
	method := req.Method
	if method == "" {
		method = http.MethodGet
	}
	if !validName([]byte(method)) {
		return b, fmt.Errorf("h1: invalid method %q", method)
	}
	uri := u.RequestURI()
	if !validValue(uri) || bytes.ContainsAny([]byte(uri), " \t") {
		return b, fmt.Errorf("h1: invalid request target %q", uri)
	}
	b = append(b, method...)
	b = append(b, ' ')
	b = append(b, uri...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, host...)
	b = append(b, "\r\n"...)
	var err error
	for k, vs := range req.Header {
		for _, v := range vs {
			if b, err = appendField(b, k, v); err != nil {
				return b, err
			}
		}
	}
	if u.User != nil && req.Header.Get("Authorization") == "" {
		pass, _ := u.User.Password()
		cred := u.User.Username() + ":" + pass
		b = append(b, "Authorization: Basic "...)
		b = base64.StdEncoding.AppendEncode(b, []byte(cred))
		b = append(b, "\r\n"...)
	}
	return b, nil
}

// appendField appends "name: value" and CRLF, after checking both as
// net/http does. The framing fields are the transport's: left out.
func appendField(b []byte, name, value string) ([]byte, error) {
	if !validName([]byte(name)) {
		return b, fmt.Errorf("h1: invalid header field name %q", name)
	}
	switch http.CanonicalHeaderKey(name) {
	case "Host", "Content-Length", "Transfer-Encoding", "Connection":
		return b, nil
	}
	if !validValue(value) {
		return b, fmt.Errorf("h1: invalid header field value for %q", name)
	}
	b = append(b, name...)
	b = append(b, ": "...)
	b = append(b, value...)
	return append(b, "\r\n"...), nil
}

// appendBody appends Content-Length and req's body.
func appendBody(b []byte, req *http.Request) ([]byte, error) {
	start := len(b)
	b = append(b, "Content-Length: 0000000000\r\n\r\n"...)
	bodyStart := len(b)
	if req.Body != nil && req.Body != http.NoBody {
		buf := bytes.NewBuffer(b)
		if _, err := buf.ReadFrom(req.Body); err != nil {
			return b, fmt.Errorf("h1: read request body: %w", err)
		}
		b = buf.Bytes()
	}
	n := len(b) - bodyStart
	if req.ContentLength > 0 && int64(n) != req.ContentLength {
		return b, fmt.Errorf("h1: request body is %d bytes, ContentLength says %d", n, req.ContentLength)
	}
	// Write the length into its slot, then close the gap the slot left.
	num := strconv.AppendInt(nil, int64(n), 10)
	if len(num) > 10 {
		return b, fmt.Errorf("h1: request body of %d bytes is too large", n)
	}
	slot := b[start+len("Content-Length: ") : start+len("Content-Length: ")+10]
	gap := 10 - len(num)
	copy(slot, num)
	copy(b[start+len("Content-Length: ")+len(num):], b[start+len("Content-Length: ")+10:])
	return b[:len(b)-gap], nil
}

// closedByPeer: the error is the server closing or resetting the
// connection, not a timeout or a local failure.
func closedByPeer(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED)
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}

// validName: a token (RFC 9110 5.6.2).
func validName(s []byte) bool {
	if len(s) == 0 {
		return false
	}
	for _, c := range s {
		if c >= 0x80 || !tokenChar[c] {
			return false
		}
	}
	return true
}

// validValue: no control characters but HTAB, as net/http requires.
func validValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

var tokenChar = func() (t [128]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// equalFold compares s with lower, which is lower case ASCII.
func equalFold(s []byte, lower string) bool {
	if len(s) != len(lower) {
		return false
	}
	for i := range s {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

func truncate(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "..."
	}
	return string(b)
}
