package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/procs"
	"github.com/outbox-relay/outbox-relay/signer"
)

// The bare-latency phase posts from a process of its own, the
// outbox-relay binary's hidden `bench paced-post`, so that the CPU its
// client takes can be read apart from the receiver's: what one POST per
// event costs at the steady rate on this machine, the floor under the
// relay's CPU per event at that rate. The child runs with one P, as the
// relay does at these rates (run's --adaptive-procs).

// PacedPostCommand is the hidden `outbox-relay bench` subcommand that runs
// a PostPlan read as JSON from stdin and prints a PostResult as JSON.
const PacedPostCommand = "paced-post"

// PostPlan is what a paced-post child does.
type PostPlan struct {
	URL       string        `json:"url"`
	Rate      int           `json:"rate"`
	Duration  time.Duration `json:"duration"`
	Workers   int           `json:"workers"`
	BodyBytes int           `json:"body_bytes"`
	Tag       uint32        `json:"tag"`
	Lean      bool          `json:"lean"`
	// Secret signs every request when set (whsec_ text), as the relay's
	// are; sent on stdin, never on the command line.
	Secret string `json:"secret,omitempty"`
}

// PostResult is what a paced-post child did.
type PostResult struct {
	Sent int     `json:"sent"`
	Rate float64 `json:"rate"`
	// CPUSecs is the child's CPU (user and system) from its first post
	// to its last answer.
	CPUSecs float64 `json:"cpu_s"`
	Err     string  `json:"error,omitempty"`
}

// PacedPost posts plan's bodies at its rate from this process, with
// plan.Workers goroutines, and reports the CPU this process spent on it.
func PacedPost(ctx context.Context, plan PostPlan) PostResult {
	var sign *signer.Signer
	if plan.Secret != "" {
		sec, err := signer.ParseSecret(plan.Secret)
		if err != nil {
			return PostResult{Err: fmt.Sprintf("secret: %v", err)}
		}
		sign = signer.NewSigner(sec)
	}
	c := newBareClient(plan.URL, plan.Workers, plan.BodyBytes, sign, plan.Lean)
	defer c.CloseIdleConnections()
	bufs := make(chan []byte, plan.Workers)
	for range plan.Workers {
		bufs <- nil
	}
	cpu0 := procs.CPUTime()
	sent, rate, err := paced(ctx, plan.Rate, plan.Duration, plan.Workers, func(seq int) error {
		buf := <-bufs
		defer func() { bufs <- buf }()
		var err error
		buf, err = c.post(ctx, plan.Tag, seq, time.Now().UnixNano(), buf)
		return err
	})
	res := PostResult{Sent: sent, Rate: rate, CPUSecs: (procs.CPUTime() - cpu0).Seconds()}
	if err != nil {
		res.Err = err.Error()
	}
	return res
}

// pacedPostChild runs plan in a paced-post child of the relay binary,
// with one P, and returns what it reports.
func (r *run) pacedPostChild(ctx context.Context, plan PostPlan) (PostResult, error) {
	in, err := json.Marshal(plan)
	if err != nil {
		return PostResult{}, err
	}
	cmd := exec.CommandContext(ctx, r.cfg.RelayExe, "bench", PacedPostCommand)
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, runErr := cmd.Output()
	var res PostResult
	if err := json.Unmarshal(bytes.TrimSpace(out), &res); err != nil {
		return PostResult{}, fmt.Errorf("bench %s child (%v) printed %q: %s", PacedPostCommand, runErr, out, bytes.TrimSpace(stderr.Bytes()))
	}
	if res.Err != "" {
		return res, fmt.Errorf("bench %s child: %s", PacedPostCommand, res.Err)
	}
	if runErr != nil {
		return res, fmt.Errorf("bench %s child: %w: %s", PacedPostCommand, runErr, bytes.TrimSpace(stderr.Bytes()))
	}
	return res, nil
}
