package agent

import "github.com/redis-agent/redis-agent/internal/procfs"

// procUsage returns the resident memory (bytes) and CPU time (seconds,
// user + system) of pid from one read of /proc/<pid>/stat; zeros when it
// cannot be read.
func procUsage(pid int) (rss, cpu float64) {
	st, err := procfs.ReadStat(pid)
	if err != nil {
		return 0, 0
	}
	return float64(st.RSSBytes()), st.CPU().Seconds()
}
