package pgtemp

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// FindBinDir returns the directory holding the PostgreSQL server binaries
// initdb and postgres: `pg_config --bindir` if it has them, else the newest
// /usr/lib/postgresql/N/bin that has them, else the directory of initdb on
// PATH. The error wraps [ErrNoServerBinaries] and says what to install.
func FindBinDir() (string, error) {
	var candidates []string
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		candidates = append(candidates, strings.TrimSpace(string(out)))
	}
	candidates = append(candidates, debianBinDirs()...)
	if p, err := exec.LookPath("initdb"); err == nil {
		candidates = append(candidates, filepath.Dir(p))
	}
	for _, dir := range candidates {
		if hasServerBinaries(dir) {
			return dir, nil
		}
	}
	return "", fmt.Errorf("%w (looked in pg_config --bindir, /usr/lib/postgresql/*/bin and PATH): %s",
		ErrNoServerBinaries, installHint)
}

// debianRoot is where Debian and Ubuntu install server versions side by
// side; a variable so that tests can pretend nothing is installed.
var debianRoot = "/usr/lib/postgresql"

// debianBinDirs returns /usr/lib/postgresql/*/bin, newest version first.
func debianBinDirs() []string {
	dirs, _ := filepath.Glob(filepath.Join(debianRoot, "*", "bin"))
	version := func(dir string) float64 {
		v, err := strconv.ParseFloat(filepath.Base(filepath.Dir(dir)), 64)
		if err != nil {
			return -1
		}
		return v
	}
	slices.SortFunc(dirs, func(a, b string) int {
		va, vb := version(a), version(b)
		switch {
		case va > vb:
			return -1
		case va < vb:
			return 1
		}
		return strings.Compare(a, b)
	})
	return dirs
}

func hasServerBinaries(dir string) bool {
	for _, name := range []string{"initdb", "postgres"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// runAs is the OS user the server runs as when we are root; nil means the
// current user.
type runAs struct {
	name     string
	uid, gid int
	groups   []uint32
	home     string
}

func lookupRunAs() (*runAs, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("pgtemp: running as root, and PostgreSQL refuses to run as root, "+
			"but the OS user postgres was not found (%w); installing the postgresql package creates it, "+
			"or run the tests as a non-root user", err)
	}
	ra := &runAs{name: u.Username, home: u.HomeDir}
	if ra.uid, err = strconv.Atoi(u.Uid); err != nil {
		return nil, fmt.Errorf("pgtemp: uid of postgres: %w", err)
	}
	if ra.gid, err = strconv.Atoi(u.Gid); err != nil {
		return nil, fmt.Errorf("pgtemp: gid of postgres: %w", err)
	}
	gids, _ := u.GroupIds()
	for _, g := range gids {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil {
			ra.groups = append(ra.groups, uint32(n))
		}
	}
	if ra.home == "" {
		ra.home = "/"
	}
	return ra, nil
}

// tempParent returns the directory to create cluster directories in:
// os.TempDir(), unless we are root and the postgres user cannot reach it
// (TMPDIR under /root, say), then /tmp.
func tempParent(ra *runAs) string {
	dir := os.TempDir()
	if ra == nil || traversableByOthers(dir) {
		return dir
	}
	return "/tmp"
}

// traversableByOthers reports whether every directory from / down to dir
// has the "other" execute bit, so that an unrelated user can reach dir's
// children.
func traversableByOthers(dir string) bool {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return false
	}
	for {
		fi, err := os.Stat(dir)
		if err != nil || fi.Mode().Perm()&0o001 == 0 {
			return false
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return true
		}
		dir = parent
	}
}

// removeAbandoned removes cluster directories in parent whose owning process
// and server are both gone: left by a test binary that was killed, whose
// server then got its parent-death signal.
func removeAbandoned(parent string, minAge time.Duration, logger *slog.Logger) {
	dirs, _ := filepath.Glob(filepath.Join(parent, dirPrefix+"*"))
	for _, dir := range dirs {
		owner, err := readPID(filepath.Join(dir, ownerFile))
		if err != nil || alive(owner) {
			continue
		}
		// postmaster.pid is removed on clean shutdown; if it is there, its
		// first line is the server's PID.
		if server, err := readPID(filepath.Join(dir, dataName, "postmaster.pid")); err == nil && alive(server) {
			continue
		}
		// A directory just created by a concurrent Start has an owner file
		// with a live PID, so it never gets here; the age check is a second
		// guard against PID files caught half-written.
		if fi, err := os.Stat(dir); err != nil || time.Since(fi.ModTime()) < minAge {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			logger.Warn("pgtemp: remove abandoned cluster directory", slog.String("dir", dir), slog.Any("error", err))
			continue
		}
		logger.Info("pgtemp: removed abandoned cluster directory", slog.String("dir", dir))
	}
}

func readPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	return strconv.Atoi(strings.TrimSpace(string(line)))
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if err := syscall.Kill(pid, 0); err != nil && err != syscall.EPERM {
		return false
	}
	// A zombie (killed, not yet reaped) counts as dead.
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true // no /proc: trust kill(2)
	}
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] != 'Z'
	}
	return true
}
