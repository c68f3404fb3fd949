// Package procfs reads what the agent needs of /proc/<pid>/stat, the one
// parser of that file: the state letter, the start time that tells a
// process from a later one with the same pid, the CPU time, and the
// resident memory. The supervisor identifies and watches processes with it;
// the agent's health checks take their RSS and CPU figures from it.
package procfs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// ClockTicks is USER_HZ, the unit of the times in /proc/<pid>/stat: 100
// on every Linux architecture Go runs on.
const ClockTicks = 100

// Stat is the part of /proc/<pid>/stat the agent reads.
type Stat struct {
	// State is field 3: 'R', 'S', 'D', 'T', 'Z' (zombie), 'X' (dead), ...
	State byte
	// UTime and STime are fields 14 and 15: CPU time in user and kernel
	// mode, in clock ticks.
	UTime, STime uint64
	// StartTime is field 22: when the process started, in clock ticks
	// after boot.
	StartTime uint64
	// RSSPages is field 24: resident set size, in pages.
	RSSPages int64
}

// ErrMalformed means the file did not have the fields Stat reads.
var ErrMalformed = errors.New("malformed /proc/<pid>/stat")

// ReadStat reads /proc/<pid>/stat. An error wrapping fs.ErrNotExist means
// no such process.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, err
	}
	st, err := ParseStat(b)
	if err != nil {
		return Stat{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	return st, nil
}

// ParseStat parses the contents of a /proc/<pid>/stat file.
func ParseStat(b []byte) (Stat, error) {
	// The command name (field 2) is in parentheses and may hold spaces or
	// parentheses itself; everything after the last ')' is plain fields.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return Stat{}, ErrMalformed
	}
	// f[0] is field 3 (state), so field n is f[n-3].
	f := strings.Fields(string(b[i+2:]))
	if len(f) < 22 || len(f[0]) != 1 {
		return Stat{}, ErrMalformed
	}
	var st Stat
	var errs [4]error
	st.State = f[0][0]
	st.UTime, errs[0] = strconv.ParseUint(f[14-3], 10, 64)
	st.STime, errs[1] = strconv.ParseUint(f[15-3], 10, 64)
	st.StartTime, errs[2] = strconv.ParseUint(f[22-3], 10, 64)
	st.RSSPages, errs[3] = strconv.ParseInt(f[24-3], 10, 64)
	if err := errors.Join(errs[:]...); err != nil {
		return Stat{}, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	return st, nil
}

// Gone reports whether the process has exited: a zombie not yet reaped,
// or dead.
func (st Stat) Gone() bool { return st.State == 'Z' || st.State == 'X' }

// CPU is the process's CPU time, user and system together.
func (st Stat) CPU() time.Duration {
	return time.Duration(st.UTime+st.STime) * time.Second / ClockTicks
}

// RSSBytes is the resident set size in bytes.
func (st Stat) RSSBytes() int64 { return st.RSSPages * int64(os.Getpagesize()) }
