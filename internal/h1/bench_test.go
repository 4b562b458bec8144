package h1

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// BenchmarkPost compares this transport with net/http's posting a
// 500-byte body to a loopback net/http server, 16 senders at a time. The
// server shares the process, so ns/op includes its work; allocs/op is
// the client's and the server's together.
//
//	go test -run '^$' -bench BenchmarkPost -benchmem ./internal/h1/
func BenchmarkPost(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.WriteHeader(200)
	}))
	defer srv.Close()
	body := []byte(strings.Repeat("x", 500))
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	for _, tc := range []struct {
		name string
		rt   http.RoundTripper
	}{
		{"h1", &Transport{Dial: dialer.DialContext, MaxIdlePerHost: 16}},
		{"net-http", &http.Transport{DialContext: dialer.DialContext, MaxIdleConnsPerHost: 16, DisableCompression: true}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.SetParallelism(8) // 16 senders on 2 cores
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					req, _ := http.NewRequest(http.MethodPost, srv.URL, bytes.NewReader(body))
					req.Header["Content-Type"] = []string{"application/json"}
					resp, err := tc.rt.RoundTrip(req)
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						b.Errorf("status %d", resp.StatusCode)
						return
					}
				}
			})
		})
	}
}
