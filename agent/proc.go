package agent

import (
	"bytes"
	"os"
	"strconv"
	"strings"
)

var pageSize = float64(os.Getpagesize())

// procUsage returns the resident memory (bytes) and CPU time (seconds,
// user + system) of pid from /proc; zeros when it cannot be read.
func procUsage(pid int) (rss, cpu float64) {
	p := "/proc/" + strconv.Itoa(pid)
	if b, err := os.ReadFile(p + "/statm"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 1 {
			pages, _ := strconv.ParseFloat(f[1], 64)
			rss = pages * pageSize
		}
	}
	if b, err := os.ReadFile(p + "/stat"); err == nil {
		if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) {
			// Fields after the command: state is field 3; utime and
			// stime are fields 14 and 15, in clock ticks (USER_HZ 100).
			f := strings.Fields(string(b[i+2:]))
			if len(f) > 12 {
				ut, _ := strconv.ParseFloat(f[11], 64)
				st, _ := strconv.ParseFloat(f[12], 64)
				cpu = (ut + st) / 100
			}
		}
	}
	return rss, cpu
}
