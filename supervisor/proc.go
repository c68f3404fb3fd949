package supervisor

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
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

// procStat returns the state letter and start time of pid from
// /proc/<pid>/stat.
func procStat(pid int) (state byte, start uint64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, fmt.Errorf("pid %d: %w", pid, errGone)
	}
	// The command name (field 2) is in parentheses and may hold spaces or
	// parentheses itself; everything after the last ')' is plain fields.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, 0, fmt.Errorf("pid %d: malformed stat", pid)
	}
	fields := strings.Fields(string(b[i+2:]))
	// fields[0] is field 3 (state); field 22 (starttime) is fields[19].
	if len(fields) < 20 {
		return 0, 0, fmt.Errorf("pid %d: short stat", pid)
	}
	start, err = strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("pid %d: start time: %w", pid, err)
	}
	return fields[0][0], start, nil
}

// identify returns the live process pid, or errGone.
func identify(pid int) (Process, error) {
	state, start, err := procStat(pid)
	if err != nil {
		return Process{}, err
	}
	if state == 'Z' || state == 'X' {
		return Process{}, fmt.Errorf("pid %d is a zombie: %w", pid, errGone)
	}
	return Process{PID: pid, StartTime: start}, nil
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

// clockTicks is USER_HZ, which is 100 on every Linux architecture Go runs on.
const clockTicks = 100

// StartedAt converts a process start time to wall time (1 s resolution).
func (p Process) StartedAt() time.Time {
	bt := bootTime()
	if bt.IsZero() {
		return time.Time{}
	}
	return bt.Add(time.Duration(p.StartTime) * time.Second / clockTicks)
}
