// Command httpfloor measures what a bare Go HTTP client costs in CPU per
// request on this machine, at a paced rate and flat out, so the relay's
// own CPU per event can be read against it. It is a comparison program for
// BENCHMARKS.md, not part of the product.
//
// It runs the receiver (a net/http server answering 204) as a child
// process of itself, so getrusage of this process counts the client only:
// the request building, net/http's transport goroutines, the syscalls and
// the scheduler's wake-ups, with the relay's transport settings
// (keep-alive, no compression, same pool sizes), the relay's headers and a
// signature computed per request with the project's signer.
//
//	go run ./bench/httpfloor -rates 1000,2500,5000 -duration 10s
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/procs"
	"github.com/outbox-relay/outbox-relay/signer"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-serve" {
		serve()
		return
	}
	rates := flag.String("rates", "1000,2500,5000", "comma-separated paced rates (requests/s); 0 = flat out")
	duration := flag.Duration("duration", 10*time.Second, "how long each rate runs")
	workers := flag.Int("workers", 64, "concurrent requests at most (the relay's --workers)")
	size := flag.Int("body-bytes", 500, "body size")
	flag.Parse()

	child := exec.Command(os.Args[0], "-serve")
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	if err != nil {
		fail(err)
	}
	child.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := child.Start(); err != nil {
		fail(err)
	}
	defer child.Process.Kill()
	addr, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		fail(fmt.Errorf("receiver did not start: %w", err))
	}
	url := "http://" + strings.TrimSpace(addr) + "/"

	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        *workers * 4,
		MaxIdleConnsPerHost: *workers,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
		ForceAttemptHTTP2:   true,
	}
	c := &http.Client{Transport: tr}
	sec, err := signer.NewSecret([]byte("httpfloor-httpfloor-httpfloor-32"))
	if err != nil {
		fail(err)
	}
	sg := signer.NewSigner(sec)
	body := []byte(`{"pad":"` + strings.Repeat("x", max(0, *size-10)) + `"}`)

	fmt.Printf("bare net/http client, %d-byte bodies, %d workers, receiver in a child process\n", len(body), *workers)
	fmt.Printf("%10s %10s %10s %14s\n", "rate/s", "requests", "achieved", "client us/req")
	for _, f := range strings.Split(*rates, ",") {
		rate, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			fail(fmt.Errorf("-rates: %w", err))
		}
		n, took, cpu := run(c, sg, url, body, rate, *duration, *workers)
		fmt.Printf("%10s %10d %10.0f %14.1f\n", label(rate), n, float64(n)/took.Seconds(), float64(cpu.Microseconds())/float64(max(1, n)))
	}
}

func label(rate int) string {
	if rate == 0 {
		return "max"
	}
	return strconv.Itoa(rate)
}

// run posts at rate for d (flat out when rate is 0) and returns the
// requests made, the time taken and this process's CPU meanwhile.
func run(c *http.Client, sg *signer.Signer, url string, body []byte, rate int, d time.Duration, workers int) (int, time.Duration, time.Duration) {
	var seq atomic.Int64
	post := func(sig []byte) []byte {
		i := seq.Add(1)
		id := fmt.Sprintf("msg_%032d", i)
		now := time.Now().Unix()
		sig = sg.AppendSignature(sig[:0], id, now, body)
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodPost, url, bytes.NewReader(body))
		req.Header = http.Header{"Content-Type": {"application/json"}, "User-Agent": {"outbox-relay"},
			"Webhook-Id": {id}, "Webhook-Timestamp": {strconv.FormatInt(now, 10)}, "Webhook-Signature": {string(sig)}}
		resp, err := c.Do(req)
		if err != nil {
			fail(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return sig
	}
	// Warm the connection pool so dials are not counted.
	for range 10 {
		post(nil)
	}
	cpu0 := procs.CPUTime()
	start := time.Now()
	var wg sync.WaitGroup
	work := make(chan struct{}, workers)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var sig []byte
			for range work {
				sig = post(sig)
			}
		}()
	}
	var n int
	if rate == 0 {
		for time.Since(start) < d {
			work <- struct{}{}
			n++
		}
	} else {
		interval := time.Second / time.Duration(rate)
		total := int(d.Seconds() * float64(rate))
		for ; n < total; n++ {
			if wait := time.Until(start.Add(time.Duration(n) * interval)); wait > 0 {
				time.Sleep(wait)
			}
			work <- struct{}{}
		}
	}
	close(work)
	wg.Wait()
	return n, time.Since(start), procs.CPUTime() - cpu0
}

func serve() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(err)
	}
	fmt.Println(ln.Addr().String())
	_ = http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusNoContent)
	}))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "httpfloor:", err)
	os.Exit(1)
}
