package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat.
// Linux reports it as 100 on every architecture Go supports.
const clockTicks = 100

// relayProc is the relay running as a child process, so its CPU and
// memory are its own.
type relayProc struct {
	cmd     *exec.Cmd
	out     *tailBuffer
	done    chan struct{}
	err     error
	opsAddr string
}

func startRelay(exe string, args []string) (*relayProc, error) {
	p := &relayProc{out: &tailBuffer{max: 64 << 10}, done: make(chan struct{})}
	p.cmd = exec.Command(exe, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start relay %s: %w", exe, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *relayProc) pid() int { return p.cmd.Process.Pid }

// exited returns an error saying how the relay ended, or nil if it runs.
func (p *relayProc) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("relay exited (%v); its output ends with:\n%s", p.err, p.out.String())
	default:
		return nil
	}
}

// cpu is the process's user + system CPU time so far.
func (p *relayProc) cpu() (time.Duration, error) {
	st, err := readStat(p.pid())
	if err != nil {
		return 0, fmt.Errorf("read relay CPU: %w", err)
	}
	return st.cpu, nil
}

// memory returns the process's peak (VmHWM) and current (VmRSS) resident
// set size in bytes.
func (p *relayProc) memory() (peak, cur int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.pid()))
	if err != nil {
		return 0, 0, fmt.Errorf("read relay memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		for _, k := range []struct {
			name string
			dst  *int64
		}{{"VmHWM:", &peak}, {"VmRSS:", &cur}} {
			if strings.HasPrefix(line, k.name) {
				if fs := strings.Fields(line); len(fs) >= 2 {
					kb, _ := strconv.ParseInt(fs[1], 10, 64)
					*k.dst = kb << 10
				}
			}
		}
	}
	return peak, cur, sc.Err()
}

// metric reads one unlabelled sample from the relay's /metrics; -1 when
// it cannot be had.
func (p *relayProc) metric(ctx context.Context, name string) float64 {
	if p.opsAddr == "" {
		return -1
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.opsAddr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err == nil {
				return v
			}
		}
	}
	return -1
}

// stop sends SIGTERM and waits; after grace it kills.
func (p *relayProc) stop(grace time.Duration) {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	b   []byte
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = append(t.b[:0], t.b[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

var _ io.Writer = (*tailBuffer)(nil)

// freeAddr returns a loopback address whose port was free just now.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}
