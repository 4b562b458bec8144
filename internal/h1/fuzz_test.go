package h1

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"testing"
)

// FuzzReadResponse feeds arbitrary bytes to the answer parser as a
// server's answer: it must not panic or loop, must bound what it reads,
// and must hand the connection back to the pool only when the answer
// ended exactly where its framing said.
//
//	go test -fuzz FuzzReadResponse -fuzztime 30s ./internal/h1/
func FuzzReadResponse(f *testing.F) {
	for _, seed := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
		"HTTP/1.1 204 No Content\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.0 200 OK\r\n\r\nuntil close",
		"HTTP/1.1 301 Moved\r\nLocation: /x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
		"garbage",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, answer []byte) {
		local, remote := net.Pipe()
		defer remote.Close()
		tr := &Transport{}
		c := &conn{t: tr, addr: "fuzz:80", nc: local, br: bufio.NewReaderSize(io.MultiReader(bytes.NewReader(answer), eofReader{}), readBufferBytes)}
		req, _ := http.NewRequest(http.MethodPost, "http://fuzz/", nil)
		resp, err := c.readResponse(req, false)
		if err != nil {
			return
		}
		if resp.StatusCode < 100 || resp.StatusCode > 999 {
			t.Fatalf("status %d from %q", resp.StatusCode, answer)
		}
		n, _ := io.Copy(io.Discard, io.LimitReader(resp.Body, int64(len(answer))+1))
		if n > int64(len(answer)) {
			t.Fatalf("read %d body bytes from a %d-byte answer", n, len(answer))
		}
		resp.Body.Close()
		tr.mu.Lock()
		pooled := tr.lru.Len()
		tr.mu.Unlock()
		if pooled > 0 && c.br.Buffered() > 0 {
			t.Fatalf("connection pooled with %d bytes unread", c.br.Buffered())
		}
	})
}

// eofReader ends the answer as a server closing would.
type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }
