package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/h1"
	"github.com/outbox-relay/outbox-relay/signer"
)

// bareClient is the ceiling: a plain keep-alive client, no signing, no
// database, the same concurrency as the relay's workers.
type bareClient struct {
	h1.Client // Plain set: posts go through the lean transport
	url       string
	size      int
	sign      *signer.Signer // nil: unsigned
}

// The values of Config.BareClient.
const (
	BareNetHTTP = "net/http"
	BareLean    = "lean"
)

func newBareClient(url string, workers, size int, sign *signer.Signer, lean bool) *bareClient {
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConns:        workers * 4,
		MaxIdleConnsPerHost: workers,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	c := &bareClient{Client: h1.Client{Other: &http.Client{Transport: tr}}, url: url, size: size, sign: sign}
	if lean {
		c.Plain = &h1.Transport{Dial: dialer.DialContext, MaxIdlePerHost: workers, MaxIdle: workers * 4}
	}
	return c
}

var contentTypeJSON = []string{"application/json"}

// post sends one body; buf is scratch space, returned for reuse.
func (c *bareClient) post(ctx context.Context, tag uint32, seq int, t int64, buf []byte) ([]byte, error) {
	buf = appendBody(buf[:0], seq, t, c.size)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(buf))
	if err != nil {
		return buf, err
	}
	id := webhookID(eventID(tag, seq))
	req.Header = http.Header{"Content-Type": contentTypeJSON, "Webhook-Id": {id}}
	if c.sign != nil {
		now := time.Now().Unix()
		req.Header["Webhook-Timestamp"] = []string{strconv.FormatInt(now, 10)}
		req.Header["Webhook-Signature"] = []string{string(c.sign.AppendSignature(nil, id, now, buf))}
	}
	resp, err := c.Do(req)
	if err != nil {
		return buf, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return buf, fmt.Errorf("receiver answered %d", resp.StatusCode)
	}
	return buf, nil
}

// drain posts n bodies with workers goroutines and returns how long it took.
func (c *bareClient) drain(ctx context.Context, tag uint32, n, workers int) (time.Duration, error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			for {
				seq := int(next.Add(1) - 1)
				if seq >= n || ctx.Err() != nil {
					return
				}
				var err error
				if buf, err = c.post(ctx, tag, seq, time.Now().UnixNano(), buf); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return took, fmt.Errorf("bare client: %w", err)
	}
	return took, ctx.Err()
}

// paced runs send(seq) for rate events per second during d, each at its
// scheduled time, on workers goroutines (so one slow send does not hold
// the schedule up). It returns how many were sent and the achieved rate.
func paced(ctx context.Context, rate int, d time.Duration, workers int, send func(seq int) error) (int, float64, error) {
	n := int(float64(rate) * d.Seconds())
	work := make(chan int, workers)
	errs := make(chan error, workers)
	var sent atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := range work {
				if err := send(seq); err != nil {
					errs <- err
					for range work { //nolint:revive // drain so the scheduler never blocks
					}
					return
				}
				sent.Add(1)
			}
		}()
	}
	start := time.Now()
	interval := time.Second / time.Duration(rate)
	// One timer for the whole schedule: the bare client's CPU per request
	// is measured, and a timer made per event would count against it.
	tick := time.NewTimer(time.Hour)
	defer tick.Stop()
	var err error
schedule:
	for seq := range n {
		if wait := time.Until(start.Add(time.Duration(seq) * interval)); wait > 0 {
			tick.Reset(wait)
			select {
			case <-ctx.Done():
				err = ctx.Err()
				break schedule
			case e := <-errs:
				err = e
				break schedule
			case <-tick.C:
			}
		}
		select {
		case work <- seq:
		case e := <-errs:
			err = e
			break schedule
		case <-ctx.Done():
			err = ctx.Err()
			break schedule
		}
	}
	close(work)
	wg.Wait()
	took := time.Since(start)
	close(errs)
	if err == nil {
		err = <-errs
	}
	return int(sent.Load()), float64(sent.Load()) / took.Seconds(), err
}
