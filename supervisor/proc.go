package supervisor

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis-agent/redis-agent/internal/procfs"
)

// Process identifies one process across pid reuse: the kernel never gives
// the same (pid, start time) pair to two processes within one boot.
type Process struct {
	PID int `json:"pid"`
	// StartTime is field 22 of /proc/<pid>/stat: clock ticks after boot.
	StartTime uint64 `json:"start_time"`
}

// errGone means the process does not exist, is a zombie, or is a different
// process than the one recorded.
var errGone = errors.New("process is gone")

// identify returns the live process pid, or errGone.
func identify(pid int) (Process, error) {
	st, err := procfs.ReadStat(pid)
	if errors.Is(err, procfs.ErrMalformed) {
		return Process{}, err
	}
	if err != nil {
		// No such file, or the process ended while it was read.
		return Process{}, fmt.Errorf("pid %d: %w", pid, errGone)
	}
	if st.Gone() {
		return Process{}, fmt.Errorf("pid %d is a zombie: %w", pid, errGone)
	}
	return Process{PID: pid, StartTime: st.StartTime}, nil
}

// cmdline returns /proc/<pid>/cmdline with NULs as spaces. redis-server
// rewrites its own argv to its proc-title-template, e.g.
// "redis-server 127.0.0.1:16000 /var/lib/redis-agent/instances/x/redis.conf".
func cmdline(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(bytes.ReplaceAll(b, []byte{0}, []byte{' '})))
}

// namesConfig reports whether a process title names confPath as its config:
// the title ends with it as the last word, or it is the first argument of an
// argv that was not rewritten.
func namesConfig(title, confPath string) bool {
	return strings.HasSuffix(title, " "+confPath)
}

// Verify reports whether p is alive and is the redis-server run from
// confPath: same pid, same start time, not a zombie, and its title names the
// config. Only a verified process may be signalled or adopted.
func Verify(p Process, confPath string) error {
	if p.PID <= 0 {
		return fmt.Errorf("no pid: %w", errGone)
	}
	cur, err := identify(p.PID)
	if err != nil {
		return err
	}
	if cur.StartTime != p.StartTime {
		return fmt.Errorf("pid %d was reused (start time %d, recorded %d): %w", p.PID, cur.StartTime, p.StartTime, errGone)
	}
	if title := cmdline(p.PID); !namesConfig(title, confPath) {
		return fmt.Errorf("pid %d runs %q, not %s: %w", p.PID, title, confPath, errGone)
	}
	return nil
}

// IsGone reports whether err says a process no longer exists as recorded.
func IsGone(err error) bool { return errors.Is(err, errGone) }

// Scan returns the live processes whose title names a config file, keyed
// by that file's path, for every config path for which match returns true.
// Reconcile uses it to find redis-servers that the records do not know
// (an agent crash between spawn and persisting the pid) or that no record
// owns.
func Scan(match func(confPath string) bool) (map[string]Process, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("scan /proc: %w", err)
	}
	out := map[string]Process{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		// The title is "<argv0> <listen-addr> <config-file>"; argv0 may be
		// a full path or a wrapper, so only the config decides.
		title := cmdline(pid)
		i := strings.LastIndexByte(title, ' ')
		if i < 0 {
			continue
		}
		conf := title[i+1:]
		if !match(conf) {
			continue
		}
		p, err := identify(pid)
		if err != nil {
			continue
		}
		out[conf] = p
	}
	return out, nil
}

var bootTime = sync.OnceValue(func() time.Time {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			s, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err == nil {
				return time.Unix(s, 0)
			}
		}
	}
	return time.Time{}
})

// StartedAt converts a process start time to wall time (1 s resolution).
func (p Process) StartedAt() time.Time {
	bt := bootTime()
	if bt.IsZero() {
		return time.Time{}
	}
	return bt.Add(time.Duration(p.StartTime) * time.Second / procfs.ClockTicks)
}

// Listeners maps the inode of every listening TCP socket of the agent's
// network namespace to its port: read once (ReadListeners) for a whole
// reconcile, it tells which process listens where without a connection.
type Listeners map[uint64]int

// ReadListeners reads the listening sockets from /proc/net/tcp and tcp6.
func ReadListeners() (Listeners, error) {
	l := Listeners{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // no IPv6
			}
			return nil, err
		}
		parseListeners(string(b), l)
	}
	return l, nil
}

// parseListeners adds the LISTEN rows (state 0A) of a /proc/net/tcp table
// to l: "sl local_address rem_address st ... uid timeout inode".
func parseListeners(table string, l Listeners) {
	for _, line := range strings.Split(table, "\n") {
		f := strings.Fields(line)
		if len(f) < 10 || f[3] != "0A" {
			continue
		}
		_, hexPort, ok := strings.Cut(f[1], ":")
		port, err := strconv.ParseUint(hexPort, 16, 16)
		inode, ierr := strconv.ParseUint(f[9], 10, 64)
		if !ok || err != nil || ierr != nil || inode == 0 {
			continue
		}
		l[inode] = int(port)
	}
}

// listensOn reports whether pid holds a socket that listens on port.
func (l Listeners) listensOn(pid, port int) bool {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd/"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		target, err := os.Readlink(dir + e.Name())
		if err != nil {
			continue
		}
		s, ok := strings.CutPrefix(target, "socket:[")
		if !ok {
			continue
		}
		inode, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64)
		if err == nil && l[inode] == port {
			return true
		}
	}
	return false
}

// deletedSuffix ends the /proc/<pid>/exe of a process whose executable was
// removed or replaced since it started.
const deletedSuffix = " (deleted)"

// Executable returns the path of the file pid runs (/proc/<pid>/exe),
// without the suffix a replaced file gets: for a redis-server started
// through a wrapper script, the binary the script ran.
func Executable(pid int) (string, error) {
	exe, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe")
	return strings.TrimSuffix(exe, deletedSuffix), err
}

// runsBinary reports whether pid's executable is one of binaries: the same
// path (a symlink resolved), the same file, or the path of a file that was
// replaced since the process started ("/usr/bin/redis-check-rdb (deleted)"
// after a package upgrade in place).
func runsBinary(pid int, binaries []string) (string, bool) {
	exeLink := "/proc/" + strconv.Itoa(pid) + "/exe"
	exe, err := os.Readlink(exeLink)
	if err != nil {
		return "", false
	}
	exePath := strings.TrimSuffix(exe, deletedSuffix)
	exeInfo, exeErr := os.Stat(exeLink)
	for _, b := range binaries {
		if b == "" {
			continue
		}
		if b == exePath {
			return exe, true
		}
		if r, err := filepath.EvalSymlinks(b); err == nil && r == exePath {
			return exe, true
		}
		if bi, err := os.Stat(b); err == nil && exeErr == nil && os.SameFile(bi, exeInfo) {
			return exe, true
		}
	}
	return exe, false
}

// VerifyServer is Verify for a process about to be adopted, which a title
// alone does not prove ours (`tail -f .../redis.conf` has one that names
// the config): its executable must also be one of binaries and, when l is
// not nil, it must listen on port according to l.
func VerifyServer(p Process, confPath string, binaries []string, port int, l Listeners) error {
	if err := Verify(p, confPath); err != nil {
		return err
	}
	if exe, ok := runsBinary(p.PID, binaries); !ok {
		return fmt.Errorf("pid %d runs %q, not redis-server (%s): %w", p.PID, exe, strings.Join(binaries, ", "), errGone)
	}
	if l != nil && !l.listensOn(p.PID, port) {
		return fmt.Errorf("pid %d does not listen on port %d: %w", p.PID, port, errGone)
	}
	return nil
}
