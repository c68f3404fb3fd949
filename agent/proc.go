package agent

import (
	"bytes"
	"os"
	"strconv"
	"strings"
)

var pageSize = float64(os.Getpagesize())

// procUsage returns the resident memory (bytes) and CPU time (seconds,
// user + system) of pid from one read of /proc/<pid>/stat; zeros when it
// cannot be read.
func procUsage(pid int) (rss, cpu float64) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, 0
	}
	// Fields after the command: f[0] is field 3 (state); utime and stime
	// are fields 14 and 15 (clock ticks, USER_HZ 100); rss is field 24
	// (pages).
	f := strings.Fields(string(b[i+2:]))
	if len(f) > 21 {
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		pages, _ := strconv.ParseFloat(f[21], 64)
		cpu, rss = (ut+st)/100, pages*pageSize
	}
	return rss, cpu
}
